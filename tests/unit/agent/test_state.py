"""The agent's durable state: jobs and the outbox (hpc_agent.state, SQLite in a temp file)."""

import os
import sqlite3

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from hpc_agent.mounts import file_system_type, journal_mode
from hpc_agent.state import AgentState, JobExists, _write_batch_thd, is_final
from hpc_agent.status import JobStatus as S


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        self.now += 1.0
        return self.now


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "state.sqlite3")


@pytest.fixture
def state(path):
    s = AgentState(path, clock=FakeClock())
    yield s
    s.close()


def statuses(state):
    return [(u["job"], S(u["status"])) for u in state.pending_updates()]


def test_record_submitting_writes_the_job_but_no_update(state):
    state.record_submitting(7, {"script": "true"})
    job = state.get(7)
    assert (job.job, job.status, job.scheduler_id, job.parameters) == \
        (7, S.SUBMITTING, None, {"script": "true"})
    assert state.outbox_size() == 0


def test_recording_a_job_twice_is_refused(state):
    state.record_submitting(7, {})
    with pytest.raises(JobExists):
        state.record_submitting(7, {})
    assert state.get(7).status == S.SUBMITTING


def test_status_changes_go_to_the_outbox_in_order_with_increasing_seqs(state):
    state.record_submitting(7, {"script": "true"})
    seqs = [state.set_status(7, S.SUBMITTED, scheduler_id="42"),
            state.set_status(7, S.RUNNING),
            state.set_status(7, S.COMPLETED, "done")]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    updates = state.pending_updates()
    assert [u["seq"] for u in updates] == seqs
    assert [(S(u["status"]), u["detail"], u["scheduler_id"]) for u in updates] == [
        (S.SUBMITTED, "", "42"), (S.RUNNING, "", "42"), (S.COMPLETED, "done", "42")]
    assert [u["at"] for u in updates] == sorted(u["at"] for u in updates)
    job = state.get(7)
    assert (job.status, job.detail, job.scheduler_id) == (S.COMPLETED, "done", "42")


def test_updates_have_exactly_the_wire_update_fields(state):
    from hpc_agent import wire

    state.record_submitting(7, {})
    state.set_status(7, S.SUBMITTED, scheduler_id="42")
    (update,) = state.pending_updates()
    assert wire.decode(wire.encode("update", **update))["job"] == 7


def test_set_status_without_a_change_writes_nothing(state):
    state.record_submitting(7, {})
    assert state.set_status(7, S.SUBMITTED, "", "42") is not None
    assert state.set_status(7, S.SUBMITTED, "", "42") is None
    assert state.set_status(7, S.SUBMITTED, "") is None  # scheduler id kept from before
    assert state.outbox_size() == 1


def test_a_new_detail_in_the_same_state_is_an_update(state):
    state.record_submitting(7, {})
    state.set_status(7, S.QUEUED, "waiting for resources")
    assert state.set_status(7, S.QUEUED, "waiting for priority") is not None
    assert [u["detail"] for u in state.pending_updates()] == [
        "waiting for resources", "waiting for priority"]


@pytest.mark.parametrize("old,new", [
    (S.COMPLETED, S.RUNNING), (S.RUNNING, S.QUEUED), (S.CANCELLED, S.COMPLETED),
    (S.CANCELLING, S.RUNNING), (S.SUBMITTED, S.SUBMITTING),
])
def test_set_status_refuses_transitions_the_table_forbids(state, old, new):
    state.set_status(7, old)
    before = state.outbox_size()
    assert state.set_status(7, new, "late report") is None
    assert state.get(7).status == old
    assert state.outbox_size() == before


def test_acknowledged_updates_leave_the_outbox_and_others_stay(state):
    state.record_submitting(7, {})
    a = state.set_status(7, S.SUBMITTED, scheduler_id="1")
    b = state.set_status(7, S.RUNNING)
    c = state.set_status(7, S.COMPLETED)
    state.acknowledge([a, c, 999])  # an unknown seq is harmless
    assert [u["seq"] for u in state.pending_updates()] == [b]
    state.acknowledge([b])
    assert state.outbox_size() == 0 and state.pending_updates() == []


def test_pending_updates_pages_with_after_and_limit(state):
    seqs = [state.set_status(job, S.CANCELLED) for job in range(1, 8)]
    first = state.pending_updates(limit=3)
    assert [u["seq"] for u in first] == seqs[:3]
    rest = state.pending_updates(after=first[-1]["seq"], limit=3)
    assert [u["seq"] for u in rest] == seqs[3:6]
    assert [u["seq"] for u in state.pending_updates(after=rest[-1]["seq"])] == seqs[6:]
    assert state.pending_updates(after=seqs[-1]) == []


