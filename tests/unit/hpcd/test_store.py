"""hpcd's database functions (called directly here, off any reactor)."""

from datetime import timedelta

from django.utils import timezone
from twisted.logger import formatEvent

from djangoapp.models import HpcCluster, WebsocketToken
from hpc_agent.status import JobStatus
from hpcd import store


def test_old_tokens_are_purged_except_live_and_latest_resume_ones(db):
    cluster = HpcCluster.objects.create(host_name="localhost", client_path="/x")
    spent, _ = WebsocketToken.objects.issue(cluster.pk, "file", 60)
    live, _ = WebsocketToken.objects.issue(cluster.pk, "agent", 60)
    resume, _ = WebsocketToken.objects.issue(cluster.pk, "resume")
    fresh, _ = WebsocketToken.objects.issue(cluster.pk, "file", 60)
    WebsocketToken.objects.filter(pk__in=[spent.pk, live.pk, resume.pk]).update(
        created=timezone.now() - timedelta(days=2))
    assert store.purge_tokens_thd([live.pk]) == 1
    assert set(WebsocketToken.objects.values_list("pk", flat=True)) == {
        live.pk, resume.pk, fresh.pk}


def test_a_new_resume_token_revokes_the_older_ones(db):
    cluster = HpcCluster.objects.create(host_name="localhost", client_path="/x")
    _, first = store.issue_token_thd(cluster.pk, "resume", None)
    _, second = store.issue_token_thd(cluster.pk, "resume", None)
    assert store.claim_token_thd(first, ["resume"]) is None
    assert store.claim_token_thd(second, ["resume"])["cluster_id"] == cluster.pk
    assert store.claim_token_thd(second, ["resume"]) is None  # single use


def test_clusters_are_listed_without_their_credentials(db):
    HpcCluster.objects.create(host_name="h", client_path="/x", username="u",
                              password="secret")
    (listed,) = store.clusters_thd()
    assert "password" not in listed and "key" not in listed


def test_job_counts_are_by_cluster_and_state(db):
    from djangoapp.models import HpcJob

    cluster = HpcCluster.objects.create(host_name="localhost", client_path="/x")
    for status in (JobStatus.RUNNING, JobStatus.RUNNING, JobStatus.COMPLETED):
        HpcJob.objects.create(cluster=cluster, job_status=status)
    HpcJob.objects.create(job_status=JobStatus.PENDING)
    assert store.job_counts_thd() == {(cluster.pk, "RUNNING"): 2, (cluster.pk, "COMPLETED"): 1,
                                      (None, "PENDING"): 1}
    store.ping_thd()  # /healthz's round trip: no exception


def test_each_stored_or_refused_update_is_one_log_line_a_replay_none(db):
    from twisted.logger import globalLogPublisher

    from djangoapp.models import HpcJob

    cluster = HpcCluster.objects.create(host_name="localhost", client_path="/x")
    job = HpcJob.objects.create(cluster=cluster, job_status=JobStatus.RUNNING)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        update = {"seq": 1, "job": job.pk, "status": int(JobStatus.COMPLETED), "detail": "",
                  "scheduler_id": ""}
        assert store.apply_updates_thd(cluster.pk, [update]) == [1]
        assert store.apply_updates_thd(cluster.pk, [{**update, "seq": 2}]) == [2]  # replay
        late = {**update, "seq": 3, "status": int(JobStatus.RUNNING), "detail": "late"}
        assert store.apply_updates_thd(cluster.pk, [late]) == [3]
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [(e["hpc_event"], formatEvent(e)) for e in events if "hpc_event" in e]
    assert lines == [
        ("state_change", f"cluster {cluster.pk} job {job.pk}: RUNNING -> COMPLETED"),
        ("update_refused", f"cluster {cluster.pk} job {job.pk}: COMPLETED -> RUNNING refused "
                           "by the transition table: late")]
