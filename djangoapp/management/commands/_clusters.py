"""Finding the cluster a management command names."""

from django.core.management.base import CommandError

from djangoapp.models import HpcCluster


def find_cluster(name):
    """A cluster by id or by host name (which must then be unambiguous)."""
    if name.isdigit():
        cluster = HpcCluster.objects.filter(pk=int(name)).first()
    else:
        matches = list(HpcCluster.objects.filter(host_name=name)[:2])
        if len(matches) > 1:
            raise CommandError(f"several clusters have host name {name!r}; give the id")
        cluster = matches[0] if matches else None
    if cluster is None:
        raise CommandError(f"no cluster {name!r} (give its id or host name)")
    return cluster
