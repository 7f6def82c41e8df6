"""Changing a job's state in the database (djangoapp.transitions) and the job API
built on it (HpcJob.submit / cancel / delete_job)."""

import threading

import pytest
from django.db import connection, connections

from djangoapp import transitions
from djangoapp.models import HpcCluster, HpcJob, HpcJobStatusChange
from djangoapp.transitions import JobStateError
from hpc_agent.status import TIME_FIELDS, JobStatus as S, can_transition


@pytest.fixture(autouse=True)
def no_hpcd(settings, tmp_path):
    """Nothing listens here: a notification to hpcd fails quietly, as it may."""
    settings.HPC_IPC_UNIX_SOCKET = str(tmp_path / "no-hpcd.sock")
    settings.HPC_IPC_TIMEOUT = 1.0


def job_in(status, **fields):
    return HpcJob.objects.create(job_status=int(status), **fields)


def history(job_id):
    return [(S(c.old_status), S(c.new_status), c.source, c.detail)
            for c in HpcJobStatusChange.objects.filter(job_id=job_id).order_by("time", "id")]


# -- apply ----------------------------------------------------------------------

def test_apply_records_each_change_with_its_source_and_detail(db):
    job = job_in(S.SUBMITTED)
    assert transitions.apply(job.pk, S.QUEUED, "agent", "waiting") == (True, S.SUBMITTED)
    assert transitions.apply(job.pk, S.RUNNING, "agent") == (True, S.QUEUED)
    assert transitions.apply(job.pk, S.COMPLETED, "hpcd", "exit 0") == (True, S.RUNNING)
    assert history(job.pk) == [(S.SUBMITTED, S.QUEUED, "agent", "waiting"),
                               (S.QUEUED, S.RUNNING, "agent", ""),
                               (S.RUNNING, S.COMPLETED, "hpcd", "exit 0")]
    job.refresh_from_db()
    assert (job.status, job.job_details) == (S.COMPLETED, "exit 0")
    assert [c.new_status for c in job.history()] == [S.QUEUED, S.RUNNING, S.COMPLETED]


def test_apply_refuses_a_forbidden_transition_and_records_nothing(db):
    job = job_in(S.COMPLETED)
    assert transitions.apply(job.pk, S.RUNNING, "agent", "late") == (False, S.COMPLETED)
    job.refresh_from_db()
    assert job.status == S.COMPLETED and job.job_details == ""
    assert history(job.pk) == []


def test_apply_to_the_current_state_changes_nothing(db):
    job = job_in(S.RUNNING)
    assert transitions.apply(job.pk, S.RUNNING, "agent") == (False, S.RUNNING)
    assert history(job.pk) == []


def test_apply_to_a_missing_job_does_nothing(db):
    assert transitions.apply(987654, S.PENDING, "django") == (False, None)


@pytest.mark.parametrize("new", sorted(TIME_FIELDS))
def test_apply_sets_the_time_field_of_the_state_entered(db, new):
    old = next(s for s in S if can_transition(s, new))
    job = job_in(old)
    assert transitions.apply(job.pk, new, "hpcd")[0]
    job.refresh_from_db()
    assert getattr(job, TIME_FIELDS[new]) is not None
    assert getattr(job, TIME_FIELDS[new]) == job.history().last().time
    others = set(TIME_FIELDS.values()) - {TIME_FIELDS[new]}
    assert all(getattr(job, f) is None for f in others)


def test_apply_sets_extra_fields_with_the_change(db):
    job = job_in(S.SUBMITTING)
    transitions.apply(job.pk, S.SUBMITTED, "agent", extra={"remote_job_id": "4242"})
    job.refresh_from_db()
    assert (job.status, job.remote_job_id) == (S.SUBMITTED, "4242")


def test_decide_chooses_the_target_from_the_state_the_job_is_in(db):
    job = job_in(S.RUNNING)
    seen = []

    def decide(old):
        seen.append(old)
        return S.CANCELLING

    assert transitions.apply(job.pk, None, "django", decide=decide) == (True, S.RUNNING)
    assert seen == [S.RUNNING]
    assert transitions.apply(job.pk, None, "django", decide=lambda old: None) == \
        (False, S.CANCELLING)


def test_apply_re_decides_when_another_writer_got_there_first(db):
    """The compare-and-set fails if the state changed after it was read."""
    job = job_in(S.RUNNING)
    decisions = []

    def decide(old):
        decisions.append(old)
        if len(decisions) == 1:  # another writer finishes the job meanwhile
            HpcJob.objects.filter(pk=job.pk).update(job_status=int(S.COMPLETED))
        return S.CANCELLING if old == S.RUNNING else None

    assert transitions.apply(job.pk, None, "django", decide=decide) == (False, S.COMPLETED)
    assert decisions == [S.RUNNING, S.COMPLETED]
    job.refresh_from_db()
    assert job.status == S.COMPLETED and history(job.pk) == []


def _race(job_id, moves):
    """Run ``moves`` (target, source) at once on threads; return their results."""
    barrier = threading.Barrier(len(moves))
    results, errors = [None] * len(moves), []

    def run(i, target, source):
        try:
            barrier.wait(timeout=10)
            results[i] = transitions.apply(job_id, target, source)
        except Exception as e:  # reported below, on the test's thread
            errors.append(e)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i, *move)) for i, move in enumerate(moves)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    return results


