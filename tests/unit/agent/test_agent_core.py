"""The agent's logic without sockets: AgentCore and its Poller (hpc_agent.agent).

Driven with a recording ``send``, a ``twisted.internet.task.Clock`` and a
scripted scheduler; scheduler work runs synchronously unless a test holds it.
"""

import inspect
import platform

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from hpc_agent import __version__, wire
from hpc_agent.agent import RESEND_SECONDS, SUBMIT_ATTEMPTS, AgentCore
from hpc_agent.config import AgentSettings
from hpc_agent.schedulers.base import InvalidParameters, JobState, Scheduler, SchedulerError
from hpc_agent.state import AgentState
from hpc_agent.status import JobStatus as S


class FakeScheduler(Scheduler):
    """Records calls and answers from a script the test sets (class attributes,
    since the agent makes one instance per job)."""

    poll_fast_seconds = 1.0
    poll_slow_seconds = 8.0
    rate_limited = True

    calls = None  # [(name, ...)], reset per test by the ``script`` fixture
    submit_results = None  # job -> [scheduler id or exception to raise], in order
    on_submit = None  # called with the job id inside submit()
    states = None  # job -> JobState, for status_many
    found = None  # what find_submitted answers (a dict, or None: cannot tell)
    cancel_error = None
    clock = None

    def submit(self, job_parameters):
        FakeScheduler.calls.append(("submit", self.ui_id, job_parameters))
        if FakeScheduler.on_submit is not None:
            FakeScheduler.on_submit(self.ui_id)
        results = FakeScheduler.submit_results.get(self.ui_id)
        result = results.pop(0) if results else f"sched-{self.ui_id}"
        if isinstance(result, Exception):
            raise result
        return result

    def status(self):
        raise AssertionError("the agent must use status_many")

    def cancel(self):
        FakeScheduler.calls.append(("cancel", self.ui_id, self.job_id))
        if FakeScheduler.cancel_error is not None:
            raise FakeScheduler.cancel_error

    def delete_data(self):
        FakeScheduler.calls.append(("delete_data", self.ui_id, self.job_id))

    def file_send_start(self, file_path, extra_params=None):
        FakeScheduler.calls.append(("file_send_start", self.ui_id, file_path))
        return file_path, False

    def file_send_end(self, file_path, extra_params=None):
        FakeScheduler.calls.append(("file_send_end", self.ui_id, file_path))

    @classmethod
    def status_many(cls, settings, jobs):
        cls.calls.append(("status_many", cls.clock.seconds(), sorted(jobs)))
        return {ui_id: cls.states[ui_id] for ui_id, _ in jobs if ui_id in cls.states}

    @classmethod
    def find_submitted(cls, settings, ui_ids):
        cls.calls.append(("find_submitted", list(ui_ids)))
        if cls.found is None:
            return None
        return {k: v for k, v in cls.found.items() if k in ui_ids}


class UnlimitedFakeScheduler(FakeScheduler):
    rate_limited = False


FAKE = f"{__name__}.FakeScheduler"


class SyncCore(AgentCore):
    """Runs "thread" work at once, or holds it in ``held`` until ``release()``."""

    held = None

    def in_thread(self, f, *args, **kwargs):
        if self.held is not None:
            d = defer.Deferred()
            self.held.append((d, f, args, kwargs))
            return d
        return defer.maybeDeferred(f, *args, **kwargs)

    def release(self):
        d, f, args, kwargs = self.held.pop(0)
        defer.maybeDeferred(f, *args, **kwargs).chainDeferred(d)


