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


def test_a_launch_gets_its_cluster_and_a_single_use_agent_token_in_one_call(db):
    cluster = HpcCluster.objects.create(host_name="h", client_path="/x", username="u",
                                        password="secret")
    info, (token_id, secret) = store.prepare_launch_thd(cluster.pk, 60)
    assert info == store.cluster_thd(cluster.pk)
    assert HpcCluster.objects.get(pk=cluster.pk).status_detail == "launching the agent"
    assert store.claim_token_thd(secret, ["agent"])["token_id"] == token_id
    assert store.claim_token_thd(secret, ["agent"]) is None  # single use
    assert store.prepare_launch_thd(cluster.pk + 1, 60) is None
    assert WebsocketToken.objects.count() == 1


def test_a_welcome_carries_the_installation_and_a_resume_token_revoking_older_ones(db):
    cluster = HpcCluster.objects.create(host_name="localhost", client_path="/x")
    _, older = store.issue_token_thd(cluster.pk, "resume", None)
    installation, (token_id, secret) = store.welcome_thd(cluster.pk)
    assert installation == store.installation_id_thd()
    assert store.claim_token_thd(older, ["resume"]) is None
    assert store.claim_token_thd(secret, ["resume"])["token_id"] == token_id


def test_clusters_are_listed_without_their_credentials(db):
    HpcCluster.objects.create(host_name="h", client_path="/x", username="u",
                              password="secret")
    (listed,) = store.clusters_thd()
    assert "password" not in listed and "key" not in listed


# -- jobs: an agent's updates -------------------------------------------------------------

import pytest  # noqa: E402
from django.db import connection  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402

from djangoapp import transitions  # noqa: E402
from djangoapp.models import HpcJob, HpcJobStatusChange, JobStatus as S  # noqa: E402
from djangoapp.signals import job_status_changed  # noqa: E402
from seedportal.models import Job, SaveSeen, SentMail  # noqa: E402
from testjobs.models import LabeledJob  # noqa: E402

_seqs = iter(range(1, 10**9))


def update(job, status, detail="", scheduler_id=None):
    return {"seq": next(_seqs), "job": job, "status": int(status), "detail": detail,
            "at": 0.0, "scheduler_id": scheduler_id}


def steps(job_id):
    return [(c.old_status, c.new_status, c.source, c.detail)
            for c in HpcJobStatusChange.objects.filter(job_id=job_id).order_by("time", "id")]


@pytest.fixture
def cluster(db):
    return HpcCluster.objects.create(host_name="localhost", client_path="/x")


def test_a_batch_applies_each_jobs_updates_in_order_with_one_history_row_each(cluster):
    jobs = [HpcJob.objects.create(cluster=cluster, job_status=S.SUBMITTING) for _ in range(3)]
    a, b, c = (j.pk for j in jobs)
    batch = [update(a, S.SUBMITTED, scheduler_id="101"), update(b, S.SUBMITTED, "q", "102"),
             update(a, S.RUNNING), update(c, S.RUNNING, "started"), update(a, S.COMPLETED,
                                                                            "exit 0")]
    assert store.apply_updates_thd(cluster.pk, batch) == [u["seq"] for u in batch]
    rows = HpcJob.objects.in_bulk([a, b, c])
    assert (rows[a].job_status, rows[a].job_details, rows[a].remote_job_id) == (
        S.COMPLETED, "exit 0", "101")
    assert (rows[b].job_status, rows[b].job_details, rows[b].remote_job_id) == (
        S.SUBMITTED, "q", "102")
    assert (rows[c].job_status, rows[c].remote_job_id) == (S.RUNNING, "")
    assert rows[a].job_submitted_time and rows[a].job_running_time and rows[a].job_finished_time
    assert rows[c].job_submitted_time is None and rows[c].job_running_time
    assert steps(a) == [(S.SUBMITTING, S.SUBMITTED, "agent", ""),
                        (S.SUBMITTED, S.RUNNING, "agent", ""),
                        (S.RUNNING, S.COMPLETED, "agent", "exit 0")]
    assert steps(c) == [(S.SUBMITTING, S.RUNNING, "agent", "started")]


def test_a_replayed_batch_is_acked_and_changes_nothing(cluster):
    job = HpcJob.objects.create(cluster=cluster, job_status=S.SUBMITTING)
    batch = [update(job.pk, S.SUBMITTED, scheduler_id="9"), update(job.pk, S.COMPLETED)]
    store.apply_updates_thd(cluster.pk, batch)
    again = [dict(u, seq=next(_seqs)) for u in batch]
    assert store.apply_updates_thd(cluster.pk, again) == [u["seq"] for u in again]
    assert len(steps(job.pk)) == 2
    assert HpcJob.objects.get(pk=job.pk).job_status == S.COMPLETED


