"""Jobs waiting on hpcd too long are named in the log (hpcd.watchdog), driven
with a Clock and a fake store; the store's query against a real database."""

from datetime import timedelta

import pytest
from django.utils import timezone
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from djangoapp.models import HpcCluster, HpcJob, HpcJobStatusChange, JobStatus
from fakes import mismatches
from hpcd import store
from hpcd.clusters import ClusterManager
from hpcd.store import Store
from hpcd.watchdog import StuckJobs


class FakeStore:
    def __init__(self):
        self.answers = []
        self.asked = []

    def stuck_jobs(self, threshold_seconds, limit=100):
        self.asked.append(threshold_seconds)
        return defer.succeed(self.answers.pop(0) if self.answers else [])


class FakeClusters:
    online = set()

    def session(self, cluster_id):
        return object() if cluster_id in self.online else None


def test_the_fakes_match_the_real_classes():
    assert mismatches(FakeStore, Store) == []
    assert mismatches(FakeClusters, ClusterManager) == []


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [formatEvent(e) for e in events if e.get("hpc_event") == "job_stuck"]
    globalLogPublisher.removeObserver(events.append)


def stuck(job, status, waited, cluster=7):
    return {"job": job, "status": status, "cluster_id": cluster, "waited": waited}


def test_a_stuck_job_is_named_once_a_period_with_what_it_waits_for(logged):
    clock, fake, clusters = Clock(), FakeStore(), FakeClusters()
    watchdog = StuckJobs(clock, fake, clusters, threshold=600)
    watchdog.startService()
    fake.answers = [[stuck(1, "SUBMITTING", 700), stuck(2, "PENDING", 650, cluster=None)],
                    [stuck(1, "SUBMITTING", 760)],          # same period: quiet
                    [stuck(1, "SUBMITTING", 1310)],         # a period later: again
                    [stuck(1, "CANCELLING", 620)]]          # a new state: at once
    clock.advance(60)
    assert logged() == [
        "cluster 7 job 1: SUBMITTING for 12 min; its cluster is offline: see the cluster's "
        "status_detail or python manage.py hpc_status",
        "cluster None job 2: PENDING for 11 min; no cluster was chosen for it yet "
        "(choose_cluster found none online; see hpc_status)"]
    clock.advance(60)
    assert len(logged()) == 2
    clock.advance(60)
    assert len(logged()) == 3
    clusters.online = {7}
    clock.advance(60)
    assert logged()[-1] == ("cluster 7 job 1: CANCELLING for 10 min; its cluster is online but "
                            "has not answered for it: see the agent's log")
    assert fake.asked == [600] * 4
    watchdog.stopService()


def test_the_store_finds_jobs_waiting_on_hpcd_longest_first(db):
    cluster = HpcCluster.objects.create(host_name="localhost", client_path="/x")
    now = timezone.now()

    def job(status, minutes_ago):
        j = HpcJob.objects.create(cluster=cluster, job_status=status)
        HpcJobStatusChange.objects.create(job=j, old_status=0, new_status=status,
                                          source="django",
                                          time=now - timedelta(minutes=minutes_ago))
        return j

    old_pending = job(JobStatus.PENDING, 30)
    older_cancelling = job(JobStatus.CANCELLING, 60)
    job(JobStatus.SUBMITTING, 2)          # recent: fine
    job(JobStatus.RUNNING, 600)           # the scheduler's business
    job(JobStatus.COMPLETED, 600)         # over
    found = store.stuck_jobs_thd(600)
    assert [(f["job"], f["status"]) for f in found] == [
        (older_cancelling.pk, "CANCELLING"), (old_pending.pk, "PENDING")]
    assert 3590 < found[0]["waited"] < 3700 and found[0]["cluster_id"] == cluster.pk