class Agent:
    """An AgentCore wired to a recording send, a Clock and a temp directory."""

    def __init__(self, tmp_path, **overrides):
        self.clock = Clock()
        self.clock.advance(1000)
        FakeScheduler.clock = self.clock
        settings = {"HPC_SCHEDULER_CLASS": FAKE,
                    "HPC_JOB_WORKING_DIRECTORY": str(tmp_path / "jobs"), **overrides}
        self.settings = AgentSettings(str(tmp_path), settings)
        self.state = AgentState(str(tmp_path / "state.sqlite3"), clock=self.clock.seconds)
        self.transfers = []
        self.core = SyncCore(self.settings, self.state, self.clock, None, self._transfer,
                             nvx=True)
        self.sent = []
        self._ids = iter(range(1, 10 ** 6))

    def _transfer(self, token, handle, name, size):
        d = defer.Deferred()
        self.transfers.append((token, handle, name, size, d))
        return d

    def connect(self, welcome=True):
        self.core.connected(self.sent.append)
        if welcome:
            self.receive("welcome", protocol=wire.PROTOCOL_VERSION, cluster="7",
                         resume_token="resume-1")

    def receive(self, mtype, **fields):
        self.core.frame_received(wire.encode(mtype, **fields))

    def request(self, mtype, **fields):
        """Send a request; return its id."""
        request_id = next(self._ids)
        self.receive(mtype, id=request_id, **fields)
        return request_id

    def ask(self, mtype, **fields):
        """Send a request that completes at once; return its reply."""
        request_id = self.request(mtype, **fields)
        return self.reply(request_id)

    def frames(self):
        return [wire.decode(f, accept=wire.FROM_AGENT) for f in self.sent]

    def replies(self):
        return [f for f in self.frames() if f["type"] == "reply"]

    def reply(self, request_id):
        (reply,) = [r for r in self.replies() if r["id"] == request_id]
        return reply

    def updates(self):
        return [(f["job"], S(f["status"])) for f in self.frames() if f["type"] == "update"]

    def outbox(self):
        return [(u["job"], S(u["status"])) for u in self.state.pending_updates()]

    def calls(self, name=None):
        return [c for c in FakeScheduler.calls if name is None or c[0] == name]


@pytest.fixture(autouse=True)
def script():
    FakeScheduler.calls = []
    FakeScheduler.submit_results = {}
    FakeScheduler.on_submit = None
    FakeScheduler.states = {}
    FakeScheduler.found = {}
    FakeScheduler.cancel_error = None
    yield
    FakeScheduler.calls = FakeScheduler.clock = None


@pytest.fixture
def agent(tmp_path):
    a = Agent(tmp_path)
    yield a
    a.core.poller.stop()
    a.state.close()


PARAMS = {"script": "echo hi"}


# -- the fake itself ------------------------------------------------------------

def test_the_fake_scheduler_keeps_the_real_interface():
    for name, member in vars(FakeScheduler).items():
        real = getattr(Scheduler, name, None)
        if callable(real) and not name.startswith("_"):
            assert inspect.signature(getattr(FakeScheduler, name)) == \
                inspect.signature(getattr(Scheduler, name)), name


def test_the_settings_name_the_fake_and_the_core_uses_it(agent):
    assert agent.settings.scheduler_class() is FakeScheduler
    assert agent.core.scheduler_class is FakeScheduler


# -- connection -----------------------------------------------------------------

def test_hello_is_sent_on_connect(agent):
    agent.connect(welcome=False)
    assert agent.frames() == [{"type": "hello", "protocol": wire.PROTOCOL_VERSION,
                               "agent_version": __version__, "scheduler": FAKE,
                               "hostname": platform.node(), "nvx": True}]


def test_no_update_is_sent_before_welcome(agent):
    agent.connect(welcome=False)
    agent.state.set_status(5, S.CANCELLED)
    agent.core.flush()
    assert [f["type"] for f in agent.frames()] == ["hello"]


def test_welcome_stores_the_resume_token_and_sends_the_outbox_in_order(agent):
    a = agent.state.set_status(5, S.CANCELLED, "x")
    b = agent.state.set_status(6, S.DELETED)
    agent.connect()
    assert agent.core.resume_token == "resume-1"
    updates = [f for f in agent.frames() if f["type"] == "update"]
    assert [(u["seq"], u["job"], S(u["status"]), u["detail"]) for u in updates] == [
        (a, 5, S.CANCELLED, "x"), (b, 6, S.DELETED, "")]