def _needs_a_shared_database():
    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        pytest.skip("threads do not share an in-memory SQLite database")


def test_racing_cancelling_and_completed_never_records_an_impossible_step(transactional_db):
    _needs_a_shared_database()
    for _ in range(15):
        job = job_in(S.RUNNING)
        _race(job.pk, [(S.CANCELLING, "django"), (S.COMPLETED, "agent")])
        steps = history(job.pk)
        assert [(old, new) for old, new, _, _ in steps] in (
            [(S.RUNNING, S.CANCELLING), (S.CANCELLING, S.COMPLETED)],
            [(S.RUNNING, S.COMPLETED)])
        job.refresh_from_db()
        assert job.status == S.COMPLETED


def test_of_two_racing_ends_exactly_one_wins(transactional_db):
    _needs_a_shared_database()
    for _ in range(15):
        job = job_in(S.CANCELLING)
        results = _race(job.pk, [(S.CANCELLED, "agent"), (S.COMPLETED, "hpcd"),
                                 (S.ERROR, "agent")])
        assert sorted(applied for applied, _ in results) == [False, False, True]
        (step,) = history(job.pk)
        job.refresh_from_db()
        assert step[0] == S.CANCELLING and step[1] == job.status
        assert can_transition(step[0], step[1])


# -- the job API ------------------------------------------------------------------

def test_submit_makes_a_draft_job_pending_with_its_parameters(db):
    job = HpcJob.objects.create()
    assert job.submit({"script": "echo hi"}) == S.PENDING
    job.refresh_from_db()
    assert (job.status, job.job_parameters, job.cluster) == (S.PENDING, {"script": "echo hi"},
                                                             None)
    assert job.job_pending_time is not None
    assert history(job.pk) == [(S.DRAFT, S.PENDING, "django", "")]


def test_submit_of_an_unsaved_job_saves_it(db):
    job = HpcJob()
    job.submit({"script": "true"})
    assert job.pk is not None and HpcJob.objects.get(pk=job.pk).status == S.PENDING


def test_submit_chooses_an_online_cluster(db):
    HpcCluster.objects.create(host_name="offline", client_path="/a", online=False)
    online = HpcCluster.objects.create(host_name="online", client_path="/b", online=True)
    job = HpcJob.objects.create()
    job.submit({"script": "true"})
    job.refresh_from_db()
    assert job.cluster == online


@pytest.mark.parametrize("status", [S.PENDING, S.RUNNING, S.COMPLETED, S.CANCELLED])
def test_submit_of_a_job_that_is_not_a_draft_raises_job_state_error(db, status):
    job = job_in(status)
    with pytest.raises(JobStateError, match="only a DRAFT job"):
        job.submit({"script": "true"})
    job.refresh_from_db()
    assert job.status == status and job.job_parameters is None


def test_submit_notifies_hpcd_after_commit_and_survives_its_absence(
        db, django_capture_on_commit_callbacks):
    job = HpcJob.objects.create()
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        job.submit({"script": "true"})
    assert len(callbacks) == 1  # the notification, which failed quietly
    assert HpcJob.objects.get(pk=job.pk).status == S.PENDING


@pytest.mark.parametrize("status", [S.DRAFT, S.PENDING])
def test_cancel_of_a_job_never_sent_is_cancelled_at_once(db, status):
    job = job_in(status)
    assert job.cancel() == S.CANCELLED
    assert job.job_finished_time is not None
    assert history(job.pk) == [(status, S.CANCELLED, "django", "")]


@pytest.mark.parametrize("status", [S.SUBMITTING, S.SUBMITTED, S.QUEUED, S.RUNNING])
def test_cancel_of_a_sent_job_waits_for_the_cluster(db, status):
    job = job_in(status)
    assert job.cancel() == S.CANCELLING


@pytest.mark.parametrize("status", [S.CANCELLING, S.CANCELLED])
def test_cancel_twice_is_harmless(db, status):
    job = job_in(status)
    assert job.cancel() == status
    assert history(job.pk) == []


@pytest.mark.parametrize("status", [S.COMPLETED, S.ERROR, S.DELETED])
def test_cancel_of_a_finished_job_raises_job_state_error(db, status):
    with pytest.raises(JobStateError, match="cannot be cancelled"):
        job_in(status).cancel()


def test_delete_of_a_draft_is_deleted_at_once(db):
    job = HpcJob.objects.create()
    assert job.delete_job() == S.DELETED
    assert history(job.pk) == [(S.DRAFT, S.DELETED, "django", "")]


@pytest.mark.parametrize("status", [S.COMPLETED, S.ERROR, S.CANCELLED,
                                    S.WALL_TIME_EXCEEDED, S.OUT_OF_MEMORY])
def test_delete_of_a_finished_job_waits_for_the_cluster(db, status):
    assert job_in(status).delete_job() == S.DELETING


@pytest.mark.parametrize("status", [S.PENDING, S.RUNNING, S.CANCELLING])
def test_delete_of_an_unfinished_job_raises_job_state_error(db, status):
    job = job_in(status)
    with pytest.raises(JobStateError, match="cancel it first"):
        job.delete_job()
    job.refresh_from_db()
    assert job.status == status


@pytest.mark.parametrize("status", [S.DELETING, S.DELETED])
def test_delete_twice_is_harmless(db, status):
    assert job_in(status).delete_job() == status
