from django.db import models

from djangoapp.models import HpcJob


class LabeledJob(HpcJob):
    """A site's job subclass: an extra field and its own cluster choice."""

    label = models.CharField(max_length=100, blank=True, default="")

    def on_status_change(self, old, new, detail):
        # Records what hpcd told this class, in hpcd's process.
        type(self).objects.filter(pk=self.pk).update(label=f"{self.label}>{new.name}")

    def choose_cluster(self, parameters):
        from djangoapp.models import HpcCluster

        return HpcCluster.objects.filter(enabled=True).order_by("id").first()