def test_after_a_reconnect_every_unacknowledged_update_is_sent_again(agent):
    agent.state.set_status(5, S.CANCELLED)
    agent.connect()
    agent.core.lost()
    agent.core.flush()
    assert agent.updates() == [(5, S.CANCELLED)]  # nothing sent while disconnected
    agent.sent.clear()
    agent.connect()
    assert agent.updates() == [(5, S.CANCELLED)]


def test_an_ack_removes_updates_from_the_outbox(agent):
    agent.connect()
    agent.ask("submit", job=5, parameters=PARAMS)
    seqs = [u["seq"] for u in agent.state.pending_updates()]
    assert seqs
    agent.receive("ack", seqs=seqs)
    assert agent.state.outbox_size() == 0


def test_unacknowledged_updates_are_sent_again_after_the_resend_delay(agent):
    agent.connect()
    agent.state.set_status(5, S.CANCELLED)
    agent.core.flush()
    agent.core.flush()
    assert agent.updates() == [(5, S.CANCELLED)]
    agent.clock.advance(RESEND_SECONDS - 1)
    agent.core.flush()
    assert agent.updates() == [(5, S.CANCELLED)]
    agent.clock.advance(2)
    agent.core.flush()
    assert agent.updates() == [(5, S.CANCELLED)] * 2
    agent.receive("ack", seqs=[u["seq"] for u in agent.state.pending_updates()])
    agent.clock.advance(RESEND_SECONDS + 1)
    agent.core.flush()
    assert agent.updates() == [(5, S.CANCELLED)] * 2


def test_an_unacknowledged_update_is_resent_even_while_others_are_acknowledged(agent):
    agent.connect()
    agent.state.set_status(1, S.CANCELLED)  # hpcd's write of this one fails: no ack
    agent.core.flush()
    for job in range(2, 12):  # steady traffic, each update acknowledged
        agent.clock.advance(10)
        seq = agent.state.set_status(job, S.CANCELLED)
        agent.core.flush()
        agent.receive("ack", seqs=[seq])
    assert agent.updates().count((1, S.CANCELLED)) >= 2


# -- malformed input --------------------------------------------------------------

@pytest.mark.parametrize("payload,expected", [
    (b"not json", {"type": "error", "code": "bad_frame"}),
    (b'{"type": "hello", "protocol": 1}', {"type": "error", "code": "unknown_type"}),
    (b'{"type": "submit", "id": 9, "parameters": {}}',
     {"type": "reply", "id": 9, "ok": False, "error": "bad_field"}),
    (b'{"type": "cancel", "id": 3, "job": "5"}',
     {"type": "reply", "id": 3, "ok": False, "error": "bad_field"}),
    (b'{"type": "ack", "seqs": "all"}', {"type": "error", "code": "bad_field"}),
])
def test_a_malformed_frame_gets_one_error_answer_and_nothing_else_happens(
        agent, payload, expected):
    agent.connect()
    agent.state.set_status(5, S.RUNNING, scheduler_id="s5")
    before = (agent.outbox(), len(agent.sent))
    agent.core.frame_received(payload)
    (answer,) = agent.frames()[before[1]:]
    assert {k: answer[k] for k in expected} == expected
    assert agent.outbox() == before[0]
    assert agent.calls() == []


def test_frames_keep_being_handled_after_a_malformed_one(agent):
    agent.connect()
    agent.core.frame_received(b"\xff\xfe")
    assert agent.ask("cancel", job=5)["ok"] is True


def test_an_exception_in_a_handler_is_answered_and_the_agent_carries_on(agent):
    agent.connect()
    agent.state.set_status(5, S.RUNNING, scheduler_id="s5")
    FakeScheduler.cancel_error = RuntimeError("scheduler exploded")
    reply = agent.ask("cancel", job=5)
    assert (reply["ok"], reply["error"]) == (False, "internal")
    assert "scheduler exploded" in reply["message"]
    FakeScheduler.cancel_error = None
    assert agent.ask("cancel", job=6)["result"] == {"status": int(S.CANCELLED)}


# -- submit -----------------------------------------------------------------------