def test_a_late_report_never_moves_a_job_back(cluster):
    job = HpcJob.objects.create(cluster=cluster, job_status=S.CANCELLED)
    store.apply_updates_thd(cluster.pk, [update(job.pk, S.COMPLETED)])
    assert HpcJob.objects.get(pk=job.pk).job_status == S.CANCELLED and steps(job.pk) == []


def test_updates_about_another_clusters_jobs_or_unknown_ones_are_refused(cluster):
    other = HpcCluster.objects.create(host_name="other", client_path="/y")
    theirs = HpcJob.objects.create(cluster=other, job_status=S.RUNNING)
    mine = HpcJob.objects.create(cluster=cluster, job_status=S.RUNNING)
    batch = [update(theirs.pk, S.COMPLETED), update(987654, S.COMPLETED),
             update(mine.pk, 12345), update(mine.pk, S.COMPLETED)]
    assert store.apply_updates_thd(cluster.pk, batch) == [u["seq"] for u in batch]
    assert HpcJob.objects.get(pk=theirs.pk).job_status == S.RUNNING
    assert HpcJob.objects.get(pk=mine.pk).job_status == S.COMPLETED


def test_a_job_another_writer_moved_meanwhile_is_re_decided_alone(cluster, monkeypatch):
    """The group's compare-and-set matches fewer rows: it is undone, and each
    of its jobs applied from the state it is really in."""
    jobs = [HpcJob.objects.create(cluster=cluster, job_status=S.RUNNING) for _ in range(3)]
    raced = jobs[1].pk
    read = transitions._read_states

    def read_then_cancel(job_ids):
        states = read(job_ids)
        HpcJob.objects.filter(pk=raced).update(job_status=S.CANCELLING)  # Django's cancel
        return states

    monkeypatch.setattr(transitions, "_read_states", read_then_cancel)
    store.apply_updates_thd(cluster.pk, [update(j.pk, S.COMPLETED, "done") for j in jobs])
    assert {j.job_status for j in HpcJob.objects.all()} == {S.COMPLETED}
    assert steps(raced) == [(S.CANCELLING, S.COMPLETED, "agent", "done")]
    assert steps(jobs[0].pk) == [(S.RUNNING, S.COMPLETED, "agent", "done")]


def _queries(f, *args):
    with CaptureQueriesContext(connection) as captured:
        f(*args)
    return len(captured.captured_queries)


def test_a_batch_costs_the_same_statements_for_ten_jobs_or_three_hundred(cluster):
    def batch(n):
        jobs = HpcJob.objects.bulk_create(
            [HpcJob(cluster=cluster, job_status=S.SUBMITTING) for _ in range(n)])
        ids = [j.pk for j in jobs] if jobs[0].pk else list(
            HpcJob.objects.order_by("-pk").values_list("pk", flat=True)[:n])
        return [update(j, s, scheduler_id=str(j) if s == S.SUBMITTED else None)
                for s in (S.SUBMITTED, S.RUNNING, S.COMPLETED) for j in ids]

    small, large = batch(10), batch(300)
    small_cost = _queries(store.apply_updates_thd, cluster.pk, small)
    large_cost = _queries(store.apply_updates_thd, cluster.pk, large)
    assert HpcJob.objects.filter(job_status=S.COMPLETED).count() == 310
    # SQLite caps the parameters of one statement, so its chunks are smaller.
    assert large_cost <= small_cost * (1 if connection.vendor != "sqlite" else 5)


def test_job_status_changed_and_the_hook_see_every_change_of_a_batch(
        cluster, settings, django_capture_on_commit_callbacks):
    settings.HPC_JOB_CLASS = "testjobs.LabeledJob"
    job = LabeledJob.objects.create(cluster=cluster, job_status=S.SUBMITTING, label="mine")
    seen = []

    def receiver(sender, job, old, new, **kwargs):
        seen.append((sender, type(job), job.pk, old, new))

    job_status_changed.connect(receiver, sender=LabeledJob)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            store.apply_updates_thd(cluster.pk, [update(job.pk, s) for s in (
                S.SUBMITTED, S.RUNNING, S.COMPLETED)])
    finally:
        job_status_changed.disconnect(receiver, sender=LabeledJob)
    assert seen == [(LabeledJob, LabeledJob, job.pk, S.SUBMITTING, S.SUBMITTED),
                    (LabeledJob, LabeledJob, job.pk, S.SUBMITTED, S.RUNNING),
                    (LabeledJob, LabeledJob, job.pk, S.RUNNING, S.COMPLETED)]
    # The hook ran once per change, each time on the job as stored then.
    assert LabeledJob.objects.get(pk=job.pk).label == "mine>SUBMITTED>RUNNING>COMPLETED"