def test_seqs_are_never_reused_after_acknowledgement(state):
    a = state.set_status(1, S.CANCELLED)
    state.acknowledge([a])
    assert state.set_status(2, S.CANCELLED) > a


def test_state_survives_closing_and_reopening_the_file(path):
    s = AgentState(path)
    s.record_submitting(7, {"script": "echo hi"})
    s.set_status(7, S.SUBMITTED, scheduler_id="42")
    s.set_status(8, S.CANCELLED, "cancelled before submission")
    s.set_meta("resume", "token")
    seq = s.set_status(7, S.RUNNING)
    s.close()
    again = AgentState(path)
    try:
        assert (again.get(7).status, again.get(7).scheduler_id, again.get(7).parameters) == \
            (S.RUNNING, "42", {"script": "echo hi"})
        assert [(u["job"], S(u["status"])) for u in again.pending_updates()] == [
            (7, S.SUBMITTED), (8, S.CANCELLED), (7, S.RUNNING)]
        assert again.get_meta("resume") == "token"
        assert again.set_status(7, S.COMPLETED) > seq
    finally:
        again.close()


def test_set_status_for_an_unknown_job_creates_a_tombstone(state):
    seq = state.set_status(99, S.CANCELLED, "cancelled before submission")
    assert seq is not None
    job = state.get(99)
    assert (job.status, job.detail, job.scheduler_id, job.parameters) == \
        (S.CANCELLED, "cancelled before submission", None, None)
    assert statuses(state) == [(99, S.CANCELLED)]


def test_active_jobs_lists_only_unfinished_jobs_in_job_order(state):
    state.record_submitting(3, {})
    state.set_status(1, S.RUNNING, scheduler_id="a")
    state.set_status(2, S.COMPLETED)
    state.set_status(4, S.CANCELLING)
    state.set_status(5, S.DELETED)
    assert [(j.job, j.status) for j in state.active_jobs()] == [
        (1, S.RUNNING), (3, S.SUBMITTING), (4, S.CANCELLING)]


def test_get_of_an_unknown_job_is_none(state):
    assert state.get(12345) is None


def test_meta_values_default_and_replace(state):
    assert state.get_meta("x", "default") == "default"
    state.set_meta("x", "1")
    state.set_meta("x", "2")
    assert state.get_meta("x") == "2"


def test_a_failed_batch_leaves_nothing_behind(path, state):
    state.record_submitting(7, {})
    db = sqlite3.connect(path, isolation_level=None)
    row = (7, None, int(S.RUNNING), "", "{}", 0.0, 0.0)
    with pytest.raises(ValueError, match="unknown state write"):
        _write_batch_thd(db, [("job", row), ("outbox", (1, 7, int(S.RUNNING), "", 0.0, None)),
                              ("no such write", ())])
    db.close()
    again = AgentState(path)
    try:
        assert again.get(7).status == S.SUBMITTING and again.outbox_size() == 0
    finally:
        again.close()


@pytest.mark.parametrize("status,final", [
    (S.COMPLETED, True), (S.ERROR, True), (S.CANCELLED, True), (S.DELETED, True),
    (S.DELETING, False), (S.RUNNING, False), (S.CANCELLING, False),
])
def test_is_final_says_when_polling_stops(status, final):
    assert is_final(status) is final


def test_deleted_jobs_are_forgotten_after_a_week_but_not_before_hpcd_knows(tmp_path):
    from hpc_agent.state import AgentState
    from hpc_agent.status import JobStatus

    now = [1000.0]
    state = AgentState(str(tmp_path / "s.sqlite3"), clock=lambda: now[0])
    state.record_submitting(1, {"script": "true"})
    state.set_status(1, JobStatus.COMPLETED)
    state.set_status(1, JobStatus.DELETING)
    state.set_status(1, JobStatus.DELETED)
    state.record_submitting(2, {"script": "true"})
    now[0] += 8 * 86400
    assert state.prune().result == 0  # DELETED not yet acknowledged: still in the outbox
    state.acknowledge([u["seq"] for u in state.pending_updates()])
    assert state.prune().result == 1
    assert state.get(1) is None and state.get(2) is not None


# -- the writer: group commits off the reactor thread -----------------------------