def test_a_submit_is_recorded_before_the_scheduler_is_called(agent):
    seen = []

    def check(job_id):
        job = agent.state.get(job_id)
        seen.append((job.status, job.scheduler_id, job.parameters))

    FakeScheduler.on_submit = check
    agent.connect()
    reply = agent.ask("submit", job=5, parameters=PARAMS)
    assert seen == [(S.SUBMITTING, None, PARAMS)]
    assert reply == {"type": "reply", "id": reply["id"], "ok": True,
                     "result": {"scheduler_id": "sched-5", "status": int(S.SUBMITTED)}}
    assert agent.updates() == [(5, S.SUBMITTED)]
    (update,) = [f for f in agent.frames() if f["type"] == "update"]
    assert update["scheduler_id"] == "sched-5"


def test_a_repeated_submit_is_answered_from_records_without_submitting_again(agent):
    agent.connect()
    first = agent.ask("submit", job=5, parameters=PARAMS)
    again = agent.ask("submit", job=5, parameters=PARAMS)
    assert again["result"] == first["result"]
    assert len(agent.calls("submit")) == 1
    assert agent.updates() == [(5, S.SUBMITTED)]


def test_a_job_recorded_submitting_and_found_by_the_scheduler_is_not_resubmitted(agent):
    agent.state.record_submitting(5, PARAMS)  # the agent died inside submit()
    FakeScheduler.found = {5: "77"}
    agent.connect()
    reply = agent.ask("submit", job=5, parameters=PARAMS)
    assert reply["result"] == {"scheduler_id": "77", "status": int(S.SUBMITTED)}
    assert agent.calls("submit") == []
    assert agent.calls("find_submitted") == [("find_submitted", [5])]


def test_a_job_recorded_submitting_and_not_found_is_submitted(agent):
    agent.state.record_submitting(5, PARAMS)
    FakeScheduler.found = {}
    agent.connect()
    reply = agent.ask("submit", job=5, parameters={"script": "ignored: the record wins"})
    assert reply["result"] == {"scheduler_id": "sched-5", "status": int(S.SUBMITTED)}
    assert agent.calls("submit") == [("submit", 5, PARAMS)]


def test_a_job_recorded_submitting_that_the_scheduler_cannot_find_is_an_error(agent):
    agent.state.record_submitting(5, PARAMS)
    FakeScheduler.found = None  # this scheduler cannot tell
    agent.connect()
    reply = agent.ask("submit", job=5, parameters=PARAMS)
    assert reply["result"] == {"scheduler_id": None, "status": int(S.ERROR)}
    assert agent.calls("submit") == []
    assert "not resubmitted" in agent.state.get(5).detail


def test_reconcile_at_start_settles_interrupted_submissions(agent):
    agent.state.record_submitting(5, PARAMS)
    agent.state.record_submitting(6, PARAMS)
    agent.state.set_status(7, S.RUNNING, scheduler_id="s7")
    FakeScheduler.found = {5: "55"}
    d = agent.core.reconcile()
    assert d.called
    assert (agent.state.get(5).status, agent.state.get(5).scheduler_id) == (S.SUBMITTED, "55")
    assert (agent.state.get(6).status, agent.state.get(6).scheduler_id) == \
        (S.SUBMITTED, "sched-6")
    assert agent.calls("submit") == [("submit", 6, PARAMS)]
    assert agent.calls("find_submitted") == [("find_submitted", [5]), ("find_submitted", [6])]


def test_invalid_parameters_make_the_job_an_error_with_the_message(agent):
    agent.connect()
    FakeScheduler.submit_results[5] = [InvalidParameters("'queue' is not known here")]
    reply = agent.ask("submit", job=5, parameters=PARAMS)
    assert reply["result"] == {"scheduler_id": None, "status": int(S.ERROR)}
    (update,) = [f for f in agent.frames() if f["type"] == "update"]
    assert (S(update["status"]), update["detail"]) == \
        (S.ERROR, "refused at submission: 'queue' is not known here")


