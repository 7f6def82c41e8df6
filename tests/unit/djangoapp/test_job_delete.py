"""A job row is not deleted while its job may run on its cluster (issue 9 item 14)."""

import pytest

from djangoapp.models import HpcCluster, HpcJob, JobStatus
from djangoapp.protocol import JobStillRunning
from testjobs.models import LabeledJob


@pytest.fixture
def cluster(db):
    return HpcCluster.objects.create(host_name="localhost", client_path="/srv/a")


def _job(cluster, status, model=HpcJob):
    return model.objects.create(cluster=cluster, job_status=status)


@pytest.mark.parametrize("status", [JobStatus.SUBMITTING, JobStatus.SUBMITTED, JobStatus.QUEUED,
                                    JobStatus.RUNNING, JobStatus.CANCELLING,
                                    JobStatus.DELETING])
def test_deleting_a_job_on_its_cluster_is_refused(cluster, status):
    job = _job(cluster, status)
    with pytest.raises(JobStillRunning, match=f"job {job.pk} is {status.name}.*Cancel it"):
        job.delete()
    with pytest.raises(JobStillRunning) as refused:
        HpcJob.objects.filter(pk=job.pk).delete()
    assert refused.value.jobs == [job.pk]
    assert HpcJob.objects.filter(pk=job.pk).exists()


@pytest.mark.parametrize("status", [JobStatus.DRAFT, JobStatus.PENDING, JobStatus.COMPLETED,
                                    JobStatus.ERROR, JobStatus.CANCELLED, JobStatus.DELETED])
def test_jobs_that_never_reached_a_cluster_or_ended_are_deleted(cluster, status):
    job = _job(cluster, status)
    job.delete()
    other = _job(cluster, status)
    HpcJob.objects.filter(pk=other.pk).delete()
    assert not HpcJob.objects.exists()


def test_a_queryset_delete_with_one_running_job_deletes_none(cluster):
    done = [_job(cluster, JobStatus.COMPLETED) for _ in range(3)]
    running = _job(cluster, JobStatus.RUNNING)
    with pytest.raises(JobStillRunning):
        HpcJob.objects.all().delete()
    assert HpcJob.objects.count() == len(done) + 1
    assert HpcJob.objects.filter(pk=running.pk).exists()


def test_the_stored_state_is_checked_not_a_stale_instance(cluster):
    job = _job(cluster, JobStatus.PENDING)
    HpcJob.objects.filter(pk=job.pk).update(job_status=JobStatus.RUNNING)
    assert job.job_status == JobStatus.PENDING
    with pytest.raises(JobStillRunning):
        job.delete()


def test_a_subclass_row_is_refused_too(cluster):
    job = _job(cluster, JobStatus.RUNNING, LabeledJob)
    with pytest.raises(JobStillRunning):
        LabeledJob.objects.all().delete()
    with pytest.raises(JobStillRunning):
        LabeledJob.objects.get(pk=job.pk).delete()
    assert LabeledJob.objects.filter(pk=job.pk).exists()
    LabeledJob.objects.filter(pk=job.pk).update(job_status=JobStatus.COMPLETED)
    LabeledJob.objects.all().delete()
    assert not HpcJob.objects.exists()


def test_the_admin_delete_selected_warns_and_refuses(admin_client, cluster):
    running = _job(cluster, JobStatus.RUNNING)
    done = _job(cluster, JobStatus.COMPLETED)
    selected = {"action": "delete_selected", "_selected_action": [running.pk, done.pk]}
    page = admin_client.post("/admin/djangoapp/hpcjob/", selected).content.decode()
    assert f"job {running.pk} (RUNNING): still on cluster" in page
    assert "cancel it and delete it once it has ended" in page
    admin_client.post("/admin/djangoapp/hpcjob/", {**selected, "post": "yes"})
    assert set(HpcJob.objects.values_list("pk", flat=True)) == {running.pk, done.pk}


def test_the_admin_delete_page_of_a_running_job_refuses(admin_client, cluster):
    running = _job(cluster, JobStatus.QUEUED)
    url = f"/admin/djangoapp/hpcjob/{running.pk}/delete/"
    assert "still on cluster" in admin_client.get(url).content.decode()
    admin_client.post(url, {"post": "yes"})
    assert HpcJob.objects.filter(pk=running.pk).exists()
    done = _job(cluster, JobStatus.COMPLETED)
    admin_client.post(f"/admin/djangoapp/hpcjob/{done.pk}/delete/", {"post": "yes"})
    assert not HpcJob.objects.filter(pk=done.pk).exists()


def test_a_deletion_around_the_manager_is_refused_by_the_signal(cluster):
    from django.db import transaction

    job = _job(cluster, JobStatus.RUNNING)
    with pytest.raises(JobStillRunning), transaction.atomic():
        HpcJob._base_manager.filter(pk=job.pk).delete()
    assert HpcJob.objects.filter(pk=job.pk).exists()
