"""Sizes with a bound on the Django side (issue 9 item 8)."""

import pytest
from django.contrib.auth.models import User
from django.test import Client

from djangoapp.models import HpcCluster, HpcJob, JobStatus
from djangoapp.protocol import ParametersRefused
from hpc_agent import wire


@pytest.fixture
def cluster(db):
    return HpcCluster.objects.create(host_name="localhost", client_path="/srv/a")


def test_parameters_over_the_limit_are_refused_at_submit(cluster, settings):
    settings.HPC_MAX_PARAMETERS_BYTES = 1000
    job = HpcJob.objects.create(cluster=cluster)
    with pytest.raises(ParametersRefused, match="HPC_MAX_PARAMETERS_BYTES"):
        job.submit({"script": "x" * 1000})
    job.refresh_from_db()
    assert job.job_status == JobStatus.DRAFT and job.job_parameters is None
    assert job.submit({"script": "x" * 900}) == JobStatus.PENDING


def test_the_limit_never_exceeds_a_control_frame(cluster, settings):
    settings.HPC_MAX_PARAMETERS_BYTES = 10 * wire.MAX_CONTROL_MESSAGE
    with pytest.raises(ParametersRefused):
        HpcJob(cluster=cluster).submit({"script": "x" * wire.MAX_CONTROL_MESSAGE})
    assert not HpcJob.objects.filter(job_status=JobStatus.PENDING).exists()


def test_the_size_is_the_wire_encoding(cluster, settings):
    # The wire escapes non-ASCII: 300 "é" are 1,800 bytes there.
    settings.HPC_MAX_PARAMETERS_BYTES = 1000
    with pytest.raises(ParametersRefused):
        HpcJob(cluster=cluster).submit({"script": "é" * 300})


def test_parameters_the_wire_cannot_carry_are_refused(cluster):
    for parameters in ({"x": float("nan")}, {"x": {1, 2}}):
        with pytest.raises(ParametersRefused, match="not JSON"):
            HpcJob(cluster=cluster).submit(parameters)
    assert not HpcJob.objects.exclude(job_status=JobStatus.DRAFT).exists()


def test_submit_many_refuses_all_when_one_is_too_large(cluster, settings):
    settings.HPC_MAX_PARAMETERS_BYTES = 1000
    saved = HpcJob.objects.create(cluster=cluster)
    pairs = [(HpcJob(cluster=cluster), {"i": i}) for i in range(5)]
    pairs += [(saved, {"script": "x" * 2000})]
    with pytest.raises(ParametersRefused, match=f"job {saved.pk}"):
        HpcJob.objects.submit_many(pairs)
    assert list(HpcJob.objects.values_list("job_status", flat=True)) == [JobStatus.DRAFT]


def test_the_admin_list_does_not_render_a_long_detail(db, cluster):
    User.objects.create_superuser("admin", "admin@example.org", "pw")
    client = Client()
    client.login(username="admin", password="pw")
    detail = "start-of-detail " + "y" * 20000 + " END-OF-DETAIL"
    job = HpcJob.objects.create(cluster=cluster, job_status=JobStatus.ERROR,
                                job_details=detail)
    page = client.get("/admin/djangoapp/hpcjob/").content.decode()
    assert "start-of-detail" in page and "END-OF-DETAIL" not in page
    page = client.get(f"/admin/djangoapp/hpcjob/{job.pk}/change/").content.decode()
    assert "END-OF-DETAIL" in page