def test_an_unexpected_submit_failure_makes_the_job_an_error(agent):
    agent.connect()
    FakeScheduler.submit_results[5] = [OSError("sbatch: not found")]
    assert agent.ask("submit", job=5, parameters=PARAMS)["result"]["status"] == int(S.ERROR)
    assert "sbatch: not found" in agent.state.get(5).detail


def test_a_scheduler_error_is_retried_then_the_job_succeeds(agent):
    agent.connect()
    FakeScheduler.submit_results[5] = [SchedulerError("busy")]
    first = agent.ask("submit", job=5, parameters=PARAMS)
    assert first["result"] == {"scheduler_id": None, "status": int(S.SUBMITTING)}
    assert agent.updates() == []
    second = agent.ask("submit", job=5, parameters=PARAMS)
    assert second["result"] == {"scheduler_id": "sched-5", "status": int(S.SUBMITTED)}
    assert len(agent.calls("submit")) == 2


def test_a_refused_submit_is_retried_even_when_the_scheduler_cannot_find_jobs(agent):
    """find_submitted() is None (cannot tell), but this agent saw the attempt fail."""
    agent.connect()
    FakeScheduler.found = None
    FakeScheduler.submit_results[5] = [SchedulerError("busy")]
    agent.ask("submit", job=5, parameters=PARAMS)
    second = agent.ask("submit", job=5, parameters=PARAMS)
    assert second["result"] == {"scheduler_id": "sched-5", "status": int(S.SUBMITTED)}
    assert len(agent.calls("submit")) == 2


def test_a_scheduler_error_becomes_an_error_after_the_last_attempt(agent):
    agent.connect()
    FakeScheduler.submit_results[5] = [SchedulerError(f"down {i}")
                                       for i in range(SUBMIT_ATTEMPTS)]
    for _ in range(SUBMIT_ATTEMPTS - 1):
        reply = agent.ask("submit", job=5, parameters=PARAMS)
        assert reply["result"]["status"] == int(S.SUBMITTING)
    assert agent.updates() == []
    reply = agent.ask("submit", job=5, parameters=PARAMS)
    assert reply["result"] == {"scheduler_id": None, "status": int(S.ERROR)}
    assert agent.state.get(5).detail == \
        f"submission failed {SUBMIT_ATTEMPTS} times, last: down {SUBMIT_ATTEMPTS - 1}"
    assert len(agent.calls("submit")) == SUBMIT_ATTEMPTS


# -- cancel and delete ----------------------------------------------------------------

def test_cancel_of_an_unknown_job_leaves_a_cancelled_tombstone(agent):
    agent.connect()
    reply = agent.ask("cancel", job=5)
    assert reply["result"] == {"status": int(S.CANCELLED)}
    assert agent.updates() == [(5, S.CANCELLED)]
    assert agent.state.get(5).detail == "cancelled before submission"
    assert agent.calls() == []


def test_a_submit_after_a_cancel_is_answered_from_the_tombstone(agent):
    agent.connect()
    agent.ask("cancel", job=5)
    reply = agent.ask("submit", job=5, parameters=PARAMS)
    assert reply["result"] == {"scheduler_id": None, "status": int(S.CANCELLED)}
    assert agent.calls("submit") == []


def test_cancel_of_a_job_recorded_but_never_submitted_cancels_it_at_once(agent):
    agent.state.record_submitting(5, PARAMS)
    agent.connect()
    assert agent.ask("cancel", job=5)["result"] == {"status": int(S.CANCELLED)}
    assert agent.calls() == []


def test_cancel_of_a_running_job_asks_the_scheduler_and_polls_soon(agent):
    agent.state.set_status(5, S.RUNNING, scheduler_id="s5")
    agent.connect()
    reply = agent.ask("cancel", job=5)
    assert reply["result"] == {"status": int(S.CANCELLING)}
    assert agent.calls("cancel") == [("cancel", 5, "s5")]
    FakeScheduler.states[5] = JobState(S.CANCELLED, started=1.0)
    agent.clock.advance(agent.core.poller.fast)
    assert agent.state.get(5).status == S.CANCELLED


