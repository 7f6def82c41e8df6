"""A running job's row is not deleted (issue 9 item 14), with the real hpcd and agent."""

import pytest

from djangoapp.models import HpcJob, JobStatus
from djangoapp.protocol import JobStillRunning
from harness import FINAL, wait_status


def test_a_running_jobs_row_stays_until_it_is_cancelled(local_cluster):
    job = HpcJob.objects.create()
    job.submit({"script": "sleep 600"})
    wait_status(job, {JobStatus.RUNNING})
    with pytest.raises(JobStillRunning, match="Cancel it"):
        job.delete()
    with pytest.raises(JobStillRunning):
        HpcJob.objects.filter(pk=job.pk).delete()
    assert HpcJob.objects.filter(pk=job.pk).exists()
    job.cancel()
    wait_status(job, FINAL)
    assert job.status == JobStatus.CANCELLED
    job.delete()
    assert not HpcJob.objects.filter(pk=job.pk).exists()
