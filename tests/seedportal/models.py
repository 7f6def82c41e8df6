"""A research portal's Django side, in the shapes the seed project's portals had.

Its job class defines ``status`` (a property returning text), ``name``,
``description`` and ``user``, names HpcJob's own code must leave alone, and
a ``pre_save`` receiver mails the owner when a job ends, comparing with the
row still in the database, as the seed's portals did.  Reusable: integration
tests run it with ``HPC_JOB_CLASS = "seedportal.Job"`` against a live hpcd.
"""

from django.conf import settings
from django.db import models
from django.db.models.signals import post_save, pre_save
from django.dispatch import receiver

from djangoapp.models import HpcJob, JobStatus
from djangoapp.signals import job_status_changed

ENDED = {JobStatus.COMPLETED, JobStatus.ERROR, JobStatus.CANCELLED,
         JobStatus.WALL_TIME_EXCEEDED, JobStatus.OUT_OF_MEMORY}


class Job(HpcJob):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                             on_delete=models.CASCADE, related_name="portal_jobs")
    name = models.CharField(max_length=255)
    description = models.TextField(blank=True, default="")

    @property
    def status(self):
        """The portal's own: words for its pages."""
        return JobStatus.display_name(self.job_status)


class SentMail(models.Model):
    """What the portal's receiver would have mailed, and what it saw."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="mails")
    subject = models.CharField(max_length=255)
    new_status = models.IntegerField()
    # The state the database still held while pre_save ran.
    row_status = models.IntegerField()

    class Meta:
        ordering = ["id"]


class SaveSeen(models.Model):
    """Every pre_save and post_save of a Job, with the update_fields, and
    every job_status_changed (its source in ``update_fields``)."""

    job_id = models.IntegerField()
    signal = models.CharField(max_length=16)
    job_status = models.IntegerField()
    update_fields = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["id"]


@receiver(pre_save, sender=Job)
def mail_the_owner_when_a_job_ends(sender, instance, update_fields=None, **kwargs):
    if instance.pk is None:
        return
    _seen(instance, "pre_save", update_fields)
    row = sender.objects.filter(pk=instance.pk).values_list("job_status", flat=True).first()
    if instance.job_status in ENDED and row != instance.job_status:
        SentMail.objects.create(job=instance, new_status=instance.job_status, row_status=row,
                                subject=f"Your job {instance.name} is {instance.status}")


@receiver(post_save, sender=Job)
def record_post_save(sender, instance, created, update_fields=None, **kwargs):
    _seen(instance, "post_save", update_fields)


def _seen(instance, signal, update_fields):
    SaveSeen.objects.create(job_id=instance.pk, signal=signal, job_status=instance.job_status,
                            update_fields=",".join(sorted(update_fields or ())))


@receiver(job_status_changed, sender=Job)
def record_status_changed(sender, job, old, new, detail, source, **kwargs):
    SaveSeen.objects.create(job_id=job.pk, signal="status_changed", job_status=new,
                            update_fields=source)