def test_cancel_of_a_finished_job_changes_nothing(agent):
    agent.state.set_status(5, S.COMPLETED, scheduler_id="s5")
    agent.connect()
    assert agent.ask("cancel", job=5)["result"] == {"status": int(S.COMPLETED)}
    assert agent.calls() == []


def test_delete_of_an_active_job_is_refused_with_job_active(agent):
    agent.state.set_status(5, S.RUNNING, scheduler_id="s5")
    agent.connect()
    reply = agent.ask("delete", job=5)
    assert (reply["ok"], reply["error"]) == (False, "job_active")
    assert "RUNNING" in reply["message"]
    assert agent.calls() == [] and agent.state.get(5).status == S.RUNNING


def test_delete_of_a_finished_job_removes_its_data_and_reports_deleted(agent):
    agent.state.set_status(5, S.COMPLETED, scheduler_id="s5")
    agent.connect()
    assert agent.ask("delete", job=5)["result"] == {"status": int(S.DELETED)}
    assert agent.calls() == [("delete_data", 5, "s5")]
    assert agent.outbox()[-2:] == [(5, S.DELETING), (5, S.DELETED)]
    assert agent.ask("delete", job=5)["result"] == {"status": int(S.DELETED)}


def test_delete_of_an_unknown_job_reports_deleted(agent):
    agent.connect()
    assert agent.ask("delete", job=5)["result"] == {"status": int(S.DELETED)}
    assert agent.calls() == [("delete_data", 5, None)]


# -- one job at a time ----------------------------------------------------------------

def test_requests_for_the_same_job_are_served_one_at_a_time_in_order(agent):
    agent.connect()
    agent.core.held = []
    submit_id = agent.request("submit", job=5, parameters=PARAMS)
    assert len(agent.core.held) == 1 and agent.calls() == []
    cancel_id = agent.request("cancel", job=5)
    assert len(agent.core.held) == 1  # the cancel waits for the submit
    other_id = agent.request("cancel", job=6)  # another job is not held up
    assert [r["id"] for r in agent.replies()] == [other_id]
    agent.core.release()  # the submit runs
    assert [r["id"] for r in agent.replies()] == [other_id, submit_id]
    assert len(agent.core.held) == 1  # now the cancel's scheduler call
    agent.core.release()
    assert [r["id"] for r in agent.replies()] == [other_id, submit_id, cancel_id]
    assert [c[0] for c in agent.calls()] == ["submit", "cancel"]
    assert agent.reply(cancel_id)["result"] == {"status": int(S.CANCELLING)}
    assert agent.core._locks == {}  # no lock left behind


# -- files --------------------------------------------------------------------------

def test_list_files_lists_inside_the_job_directory_and_refuses_outside(agent, tmp_path):
    job_dir = tmp_path / "jobs" / "5"
    job_dir.mkdir(parents=True)
    (job_dir / "out.txt").write_text("hello")
    agent.connect()
    reply = agent.ask("list_files", job=5, path="/", recursive=True)
    assert reply["result"] == {"files": [["out.txt", False, 5]]}
    refused = agent.ask("list_files", job=5, path="../../", recursive=True)
    assert (refused["ok"], refused["error"]) == (False, "path_refused")


def test_fetch_file_starts_a_transfer_with_the_token_and_calls_the_hooks(agent, tmp_path):
    job_dir = tmp_path / "jobs" / "5"
    job_dir.mkdir(parents=True)
    (job_dir / "out.txt").write_text("hello")
    agent.connect()
    reply = agent.ask("fetch_file", job=5, path="out.txt", token="tok")
    assert reply["result"] == {"size": 5}
    ((token, handle, name, size, done),) = agent.transfers
    assert (token, name, size, handle.read()) == ("tok", "out.txt", 5, b"hello")
    handle.close()
    path = str(job_dir / "out.txt")
    assert agent.calls() == [("file_send_start", 5, path)]
    done.callback(None)
    assert agent.calls() == [("file_send_start", 5, path), ("file_send_end", 5, path)]
    for bad in ("/", "../../state.sqlite3", "missing"):
        assert agent.ask("fetch_file", job=5, path=bad, token="t")["error"] == "path_refused"