def test_with_model_receivers_each_update_is_saved_through_the_model(cluster, settings):
    settings.HPC_JOB_CLASS = "seedportal.Job"
    jobs = [Job.objects.create(name=f"j{i}", cluster=cluster, job_status=S.SUBMITTING)
            for i in range(2)]
    SaveSeen.objects.all().delete()
    store.apply_updates_thd(cluster.pk, [update(j.pk, s) for s in (S.RUNNING, S.COMPLETED)
                                         for j in jobs])
    assert [(m.job_id, m.new_status, m.row_status) for m in SentMail.objects.all()] == [
        (jobs[0].pk, S.COMPLETED, S.RUNNING), (jobs[1].pk, S.COMPLETED, S.RUNNING)]
    assert SaveSeen.objects.filter(signal="pre_save").count() == 4
    assert all(len(steps(j.pk)) == 2 for j in jobs)


# -- jobs: the dispatch scan ----------------------------------------------------------------

def test_the_scan_costs_one_query_however_many_jobs_wait(cluster):
    HpcJob.objects.bulk_create([HpcJob(cluster=cluster, job_status=s)
                                for s in (S.PENDING, S.SUBMITTING, S.CANCELLING) * 5])
    few = _queries(store.work_thd)
    HpcJob.objects.bulk_create([HpcJob(cluster=cluster, job_status=S.PENDING)
                                for _ in range(200)])
    assert _queries(store.work_thd) == few == 1
    assert len(store.work_thd()) == 215
    assert len(store.work_thd(0)) == 215  # Dispatch(job_id=0): scan now


def test_jobs_without_a_cluster_are_asked_in_bounded_turns(cluster, settings, monkeypatch):
    settings.HPC_DISPATCH_ASSIGN_LIMIT = 4
    monkeypatch.setattr(store, "_assign_after", 0)
    asked = []

    def choose(self, parameters):
        asked.append(self.pk)
        return None  # nothing fits yet

    monkeypatch.setattr(HpcJob, "choose_cluster", choose)
    ids = [HpcJob.objects.create(job_status=S.PENDING).pk for _ in range(10)]
    for _ in range(3):
        assert store.work_thd() == []
    assert asked == ids[:4] + ids[4:8] + ids[8:] + ids[:2]
    monkeypatch.setattr(HpcJob, "choose_cluster", lambda self, parameters: cluster)
    work = store.work_thd()
    assert [w["job"] for w in work] == ids[2:6] and {w["cluster_id"] for w in work} == {
        cluster.pk}


def test_a_plain_hpcjob_row_under_a_subclass_setting_ends_in_error(cluster, settings):
    settings.HPC_JOB_CLASS = "testjobs.LabeledJob"
    stray = HpcJob.objects.create(job_status=S.PENDING)
    proper = LabeledJob.objects.create(job_status=S.PENDING)
    work = store.work_thd()
    assert [w["job"] for w in work] == [proper.pk]  # LabeledJob chooses the first cluster
    stray.refresh_from_db()
    assert stray.job_status == S.ERROR
    assert "get_job_model()" in stray.job_details and "testjobs.LabeledJob" in stray.job_details
    assert store.work_thd() == [w for w in work if w["job"] != stray.pk]


def test_many_jobs_move_in_one_batch_each_by_the_table(cluster):
    pending = [HpcJob.objects.create(cluster=cluster, job_status=S.PENDING) for _ in range(3)]
    cancelled = HpcJob.objects.create(cluster=cluster, job_status=S.CANCELLED)
    ids = [j.pk for j in pending] + [cancelled.pk, 987654]
    assert sorted(store.transition_many_thd(ids, S.SUBMITTING)) == sorted(
        j.pk for j in pending)
    assert all(steps(j.pk) == [(S.PENDING, S.SUBMITTING, "hpcd", "")] for j in pending)
    assert HpcJob.objects.get(pk=cancelled.pk).job_status == S.CANCELLED
    assert store.transition_many_thd(ids, S.SUBMITTING) == []

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
