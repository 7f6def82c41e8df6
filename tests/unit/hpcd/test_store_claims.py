"""hpcd's claims of work for the dispatcher (store.claim_work_thd, work_of_thd)."""

from django.db import connection
from django.test.utils import CaptureQueriesContext

from djangoapp.models import HpcCluster, HpcJob, HpcJobStatusChange
from hpc_agent.status import JobStatus as S
from hpcd import store


def jobs(cluster, count, status=S.PENDING, parameters=None):
    return [HpcJob.objects.create(cluster=cluster, job_status=status,
                                  job_parameters=parameters or {"script": "true"}).pk
            for _ in range(count)]


def test_a_claim_moves_the_clusters_oldest_pending_jobs_to_submitting(db):
    mine = HpcCluster.objects.create(host_name="a", client_path="/x")
    other = HpcCluster.objects.create(host_name="b", client_path="/y")
    pending = jobs(mine, 5)
    jobs(other, 2)
    jobs(mine, 1, status=S.CANCELLED)
    claimed = store.claim_work_thd(mine.pk, 3, 1 << 20)
    assert [c["job"] for c in claimed] == pending[:3]
    assert claimed[0]["parameters"] == {"script": "true"}
    assert set(HpcJob.objects.filter(pk__in=pending[:3]).values_list("job_status", flat=True)) \
        == {S.SUBMITTING}
    # One history row per claimed job, as a single transition would leave.
    assert HpcJobStatusChange.objects.filter(new_status=S.SUBMITTING).count() == 3
    assert [c["job"] for c in store.claim_work_thd(mine.pk, 3, 1 << 20)] == pending[3:]
    assert store.claim_work_thd(mine.pk, 3, 1 << 20) == []


def test_a_claim_takes_no_more_parameters_than_fit_but_at_least_one_job(db):
    cluster = HpcCluster.objects.create(host_name="a", client_path="/x")
    big = {"script": "x" * 1000}
    ids = jobs(cluster, 4, parameters=big)
    assert [c["job"] for c in store.claim_work_thd(cluster.pk, 10, 2500)] == ids[:2]
    assert [c["job"] for c in store.claim_work_thd(cluster.pk, 10, 10)] == ids[2:3]


def test_a_claim_is_a_constant_number_of_queries(db):
    cluster = HpcCluster.objects.create(host_name="a", client_path="/x")
    jobs(cluster, 3)
    with CaptureQueriesContext(connection) as few:
        store.claim_work_thd(cluster.pk, 100, 1 << 20)
    jobs(cluster, 60)
    with CaptureQueriesContext(connection) as many:
        assert len(store.claim_work_thd(cluster.pk, 100, 1 << 20)) == 60
    assert len(many) == len(few)


def test_work_of_reads_only_the_jobs_asked_that_need_work(db):
    cluster = HpcCluster.objects.create(host_name="a", client_path="/x")
    pending, done = jobs(cluster, 2), jobs(cluster, 1, status=S.COMPLETED)
    cancelling = jobs(cluster, 1, status=S.CANCELLING)
    found = store.work_of_thd([*pending[:1], *done, *cancelling, 10 ** 9])
    assert [(w["job"], w["status"]) for w in found] == [(pending[0], S.PENDING),
                                                        (cancelling[0], S.CANCELLING)]