def test_without_a_job_absolute_paths_inside_an_extra_root_are_served(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "r.csv").write_text("1,2")
    (tmp_path / "jobs" / "5").mkdir(parents=True)
    (tmp_path / "jobs" / "5" / "out.txt").write_text("hello")
    agent = Agent(tmp_path, HPC_ALLOWED_FILE_ROOTS=[str(tmp_path / "shared")])
    try:
        agent.connect()
        for path, size in ((tmp_path / "shared" / "r.csv", 3),
                           (tmp_path / "jobs" / "5" / "out.txt", 5)):
            assert agent.ask("fetch_file", job=None, path=str(path), token="t")["result"] == \
                {"size": size}
        refused = agent.ask("fetch_file", job=None, path="/etc/passwd", token="t")
        assert refused["error"] == "path_refused"
        for _, handle, *_ in agent.transfers:
            handle.close()
    finally:
        agent.state.close()


def test_without_a_job_or_extra_roots_an_absolute_path_in_the_working_directory_is_served(
        agent, tmp_path):
    (tmp_path / "jobs" / "5").mkdir(parents=True)
    (tmp_path / "jobs" / "5" / "out.txt").write_text("hello")
    agent.connect()
    path = str(tmp_path / "jobs" / "5" / "out.txt")
    listed = agent.ask("list_files", job=None, path=str(tmp_path / "jobs" / "5"),
                       recursive=False)
    reply = agent.ask("fetch_file", job=None, path=path, token="t")
    for _, handle, *_ in agent.transfers:
        handle.close()
    assert (listed.get("error"), reply.get("error")) == (None, None)
    assert listed["result"] == {"files": [["5/out.txt", False, 5]]}
    assert reply["result"] == {"size": 5}


# -- polling ------------------------------------------------------------------------

def test_poll_records_running_before_an_end_seen_in_one_poll(agent):
    agent.state.set_status(5, S.SUBMITTED, scheduler_id="s5")
    agent.state.set_status(6, S.QUEUED, scheduler_id="s6")
    agent.connect()
    FakeScheduler.states = {5: JobState(S.COMPLETED, started=1.0),
                            6: JobState(S.ERROR, "exit code 1")}  # never started
    assert agent.core.poll().result is True
    assert agent.updates() == [(5, S.SUBMITTED), (6, S.QUEUED),
                               (5, S.RUNNING), (5, S.COMPLETED), (6, S.ERROR)]


def test_poll_asks_once_for_every_job_with_a_scheduler_id(agent):
    agent.state.set_status(5, S.RUNNING, scheduler_id="s5")
    agent.state.set_status(6, S.QUEUED, scheduler_id="s6")
    agent.state.record_submitting(7, PARAMS)  # no scheduler id yet: not asked
    agent.state.set_status(8, S.COMPLETED, scheduler_id="s8")  # finished: not asked
    FakeScheduler.states = {5: JobState(S.RUNNING)}  # 6 undecided this time
    assert agent.core.poll().result is False
    assert agent.calls() == [("status_many", agent.clock.seconds(), [(5, "s5"), (6, "s6")])]


def test_a_stale_poll_result_never_moves_a_job_back(agent):
    agent.state.set_status(5, S.CANCELLING, scheduler_id="s5")
    FakeScheduler.states = {5: JobState(S.RUNNING)}
    assert agent.core.poll().result is False
    assert agent.state.get(5).status == S.CANCELLING


def test_poll_with_no_active_job_does_not_ask_the_scheduler(agent):
    assert agent.core.poll().result is False
    assert agent.calls() == []


def poll_times():
    return [c[1] for c in FakeScheduler.calls if c[0] == "status_many"]


def run_clock(agent, until, step=0.5):
    while agent.clock.seconds() < until:
        agent.clock.advance(step)


