"""Show a cluster's SSH host keys and pin them when you confirm."""

from django.core.management.base import BaseCommand, CommandError

from djangoapp.ipc import HpcdError
from djangoapp.management.commands._clusters import find_cluster


class Command(BaseCommand):
    help = ("Fetch the SSH host keys a cluster's server offers (through hpcd), show their "
            "SHA256 fingerprints, and pin them after you confirm they are the server's.")

    def add_arguments(self, parser):
        parser.add_argument("cluster", help="the cluster's id or host name")
        parser.add_argument("--yes", action="store_true",
                            help="pin without asking (only if you checked the fingerprints "
                                 "some other way)")

    def handle(self, cluster, yes, **options):
        cluster = find_cluster(cluster)
        try:
            keys = cluster.fetch_host_keys()
        except HpcdError as e:
            raise CommandError(str(e)) from None
        self.stdout.write(f"{cluster.host_name}:{cluster.port} offers:")
        for key in keys:
            self.stdout.write(f"  {key['fingerprint']}  ({key['key_type']})")
        pinned = set(cluster.host_key.split())
        if all(key["line"].split()[1] in pinned for key in keys):
            self.stdout.write("These keys are already pinned.")
            return
        if not yes:
            answer = input("Compare them with the fingerprints the cluster's admins publish. "
                           "Pin these keys? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                raise CommandError("nothing pinned")
        cluster.pin_host_keys(keys)
        self.stdout.write(self.style.SUCCESS(f"pinned {len(keys)} host keys"))
