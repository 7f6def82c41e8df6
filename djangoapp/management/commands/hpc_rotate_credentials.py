"""Re-encrypt every cluster's credentials under the first HPC_CREDENTIAL_KEYS key."""

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from djangoapp import crypto
from djangoapp.models import HpcCluster


class Command(BaseCommand):
    help = ("Key rotation: put a new key first in HPC_CREDENTIAL_KEYS (keep the old ones "
            "after it), run this, then remove the old keys. --generate-key prints a new key.")

    def add_arguments(self, parser):
        parser.add_argument("--generate-key", action="store_true",
                            help="print a new Fernet key and exit")

    def handle(self, generate_key, **options):
        if generate_key:
            self.stdout.write(crypto.generate_key())
            return
        with transaction.atomic():
            clusters = list(HpcCluster.objects.select_for_update())
            for cluster in clusters:
                try:
                    # Each token is re-encrypted under the first key by
                    # whichever key fits; a value stored before encryption
                    # existed is encrypted now.
                    for name in ("key", "password"):
                        stored = getattr(cluster, name)
                        setattr(cluster, name, crypto.rotate(stored) if crypto.is_encrypted(
                            stored) else crypto.encrypt(stored))
                except crypto.CredentialKeyError as e:
                    raise CommandError(f"cluster {cluster.pk} ({cluster}): {e} "
                                       "Nothing was re-encrypted.") from None
                cluster.save(update_fields=["key", "password"])
        self.stdout.write(self.style.SUCCESS(
            f"re-encrypted the credentials of {len(clusters)} clusters under the first key"))