class HeldWriter:
    """Stands in for the writer thread: batches wait in ``runs`` until the test
    commits them (``commit``) or makes them fail (``fail``); ``later`` is a Clock."""

    def __init__(self):
        self.clock = Clock()
        self.runs = []  # [(function, args, Deferred)]

    def run(self, f, *args):
        d = defer.Deferred()
        self.runs.append((f, args, d))
        return d

    def later(self, delay, f):
        return self.clock.callLater(delay, f)

    def ops(self, i=0):
        return [op[0] for op in self.runs[i][1][1]]

    def commit(self):
        f, args, d = self.runs.pop(0)
        d.callback(f(*args))

    def fail(self):
        _, _, d = self.runs.pop(0)
        d.errback(OSError(28, "No space left on device"))


@pytest.fixture
def writer():
    return HeldWriter()


@pytest.fixture(params=["WAL", "TRUNCATE"])
def deferred_state(path, writer, request):
    """With the local file system's journal and the network one's."""
    s = AgentState(path, clock=FakeClock(), writer=writer, journal=request.param)
    yield s
    s.close()


def stored(path, sql="SELECT job, status FROM jobs ORDER BY job"):
    """What another connection (a crash's survivor) finds in the file."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_with_a_writer_nothing_is_committed_on_the_calling_thread(path, deferred_state, writer):
    deferred_state.record_submitting(7, {"script": "true"})
    deferred_state.set_status(8, S.CANCELLED)
    assert writer.runs == [] and stored(path) == []
    writer.clock.advance(0)
    assert len(writer.runs) == 1 and stored(path) == []
    writer.commit()
    assert stored(path) == [(7, int(S.SUBMITTING)), (8, int(S.CANCELLED))]


def test_reads_see_a_change_before_it_is_durable(deferred_state, writer):
    deferred_state.record_submitting(7, {"script": "true"})
    deferred_state.set_status(7, S.SUBMITTED, scheduler_id="42")
    deferred_state.set_status(8, S.COMPLETED)
    job = deferred_state.get(7)
    assert (job.status, job.scheduler_id, job.parameters) == (S.SUBMITTED, "42",
                                                              {"script": "true"})
    assert [j.job for j in deferred_state.active_jobs()] == [7]
    assert deferred_state.set_status(7, S.SUBMITTING) is None  # the table applies too
    assert deferred_state.outbox_size() == 2
    assert dict(deferred_state.counts()) == {S.SUBMITTED: 1, S.COMPLETED: 1}


def test_the_changes_of_one_turn_are_committed_in_one_batch(path, deferred_state, writer):
    for job in range(1, 101):
        deferred_state.set_status(job, S.CANCELLED)
    writer.clock.advance(0)
    assert len(writer.runs) == 1
    assert writer.ops().count("outbox") == 100
    writer.commit()
    assert len(stored(path)) == 100 and writer.runs == []


def test_changes_made_while_a_batch_commits_gather_into_the_next(path, deferred_state, writer):
    deferred_state.set_status(1, S.CANCELLED)
    writer.clock.advance(0)
    for job in range(2, 52):
        deferred_state.set_status(job, S.CANCELLED)
    writer.clock.advance(0)
    assert len(writer.runs) == 1  # one batch at a time
    writer.commit()
    writer.clock.advance(0)
    assert len(writer.runs) == 1 and writer.ops().count("outbox") == 50
    writer.commit()
    assert len(stored(path)) == 51


def test_record_submitting_fires_only_once_the_record_is_durable(path, deferred_state, writer):
    d = deferred_state.record_submitting(7, {"script": "true"})
    writer.clock.advance(0)
    assert not d.called and stored(path) == []
    writer.commit()
    assert d.called and stored(path) == [(7, int(S.SUBMITTING))]


def test_only_durable_updates_are_offered_for_sending(deferred_state, writer):
    durable = []
    deferred_state.on_durable = lambda: durable.append(len(deferred_state.pending_updates()))
    seq = deferred_state.set_status(7, S.CANCELLED)
    assert deferred_state.pending_updates() == [] and deferred_state.updates([seq]) == []
    writer.clock.advance(0)
    assert deferred_state.pending_updates() == [] and durable == []
    writer.commit()
    assert [u["seq"] for u in deferred_state.pending_updates()] == [seq]
    assert [u["seq"] for u in deferred_state.updates([seq, 999])] == [seq]
    assert durable == [1]


def test_when_durable_waits_for_everything_so_far(deferred_state, writer):
    assert deferred_state.when_durable().called  # nothing written yet
    deferred_state.set_status(7, S.CANCELLED)
    d = deferred_state.when_durable()
    writer.clock.advance(0)
    deferred_state.set_status(8, S.CANCELLED)  # after: not waited for
    writer.commit()
    assert d.called
    assert not deferred_state.when_durable().called


def test_an_acknowledged_update_is_not_offered_again_before_its_delete_commits(
        deferred_state, writer):
    a = deferred_state.set_status(7, S.CANCELLED)
    b = deferred_state.set_status(8, S.CANCELLED)
    writer.clock.advance(0)
    writer.commit()
    deferred_state.acknowledge([a])
    assert [u["seq"] for u in deferred_state.pending_updates()] == [b]
    assert deferred_state.updates([a, b]) == deferred_state.pending_updates()
    assert deferred_state.outbox_size() == 1
    writer.clock.advance(0)
    writer.commit()
    assert [u["seq"] for u in deferred_state.pending_updates()] == [b]


def test_a_failed_commit_is_retried_with_backoff_and_nothing_is_lost(path, deferred_state,
                                                                     writer):
    d = deferred_state.record_submitting(7, {"script": "true"})
    writer.clock.advance(0)
    writer.fail()
    deferred_state.set_status(8, S.CANCELLED)
    writer.clock.advance(0.9)
    assert writer.runs == []  # waits about a second
    writer.clock.advance(0.1)
    assert writer.ops() == ["job", "job", "outbox"]  # the failed batch and the new change
    writer.fail()
    writer.clock.advance(1.9)
    assert writer.runs == []  # then two
    writer.clock.advance(0.1)
    writer.commit()
    assert d.called and deferred_state.get(7).status == S.SUBMITTING
    assert stored(path) == [(7, int(S.SUBMITTING)), (8, int(S.CANCELLED))]
    assert len(deferred_state.pending_updates()) == 1


def test_a_crash_before_the_commit_loses_only_what_was_never_durable_or_sent(
        path, deferred_state, writer):
    deferred_state.record_submitting(7, {"script": "true"})
    writer.clock.advance(0)
    writer.commit()
    seq = deferred_state.set_status(7, S.SUBMITTED, scheduler_id="42")
    assert deferred_state.pending_updates() == []  # never sent: hpcd cannot have it
    writer.clock.advance(0)  # the agent dies while this batch commits
    again = AgentState(path)
    try:
        assert again.get(7).status == S.SUBMITTING and again.pending_updates() == []
        assert again.set_status(7, S.SUBMITTED, scheduler_id="42") >= seq
    finally:
        again.close()


def test_prune_runs_through_the_writer(deferred_state, writer):
    d = deferred_state.prune()
    writer.clock.advance(0)
    assert not d.called
    writer.commit()
    assert d.result == 0


# -- the journal -------------------------------------------------------------------

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 253:1 / / rw,relatime - ext4 /dev/vda rw
40 27 0:50 / /home rw,relatime - nfs4 server:/home rw,vers=4.2
41 40 0:51 / /home/local\\040disk rw,relatime - xfs /dev/vdb rw
42 27 0:52 / /lustre rw - lustre 10.0.0.1@tcp:/fs rw
"""


@pytest.mark.parametrize("where,kind", [
    ("/var/agent", "ext4"), ("/home/u/agent", "nfs4"), ("/home/local disk/agent", "xfs"),
    ("/lustre/project/agent", "lustre"), ("/", "ext4"), ("/homer", "ext4"),
])
def test_the_file_system_of_a_path_is_its_longest_mount(tmp_path, monkeypatch, where, kind):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    monkeypatch.setattr(os.path, "realpath", lambda p: p)
    assert file_system_type(where, str(info)) == kind


def test_wal_on_a_local_file_system_and_a_rollback_journal_on_a_network_one(tmp_path,
                                                                           monkeypatch):
    import hpc_agent.mounts as module

    assert journal_mode(str(tmp_path / "state.sqlite3")) == "WAL"
    monkeypatch.setattr(module, "file_system_type", lambda path: "nfs4")
    assert journal_mode(str(tmp_path / "state.sqlite3")) == "TRUNCATE"
    s = AgentState(str(tmp_path / "state.sqlite3"))
    try:
        assert s.journal == "TRUNCATE"
        assert s._db.execute("PRAGMA journal_mode").fetchone() == ("truncate",)
    finally:
        s.close()
