"""Bounds on what an agent's updates store (issue 9 item 8)."""

import pytest

from djangoapp.models import HpcCluster, HpcJob, HpcJobStatusChange, JobStatus as S
from hpcd import store

_seqs = iter(range(1, 10**9))


def update(job, status, detail="", scheduler_id=None):
    return {"seq": next(_seqs), "job": job, "status": int(status), "detail": detail,
            "at": 0.0, "scheduler_id": scheduler_id}


@pytest.fixture
def cluster(db):
    return HpcCluster.objects.create(host_name="localhost", client_path="/x")


def test_a_long_detail_is_cut_with_a_marker_in_the_job_and_its_history(cluster, settings):
    settings.HPC_JOB_DETAIL_MAX_CHARS = 500
    job = HpcJob.objects.create(cluster=cluster, job_status=S.RUNNING)
    detail = "scheduler said: " + "z" * 15 * 1024 * 1024
    store.apply_updates_thd(cluster.pk, [update(job.pk, S.ERROR, detail)])
    job.refresh_from_db()
    assert job.job_status == S.ERROR
    assert len(job.job_details) <= 500
    assert job.job_details.startswith("scheduler said: zzz")
    assert job.job_details.endswith("more characters cut]")
    (change,) = HpcJobStatusChange.objects.filter(job=job)
    assert change.detail == job.job_details


def test_a_short_detail_is_kept_as_it_is(cluster):
    job = HpcJob.objects.create(cluster=cluster, job_status=S.RUNNING)
    store.apply_updates_thd(cluster.pk, [update(job.pk, S.COMPLETED, "exit 0")])
    job.refresh_from_db()
    assert job.job_details == "exit 0"


def test_a_scheduler_id_longer_than_its_column_fails_that_job_only(cluster):
    jobs = [HpcJob.objects.create(cluster=cluster, job_status=S.SUBMITTING) for _ in range(3)]
    long_id = "9" * 300
    batch = [update(jobs[0].pk, S.SUBMITTED, scheduler_id="101"),
             update(jobs[1].pk, S.SUBMITTED, scheduler_id=long_id),
             update(jobs[2].pk, S.SUBMITTED, scheduler_id="103")]
    # Every update is acknowledged: the agent must not send the long id again.
    assert store.apply_updates_thd(cluster.pk, batch) == [u["seq"] for u in batch]
    states = {j.pk: (j.job_status, j.remote_job_id, j.job_details)
              for j in HpcJob.objects.filter(pk__in=[j.pk for j in jobs])}
    assert states[jobs[0].pk][:2] == (S.SUBMITTED, "101")
    assert states[jobs[2].pk][:2] == (S.SUBMITTED, "103")
    status, remote, detail = states[jobs[1].pk]
    assert (status, remote) == (S.ERROR, "")
    assert "300 characters long, more than the 255" in detail
    # Its later reports are refused, as after any end.
    store.apply_updates_thd(cluster.pk, [update(jobs[1].pk, S.RUNNING, scheduler_id="5")])
    assert HpcJob.objects.get(pk=jobs[1].pk).job_status == S.ERROR


def test_a_submitting_job_whose_parameters_no_frame_carries_ends_in_error(cluster, settings):
    settings.HPC_MAX_PARAMETERS_BYTES = 1000
    # Written around submit(), which would have refused them.
    big = HpcJob.objects.create(cluster=cluster, job_status=S.SUBMITTING,
                                job_parameters={"script": "x" * 2000})
    fine = HpcJob.objects.create(cluster=cluster, job_status=S.SUBMITTING,
                                 job_parameters={"script": "echo hi"})
    pending = HpcJob.objects.create(cluster=cluster, job_status=S.PENDING,
                                    job_parameters={"script": "x" * 2000})
    work = {w["job"] for w in store.work_thd()}
    assert work == {fine.pk, pending.pk}  # a PENDING one is caught once SUBMITTING
    big.refresh_from_db()
    assert big.job_status == S.ERROR and "HPC_MAX_PARAMETERS_BYTES" in big.job_details
    assert store.work_thd(big.pk) == []


def test_claims_and_notified_work_end_unsendable_jobs_in_error_too(cluster, settings):
    """The dispatcher's batch path (claim_work_thd, work_of_thd) applies the
    same rule as the scan."""
    settings.HPC_MAX_PARAMETERS_BYTES = 1000
    big = HpcJob.objects.create(cluster=cluster, job_status=S.PENDING,
                                job_parameters={"script": "x" * 2000})
    fine = HpcJob.objects.create(cluster=cluster, job_status=S.PENDING,
                                 job_parameters={"script": "echo hi"})
    claimed = [c["job"] for c in store.claim_work_thd(cluster.pk, 10, 1 << 20)]
    assert claimed == [fine.pk]
    big.refresh_from_db()
    assert big.job_status == S.ERROR and "HPC_MAX_PARAMETERS_BYTES" in big.job_details
    bigger = HpcJob.objects.create(cluster=cluster, job_status=S.SUBMITTING,
                                   job_parameters={"script": "x" * 3000})
    assert store.work_of_thd([bigger.pk, fine.pk]) == [
        {"job": fine.pk, "status": S.SUBMITTING, "cluster_id": cluster.pk,
         "parameters": {"script": "echo hi"}}]
    bigger.refresh_from_db()
    assert bigger.job_status == S.ERROR