def test_the_poller_backs_off_from_fast_to_slow_and_kick_makes_it_fast_again(agent):
    t0 = agent.clock.seconds()
    agent.state.set_status(5, S.SUBMITTED, scheduler_id="s5")
    FakeScheduler.states = {5: JobState(S.RUNNING)}  # a change at the first poll only
    agent.core.poller.start()
    agent.clock.advance(0)
    run_clock(agent, t0 + 23.5)
    assert [t - t0 for t in poll_times()] == [0, 1, 3, 7, 15, 23]
    agent.core.poller.kick()  # at 23.5; the last poll was at 23 and fast is 1 s
    run_clock(agent, t0 + 40)
    assert [t - t0 for t in poll_times()][6:] == [24, 26, 30, 38]


def test_a_kick_right_after_a_poll_waits_for_the_fast_interval(agent):
    t0 = agent.clock.seconds()
    agent.state.set_status(5, S.RUNNING, scheduler_id="s5")
    FakeScheduler.states = {5: JobState(S.RUNNING)}
    agent.core.poller.start()
    agent.clock.advance(0)
    agent.core.poller.kick()
    agent.clock.advance(0.5)
    assert [t - t0 for t in poll_times()] == [0]
    agent.clock.advance(0.5)
    assert [t - t0 for t in poll_times()] == [0, 1]


def test_a_finished_job_is_reported_within_the_fast_interval_after_submit(agent):
    agent.connect()
    agent.core.poller.start()
    agent.clock.advance(0)
    run_clock(agent, agent.clock.seconds() + 30)  # idle: the poller is slow now
    agent.ask("submit", job=5, parameters=PARAMS)
    FakeScheduler.states = {5: JobState(S.COMPLETED, started=1.0)}
    agent.clock.advance(agent.core.poller.fast)
    assert agent.updates() == [(5, S.SUBMITTED), (5, S.RUNNING), (5, S.COMPLETED)]


def test_the_command_budget_is_a_floor_on_the_poll_interval(tmp_path):
    agent = Agent(tmp_path, HPC_SCHEDULER_COMMANDS_PER_MINUTE=6)  # one per 10 s
    try:
        assert (agent.core.poller.fast, agent.core.poller.slow) == (10.0, 10.0)
        t0 = agent.clock.seconds()
        agent.state.set_status(5, S.SUBMITTED, scheduler_id="s5")
        flip = [S.QUEUED, S.RUNNING]
        FakeScheduler.states = {5: JobState(S.QUEUED)}
        agent.core.poller.start()
        while agent.clock.seconds() < t0 + 60:
            agent.core.poller.kick()  # something wants a poll every second
            agent.clock.advance(1)
            FakeScheduler.states = {5: JobState(flip[len(poll_times()) % 2])}
        times = poll_times()
        assert len(times) >= 5
        assert all(b - a >= 10 for a, b in zip(times, times[1:]))
    finally:
        agent.core.poller.stop()
        agent.state.close()


def test_the_default_budget_leaves_the_schedulers_fast_interval(agent):
    assert agent.settings.HPC_SCHEDULER_COMMANDS_PER_MINUTE == 120  # 0.5 s
    assert (agent.core.poller.fast, agent.core.poller.slow) == (1.0, 8.0)


def test_a_scheduler_that_is_not_rate_limited_ignores_the_budget(tmp_path):
    agent = Agent(tmp_path, HPC_SCHEDULER_CLASS=f"{__name__}.UnlimitedFakeScheduler",
                  HPC_SCHEDULER_COMMANDS_PER_MINUTE=6)
    try:
        assert agent.core.poller.fast == 1.0
    finally:
        agent.state.close()


def test_a_failing_poll_keeps_the_poller_going(agent):
    t0 = agent.clock.seconds()
    agent.state.set_status(5, S.RUNNING, scheduler_id="s5")
    FakeScheduler.states = None  # status_many raises TypeError
    agent.core.poller.start()
    agent.clock.advance(0)
    FakeScheduler.states = {5: JobState(S.COMPLETED)}
    run_clock(agent, t0 + 9)
    assert agent.state.get(5).status == S.COMPLETED
