"""The agent's logic without sockets: AgentCore and its Poller (hpc_agent.agent).

Driven with a recording ``send``, a ``twisted.internet.task.Clock`` and a
scripted scheduler; scheduler work runs synchronously unless a test holds it.
"""

import hashlib
import inspect
import os
import platform
import threading

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from hpc_agent import __version__, wire
from hpc_agent import agent as agent_module
from hpc_agent import jobfiles
from hpc_agent.agent import RESEND_SECONDS, SUBMIT_ATTEMPTS, AgentCore
from hpc_agent.config import AgentSettings
from hpc_agent.jobfiles import FILE_THREADS
from hpc_agent.link import LinkMachine
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


class HookedScheduler(FakeScheduler):
    """File hooks the seed's way: ``file_send_start(file_path, extra_params)``
    answers ``(path, ignore_prefix)`` (``send_as`` sets the answer);
    ``file_send_end(file_path, extra_params)`` follows every transfer."""

    send_as = None

    def file_send_start(self, file_path, extra_params=None):
        FakeScheduler.calls.append(("file_send_start", self.ui_id, file_path, extra_params))
        return HookedScheduler.send_as or (file_path, False)

    def file_send_end(self, file_path, extra_params=None):
        FakeScheduler.calls.append(("file_send_end", self.ui_id, file_path, extra_params))


FAKE = f"{__name__}.FakeScheduler"


class SyncCore(AgentCore):
    """Runs "thread" work at once, or holds it in ``held`` until ``release()``;
    file work likewise with ``held_files``."""

    held = None
    held_files = None

    def in_thread(self, f, *args, **kwargs):
        return self._run(self.held, f, args, kwargs)

    def in_file_thread(self, f, *args, **kwargs):
        return self._run(self.held_files, f, args, kwargs)

    def _run(self, held, f, args, kwargs):
        if held is not None:
            d = defer.Deferred()
            held.append((d, f, args, kwargs))
            return d
        return defer.maybeDeferred(f, *args, **kwargs)

    def release(self, held=None):
        d, f, args, kwargs = (self.held if held is None else held).pop(0)
        defer.maybeDeferred(f, *args, **kwargs).chainDeferred(d)


class ClockWriter:
    """The state's writer: a batch starts when the reactor turn ends
    (``settle``, which every advance of the test's clock does too) and is
    committed at once, or held in ``held`` until ``commit()``."""

    def __init__(self, clock):
        self.clock = clock
        self.held = None
        self.turn_end = []

    def run(self, f, *args):
        if self.held is not None:
            d = defer.Deferred()
            self.held.append((f, args, d))
            return d
        return defer.maybeDeferred(f, *args)

    def later(self, delay, f):
        if delay:
            return self.clock.callLater(delay, f)
        self.turn_end.append(f)

    def settle(self):
        while self.turn_end:
            self.turn_end.pop(0)()

    def commit(self):
        f, args, d = self.held.pop(0)
        d.callback(f(*args))


class TurnClock(Clock):
    """A Clock whose every advance ends with the end of a reactor turn."""

    writer = None

    def advance(self, amount):
        super().advance(amount)
        self.writer.settle()


class LinkIO:
    """The link machine's collaborator: records what it decides."""

    def __init__(self, core):
        self.core = core
        self.credentials = []
        self.gave_up = []
        self.send = None

    def greet(self):
        self.core.connected(self.send)

    def ready(self):
        self.core.ready()

    def use_credential(self, token):
        self.credentials.append(token)

    def give_up(self, why):
        self.gave_up.append(why)


class Agent:
    """An AgentCore wired to a recording send, a Clock and a temp directory."""

    def __init__(self, tmp_path, **overrides):
        self.clock = TurnClock()
        self.clock.writer = self.writer = ClockWriter(self.clock)
        self.clock.advance(1000)
        FakeScheduler.clock = self.clock
        settings = {"HPC_SCHEDULER_CLASS": FAKE,
                    "HPC_JOB_WORKING_DIRECTORY": str(tmp_path / "jobs"), **overrides}
        self.settings = AgentSettings(str(tmp_path), settings)
        self.state = AgentState(str(tmp_path / "state.sqlite3"), clock=self.clock.seconds,
                                writer=self.writer)
        self.transfers = []
        self.uploads = []
        self.core = SyncCore(self.settings, self.state, self.clock, None, self._transfer,
                             nvx=True, start_upload=self._upload)
        self.io = LinkIO(self.core)
        self.sent = []
        self.io.send = self.sent.append
        self.link = LinkMachine(self.io, self.clock, reconnect_seconds=600)
        self.core.on_welcome = self.link.welcomed
        self.link.start()
        self._ids = iter(range(1, 10 ** 6))

    def _transfer(self, token, source):
        d = defer.Deferred()
        self.transfers.append((token, source, d))
        return d

    def _upload(self, token, sink):
        d = defer.Deferred()
        self.uploads.append((token, sink, d))
        return d

    def settle(self):
        """Let the reactor turn end: queued state changes commit (and what
        waited for them, such as replies and updates, goes out)."""
        self.writer.settle()

    def record(self, job, status, detail="", scheduler_id=None):
        seq = self.state.set_status(job, status, detail, scheduler_id)
        self.settle()
        return seq

    def connect(self, welcome=True):
        self.link.opened()
        if welcome:
            self.receive("welcome", protocol=wire.PROTOCOL_VERSION, cluster="7",
                         resume_token="resume-1")

    def disconnect(self):
        self.core.lost()
        self.link.lost(1006, "gone")

    def receive(self, mtype, **fields):
        self.core.frame_received(wire.encode(mtype, **fields))
        self.settle()

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
    agent.record(5, S.CANCELLED)
    agent.core.flush()
    assert [f["type"] for f in agent.frames()] == ["hello"]


def test_welcome_stores_the_resume_token_and_sends_the_outbox_in_order(agent):
    a = agent.state.set_status(5, S.CANCELLED, "x")
    b = agent.record(6, S.DELETED)
    agent.connect()
    assert agent.io.credentials == ["resume-1"]
    updates = [f for f in agent.frames() if f["type"] == "update"]
    assert [(u["seq"], u["job"], S(u["status"]), u["detail"]) for u in updates] == [
        (a, 5, S.CANCELLED, "x"), (b, 6, S.DELETED, "")]


def test_after_a_reconnect_every_unacknowledged_update_is_sent_again(agent):
    agent.record(5, S.CANCELLED)
    agent.connect()
    agent.disconnect()
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
    agent.record(5, S.CANCELLED)
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
    agent.record(1, S.CANCELLED)  # hpcd's write of this one fails: no ack
    agent.core.flush()
    for job in range(2, 12):  # steady traffic, each update acknowledged
        agent.clock.advance(10)
        seq = agent.record(job, S.CANCELLED)
        agent.core.flush()
        agent.receive("ack", seqs=[seq])
    assert agent.updates().count((1, S.CANCELLED)) >= 2


def test_an_update_goes_to_hpcd_only_once_it_is_durable(agent):
    agent.connect()
    agent.writer.held = []
    agent.record(5, S.CANCELLED)  # its batch is being committed
    agent.core.flush()
    assert agent.updates() == []
    agent.writer.commit()
    assert agent.updates() == [(5, S.CANCELLED)]


def test_the_scheduler_sees_a_job_only_once_its_record_is_durable(agent):
    agent.connect()
    agent.writer.held = []
    request_id = agent.request("submit", job=5, parameters=PARAMS)
    assert agent.calls("submit") == []
    agent.writer.commit()  # record_submitting is on disk
    assert agent.calls("submit") == [("submit", 5, PARAMS)]
    agent.settle()
    # SUBMITTED is being committed: neither the update nor the reply is out.
    assert (agent.replies(), agent.updates()) == ([], [])
    agent.writer.commit()
    assert agent.reply(request_id)["result"]["status"] == int(S.SUBMITTED)
    assert agent.updates() == [(5, S.SUBMITTED)]


def test_updates_hpcd_could_not_store_are_sent_again_after_a_short_backoff(agent):
    agent.connect()
    seq = agent.record(5, S.CANCELLED)
    agent.receive("ack", seqs=[], retry=[seq])  # hpcd's database failed
    agent.clock.advance(0.9)
    assert len(agent.updates()) == 1
    agent.clock.advance(0.1)
    assert len(agent.updates()) == 2  # after about a second
    agent.receive("ack", seqs=[], retry=[seq])
    agent.clock.advance(1.9)
    assert len(agent.updates()) == 2
    agent.clock.advance(0.1)
    assert len(agent.updates()) == 3  # then two
    agent.receive("ack", seqs=[seq])
    agent.clock.advance(3 * RESEND_SECONDS)
    assert len(agent.updates()) == 3 and agent.state.outbox_size() == 0
    # A store that works again resets the backoff.
    other = agent.record(6, S.CANCELLED)
    agent.receive("ack", seqs=[], retry=[other])
    agent.clock.advance(1.0)
    assert agent.updates().count((6, S.CANCELLED)) == 2


def test_at_most_max_in_flight_updates_wait_for_acknowledgement(agent, monkeypatch):
    monkeypatch.setattr(agent_module, "MAX_IN_FLIGHT", 3)
    seqs = [agent.state.set_status(job, S.CANCELLED) for job in range(1, 8)]
    agent.settle()
    agent.connect()
    assert [job for job, _ in agent.updates()] == [1, 2, 3]
    agent.receive("ack", seqs=seqs[:2])
    assert [job for job, _ in agent.updates()] == [1, 2, 3, 4, 5]
    agent.receive("ack", seqs=seqs[2:5])
    assert [job for job, _ in agent.updates()] == [1, 2, 3, 4, 5, 6, 7]


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
    agent.record(5, S.RUNNING, scheduler_id="s5")
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
    # The same parameters (hpcd sends the job's again): other ones would be
    # another job under the same id (see the installation tests below).
    reply = agent.ask("submit", job=5, parameters=PARAMS)
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


def test_reconcile_leaves_alone_a_job_cancelled_while_it_settled_another(agent):
    # Reconcile runs while hpcd's requests come in: a cancel of a job it had
    # listed, answered while it asked the scheduler about the one before,
    # must not be followed by a submit (the cancelled job then ran, unwatched).
    agent.state.record_submitting(4, PARAMS)
    agent.state.record_submitting(5, PARAMS)
    agent.settle()
    FakeScheduler.found = {}
    agent.core.held = []
    d = agent.core.reconcile()
    agent.connect()
    assert agent.ask("cancel", job=5)["result"] == {"status": int(S.CANCELLED)}
    while agent.core.held:
        agent.core.release()
        agent.settle()
    assert d.called
    assert [call[1] for call in agent.calls("submit")] == [4]
    assert agent.state.get(5).status == S.CANCELLED


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


def test_submit_many_submits_each_job_and_answers_per_job(agent):
    seen = []
    FakeScheduler.on_submit = lambda job_id: seen.append(agent.state.get(job_id).status)
    FakeScheduler.submit_results[6] = [InvalidParameters("no such queue")]
    agent.connect()
    agent.ask("submit", job=7, parameters=PARAMS)  # known already: from its record
    reply = agent.ask("submit_many", jobs=[{"job": 5, "parameters": PARAMS},
                                           {"job": 6, "parameters": PARAMS},
                                           {"job": 7, "parameters": PARAMS}])
    assert reply["ok"] and reply["result"] == {"jobs": [
        {"job": 5, "ok": True, "scheduler_id": "sched-5", "status": int(S.SUBMITTED)},
        {"job": 6, "ok": True, "scheduler_id": None, "status": int(S.ERROR)},
        {"job": 7, "ok": True, "scheduler_id": "sched-7", "status": int(S.SUBMITTED)}]}
    # Each recorded durably before the scheduler saw it; job 7 not submitted twice.
    assert seen == [S.SUBMITTING, S.SUBMITTING, S.SUBMITTING]
    assert [c[1] for c in agent.calls("submit")] == [7, 5, 6]
    assert sorted(agent.updates()) == [(5, S.SUBMITTED), (6, S.ERROR), (7, S.SUBMITTED)]


def test_submit_many_answers_only_once_every_reported_state_is_durable(agent):
    agent.connect()
    agent.writer.held = []
    request_id = agent.request("submit_many", jobs=[{"job": 5, "parameters": PARAMS},
                                                    {"job": 6, "parameters": PARAMS}])
    while agent.writer.held:
        assert agent.replies() == []
        agent.writer.commit()
        agent.settle()
    assert agent.reply(request_id)["result"]["jobs"][1]["status"] == int(S.SUBMITTED)


def test_submit_many_after_a_cancel_does_not_submit_the_cancelled_job(agent):
    agent.connect()
    agent.ask("cancel", job=5)
    reply = agent.ask("submit_many", jobs=[{"job": 5, "parameters": PARAMS},
                                           {"job": 6, "parameters": PARAMS}])
    assert [j["status"] for j in reply["result"]["jobs"]] == [int(S.CANCELLED),
                                                              int(S.SUBMITTED)]
    assert [c[1] for c in agent.calls("submit")] == [6]


def test_a_malformed_submit_many_is_refused_as_its_reply():
    with pytest.raises(wire.ProtocolError) as e:
        wire.decode(b'{"type": "submit_many", "id": 3, "jobs": [{"job": "5"}]}',
                    accept=wire.FROM_HPCD)
    assert (e.value.code, e.value.request_id) == ("bad_field", 3)


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


# -- installations and job ids (issue 9 item 13) -------------------------------------

INSTALLATION_A = "11111111-1111-4111-8111-111111111111"
INSTALLATION_B = "22222222-2222-4222-8222-222222222222"


def welcome_from(agent, installation, token="resume-1"):
    agent.receive("welcome", protocol=wire.PROTOCOL_VERSION, cluster="7", resume_token=token,
                  installation=installation)


def test_the_state_binds_to_the_first_installation_and_serves_it_again(agent):
    agent.record(5, S.CANCELLED)
    agent.link.opened()
    welcome_from(agent, INSTALLATION_A)
    assert agent.state.get_meta("installation") == INSTALLATION_A
    assert agent.updates() == [(5, S.CANCELLED)]
    agent.disconnect()
    agent.link.opened()
    welcome_from(agent, INSTALLATION_A, "resume-2")
    assert agent.io.credentials[-1] == "resume-2" and agent.io.gave_up == []


def test_another_installation_is_refused_with_4005_and_gets_nothing(agent):
    refused = []
    agent.core.on_refuse = lambda code, reason: refused.append((code, reason))
    agent.state.set_meta("installation", INSTALLATION_A)
    agent.record(5, S.CANCELLED)
    agent.link.opened()
    welcome_from(agent, INSTALLATION_B)
    ((code, reason),) = refused
    assert code == wire.CLOSE_INSTALLATION == 4005
    assert reason == (f"this agent directory belongs to installation {INSTALLATION_A}; "
                      "use another agent directory")
    assert len(reason.encode()) <= 123  # fits a websocket close frame
    assert agent.updates() == [] and agent.io.credentials == []
    assert agent.state.get_meta("installation") == INSTALLATION_A


def test_a_welcome_without_an_installation_binds_nothing(agent):
    agent.connect()  # an hpcd from before installations
    assert agent.state.get_meta("installation") is None
    welcome_from(agent, INSTALLATION_A)
    assert agent.state.get_meta("installation") == INSTALLATION_A


def test_a_known_job_id_submitted_with_other_parameters_ends_in_error(agent, tmp_path):
    agent.connect()
    agent.ask("submit", job=5, parameters=PARAMS)
    job_dir(tmp_path, 5, {"secret.txt": b"the first job's output"})
    other = {"script": "echo another job"}
    reply = agent.ask("submit", job=5, parameters=other)
    assert reply["result"] == {"scheduler_id": None, "status": int(S.ERROR)}
    assert agent.updates() == [(5, S.SUBMITTED), (5, S.ERROR)]
    (error,) = [f for f in agent.frames() if f["type"] == "update" and f["status"] == S.ERROR]
    assert "other parameters" in error["detail"]
    # The agent's own record is still the first job's, submitted once.
    kept = agent.state.get(5)
    assert (kept.status, kept.scheduler_id, kept.parameters) == (S.SUBMITTED, "sched-5", PARAMS)
    assert len(agent.calls("submit")) == 1
    # Asked again, it answers the same and reports nothing new.
    assert agent.ask("submit", job=5, parameters=other)["result"]["status"] == int(S.ERROR)
    assert agent.updates() == [(5, S.SUBMITTED), (5, S.ERROR)]


def test_a_conflicting_job_gets_no_files_and_its_delete_keeps_them(agent, tmp_path):
    agent.connect()
    agent.ask("submit", job=5, parameters={"a": 1})
    agent.record(5, S.COMPLETED)
    job_dir(tmp_path, 5, {"secret.txt": b"the first job's output"})
    agent.ask("submit", job=5, parameters={"a": 2})
    for mtype, fields in (("list_files", {"path": "/", "recursive": True}),
                          ("fetch_file", {"path": "secret.txt", "token": "t"}),
                          ("file_checksum", {"path": "secret.txt"}),
                          ("upload_file", {"path": "in.txt", "token": "t"})):
        reply = agent.ask(mtype, job=5, **fields)
        assert (reply["ok"], reply["error"]) == (False, "path_refused"), mtype
    assert agent.transfers == [] and agent.uploads == []
    assert agent.ask("delete", job=5)["result"] == {"status": int(S.DELETED)}
    assert agent.calls("delete_data") == []
    assert (tmp_path / "jobs" / "5" / "secret.txt").exists()
    assert agent.updates()[-1] == (5, S.DELETED)
    # Other jobs are served as before.
    job_dir(tmp_path, 6)
    assert agent.ask("list_files", job=6, path="/", recursive=True)["ok"]


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
    assert [r["id"] for r in agent.replies()] == [other_id]  # SUBMITTED not yet durable
    agent.settle()
    assert [r["id"] for r in agent.replies()] == [other_id, submit_id]
    assert len(agent.core.held) == 1  # now the cancel's scheduler call
    agent.core.release()
    agent.settle()
    assert [r["id"] for r in agent.replies()] == [other_id, submit_id, cancel_id]
    assert [c[0] for c in agent.calls()] == ["submit", "cancel"]
    assert agent.reply(cancel_id)["result"] == {"status": int(S.CANCELLING)}
    assert agent.core._locks == {}  # no lock left behind


# -- files --------------------------------------------------------------------------

def job_dir(tmp_path, job=5, files=None):
    path = tmp_path / "jobs" / str(job)
    path.mkdir(parents=True, exist_ok=True)
    for name, data in (files or {"out.txt": b"hello"}).items():
        (path / name).write_bytes(data)
    return path


def read_all(source):
    """What a transfer would send: every chunk the source gives."""
    chunks = []
    while sum(map(len, chunks)) < source.size:
        d = source.read(source.size)
        chunks.append(d.result)
    return b"".join(chunks)


@pytest.fixture
def hooked(tmp_path):
    HookedScheduler.send_as = None
    a = Agent(tmp_path, HPC_SCHEDULER_CLASS=f"{__name__}.HookedScheduler")
    yield a
    a.core.poller.stop()
    a.state.close()


def test_list_files_lists_inside_the_job_directory_and_refuses_outside(agent, tmp_path):
    job_dir(tmp_path)
    agent.connect()
    reply = agent.ask("list_files", job=5, path="/", recursive=True)
    assert reply["result"] == {"files": [["out.txt", False, 5]], "truncated": False,
                               "next": None}
    refused = agent.ask("list_files", job=5, path="../../", recursive=True)
    assert (refused["ok"], refused["error"]) == (False, "path_refused")


def test_list_files_gives_mtimes_only_when_asked(agent, tmp_path):
    path = job_dir(tmp_path)
    os.utime(path / "out.txt", (1_700_000_000, 1_700_000_000))
    agent.connect()
    asked = agent.ask("list_files", job=5, path="/", recursive=True, with_mtime=True)
    assert asked["result"]["files"] == [["out.txt", False, 5, 1_700_000_000.0]]
    plain = agent.ask("list_files", job=5, path="/", recursive=True)
    assert plain["result"]["files"] == [["out.txt", False, 5]]


def test_list_files_pages_with_offset_and_limit(agent, tmp_path):
    job_dir(tmp_path, files={f"f{i:02}": b"x" for i in range(7)})
    agent.connect()
    pages, offset = [], 0
    while offset is not None:
        result = agent.ask("list_files", job=5, path="/", recursive=False, offset=offset,
                           limit=3)["result"]
        pages.append([name for name, _, _ in result["files"]])
        assert result["truncated"] is (result["next"] is not None)
        offset = result["next"]
    assert pages == [["f00", "f01", "f02"], ["f03", "f04", "f05"], ["f06"]]


def test_a_listing_over_the_frame_limit_is_answered_in_pages_under_it(agent, tmp_path,
                                                                     monkeypatch):
    """Issue 9: a file list over the frame limit never answered."""
    monkeypatch.setattr(wire, "MAX_CONTROL_MESSAGE", 64 * 1024 + 20_000)
    names = {f"{'n' * 200}{i:04}": b"" for i in range(300)}  # about 70 kB of JSON
    job_dir(tmp_path, files=names)
    agent.connect()
    seen, offset, frames = [], 0, 0
    while offset is not None:
        before = len(agent.sent)
        result = agent.ask("list_files", job=5, path="/", recursive=False,
                           offset=offset)["result"]
        frames += 1
        assert len(agent.sent[before]) <= wire.MAX_CONTROL_MESSAGE
        seen += [name for name, _, _ in result["files"]]
        offset = result["next"]
    assert frames > 1 and seen == sorted(names)


def test_fetch_file_starts_a_transfer_of_a_regular_file(agent, tmp_path):
    path = job_dir(tmp_path)
    os.utime(path / "out.txt", (1_700_000_000, 1_700_000_000))
    agent.connect()
    reply = agent.ask("fetch_file", job=5, path="out.txt", token="tok")
    assert reply["result"] == {"size": 5, "total_size": 5, "mtime": 1_700_000_000.0}
    ((token, source, done),) = agent.transfers
    assert (token, source.name, source.size, read_all(source)) == ("tok", "out.txt", 5,
                                                                   b"hello")
    source.close()
    for bad in ("/", "../../state.sqlite3"):
        assert agent.ask("fetch_file", job=5, path=bad, token="t")["error"] == "path_refused"
    # Missing is told apart (a 404 where the others are a 403).
    assert agent.ask("fetch_file", job=5, path="missing", token="t")["error"] == "not_found"


def test_fetch_file_sends_only_the_range_asked_for(agent, tmp_path):
    job_dir(tmp_path, files={"data": bytes(range(100))})
    agent.connect()
    reply = agent.ask("fetch_file", job=5, path="data", token="t", offset=10, length=20)
    assert reply["result"]["size"] == 20 and reply["result"]["total_size"] == 100
    assert read_all(agent.transfers[0][1]) == bytes(range(10, 30))
    to_end = agent.ask("fetch_file", job=5, path="data", token="t", offset=90, length=None)
    assert to_end["result"]["size"] == 10
    assert read_all(agent.transfers[1][1]) == bytes(range(90, 100))
    past = agent.ask("fetch_file", job=5, path="data", token="t", offset=101)
    assert past["error"] == "path_refused" and "past the end" in past["message"]
    for _, source, _ in agent.transfers:
        source.close()


def test_fetch_file_calls_the_hooks_the_seed_way(hooked, tmp_path):
    path = job_dir(tmp_path)
    hooked.connect()
    extra = {"archive": ["a", "b"]}
    reply = hooked.ask("fetch_file", job=5, path="out.txt", token="t", extra_params=extra)
    assert reply["ok"] is True
    assert hooked.calls() == [("file_send_start", 5, "out.txt", extra)]
    ((_, source, done),) = hooked.transfers
    source.close()
    done.callback(5)
    assert hooked.calls()[1:] == [("file_send_end", 5, str(path / "out.txt"), extra)]


def test_file_send_end_runs_after_a_failed_transfer_too(hooked, tmp_path):
    from hpc_agent.transfer import TransferFailed

    job_dir(tmp_path)
    hooked.connect()
    hooked.ask("fetch_file", job=5, path="out.txt", token="t")
    ((_, source, done),) = hooked.transfers
    source.close()
    done.errback(TransferFailed("the connection closed"))
    assert [c[0] for c in hooked.calls()] == ["file_send_start", "file_send_end"]


def test_a_hook_may_name_a_file_of_its_own_outside_the_job_directory(hooked, tmp_path):
    job_dir(tmp_path)
    archive = tmp_path / "archive-5.tar"
    archive.write_bytes(b"tarball")
    HookedScheduler.send_as = (str(archive), True)
    hooked.connect()
    reply = hooked.ask("fetch_file", job=5, path="out.txt", token="t", extra_params=None)
    assert reply["result"]["size"] == 7
    ((_, source, done),) = hooked.transfers
    assert read_all(source) == b"tarball"
    source.close()
    done.callback(7)
    assert hooked.calls()[-1] == ("file_send_end", 5, str(archive), None)


def test_a_hook_may_answer_with_an_absolute_path_inside_the_job_directory(hooked, tmp_path):
    path = job_dir(tmp_path, files={"out.txt": b"hello", "report.pdf": b"%PDF"})
    HookedScheduler.send_as = (str(path / "report.pdf"), False)
    hooked.connect()
    assert hooked.ask("fetch_file", job=5, path="out.txt", token="t")["result"]["size"] == 4
    ((_, source, _),) = hooked.transfers
    assert read_all(source) == b"%PDF"
    source.close()


def test_a_hooks_path_is_confined_to_the_job_directory_without_ignore_prefix(hooked, tmp_path):
    job_dir(tmp_path)
    HookedScheduler.send_as = ("../../settings.py", False)
    (tmp_path / "settings.py").write_text("SECRET = 1")
    hooked.connect()
    reply = hooked.ask("fetch_file", job=5, path="out.txt", token="t")
    assert reply["error"] == "path_refused"
    assert hooked.transfers == []
    # The end hook runs whenever the start hook did.
    assert [c[0] for c in hooked.calls()] == ["file_send_start", "file_send_end"]


def test_a_hook_that_vouches_for_a_fifo_still_gets_no_fifo_served(hooked, tmp_path):
    job_dir(tmp_path)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    HookedScheduler.send_as = (str(fifo), True)
    hooked.connect()
    reply = hooked.ask("fetch_file", job=5, path="out.txt", token="t")
    assert reply["error"] == "path_refused" and "FIFO" in reply["message"]


def test_file_checksum_streams_the_whole_file(agent, tmp_path):
    data = os.urandom(300_000)
    job_dir(tmp_path, files={"big": data})
    agent.connect()
    result = agent.ask("file_checksum", job=5, path="big")["result"]
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert result["size"] == len(data) and isinstance(result["mtime"], float)
    assert agent.ask("file_checksum", job=5, path="../..")["error"] == "path_refused"


def test_without_a_job_absolute_paths_inside_an_extra_root_are_served(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "r.csv").write_text("1,2")
    job_dir(tmp_path)
    agent = Agent(tmp_path, HPC_ALLOWED_FILE_ROOTS=[str(tmp_path / "shared")])
    try:
        agent.connect()
        for path, size in ((tmp_path / "shared" / "r.csv", 3),
                           (tmp_path / "jobs" / "5" / "out.txt", 5)):
            assert agent.ask("fetch_file", job=None, path=str(path),
                             token="t")["result"]["size"] == size
        refused = agent.ask("fetch_file", job=None, path="/etc/passwd", token="t")
        assert refused["error"] == "path_refused"
        for _, source, _ in agent.transfers:
            source.close()
    finally:
        agent.state.close()


def test_without_a_job_or_extra_roots_an_absolute_path_in_the_working_directory_is_served(
        agent, tmp_path):
    job_dir(tmp_path)
    agent.connect()
    path = str(tmp_path / "jobs" / "5" / "out.txt")
    listed = agent.ask("list_files", job=None, path=str(tmp_path / "jobs" / "5"),
                       recursive=False)
    reply = agent.ask("fetch_file", job=None, path=path, token="t")
    for _, source, _ in agent.transfers:
        source.close()
    assert (listed.get("error"), reply.get("error")) == (None, None)
    assert listed["result"]["files"] == [["5/out.txt", False, 5]]
    assert reply["result"]["size"] == 5


# -- files that would block the agent -----------------------------------------------

class GuardedCore(SyncCore):
    """Runs every blocking call on a real thread, waiting at most 5 s: a call
    still blocked then is a worker lost for good (``stuck``), as in the agent."""

    stuck = None

    def _run(self, held, f, args, kwargs):
        if held is not None:
            return super()._run(held, f, args, kwargs)
        outcome = {}

        def work():
            try:
                outcome["result"] = f(*args, **kwargs)
            except BaseException as e:
                outcome["error"] = e

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        thread.join(5)
        if thread.is_alive():
            self.stuck.append(f)
            return defer.Deferred()
        if "error" in outcome:
            return defer.fail(outcome["error"])
        return defer.succeed(outcome["result"])


@pytest.fixture
def guarded(tmp_path):
    a = Agent(tmp_path)
    a.core.__class__ = GuardedCore
    a.core.stuck = []
    yield a
    a.core.poller.stop()
    a.state.close()


@pytest.mark.timeout(120)
def test_fifos_in_a_job_directory_never_block_the_agent(guarded, tmp_path):
    """Issue 9: a FIFO fetched four times stopped submits, polls and cancels."""
    path = job_dir(tmp_path)
    os.mkfifo(path / "pipe")
    os.symlink("pipe", path / "link-to-pipe")
    guarded.connect()
    try:
        for name in ("pipe", "link-to-pipe", "pipe", "/pipe", "pipe"):
            reply = guarded.ask("fetch_file", job=5, path=name, token="t")
            assert reply["error"] == "path_refused" and "FIFO" in reply["message"]
        listing = guarded.ask("list_files", job=5, path="/", recursive=True)["result"]
        assert [name for name, _, _ in listing["files"]] == ["out.txt"]
        assert guarded.core.stuck == []
        assert guarded.ask("submit", job=6, parameters=PARAMS)["result"]["status"] == \
            int(S.SUBMITTED)
        assert guarded.ask("cancel", job=6)["result"] == {"status": int(S.CANCELLING)}
    finally:
        # Free whatever an old agent left blocked in open().
        for _ in guarded.core.stuck:
            fd = os.open(path / "pipe", os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)


def test_a_character_device_is_refused_without_being_read(agent, tmp_path):
    path = job_dir(tmp_path)
    os.symlink("/dev/zero", path / "zeros")
    agent.connect()
    reply = agent.ask("fetch_file", job=None, path="/dev/zero", token="t")
    assert reply["error"] == "path_refused"
    assert agent.ask("fetch_file", job=5, path="zeros", token="t")["error"] == "path_refused"
    assert agent.transfers == []


def test_a_hung_file_system_fails_the_request_and_the_agent_goes_on(agent, tmp_path):
    job_dir(tmp_path)
    agent.connect()
    agent.core.held_files = []  # every file call hangs, like a dead NFS server
    timeout = agent.settings.HPC_FILE_TIMEOUT_SECONDS
    ids = [agent.request("fetch_file", job=5, path="out.txt", token="t")
           for _ in range(FILE_THREADS)]
    assert [agent.replies()] == [[]]
    agent.clock.advance(timeout)
    for request_id in ids:
        reply = agent.reply(request_id)
        assert reply["error"] == "file_timeout" and "did not finish" in reply["message"]
    # Every file worker is stuck: the next file request is refused at once.
    refused = agent.ask("list_files", job=5, path="/", recursive=False)
    assert refused["error"] == "file_timeout" and "not returned" in refused["message"]
    # Jobs are served all the while.
    assert agent.ask("submit", job=6, parameters=PARAMS)["result"]["status"] == \
        int(S.SUBMITTED)
    assert agent.ask("cancel", job=7)["result"] == {"status": int(S.CANCELLED)}
    # The file system comes back: the late opens are closed, workers are free.
    while agent.core.held_files:
        agent.core.release(agent.core.held_files)
    assert agent.core.files.stuck == 0
    agent.core.held_files = None
    assert agent.ask("list_files", job=5, path="/", recursive=False)["ok"] is True


def test_a_read_that_hangs_fails_the_transfer_after_the_deadline(agent, tmp_path):
    from hpc_agent.workers import FilesUnavailable

    job_dir(tmp_path)
    agent.connect()
    agent.ask("fetch_file", job=5, path="out.txt", token="t")
    ((_, source, _),) = agent.transfers
    agent.core.held_files = []
    d = source.read(5)
    agent.clock.advance(agent.settings.HPC_FILE_TIMEOUT_SECONDS)
    assert isinstance(d.result.value, FilesUnavailable)
    d.addErrback(lambda f: None)
    agent.core.release(agent.core.held_files)
    agent.core.held_files = None
    source.close()


# -- polling ------------------------------------------------------------------------

def test_poll_records_running_before_an_end_seen_in_one_poll(agent):
    agent.state.set_status(5, S.SUBMITTED, scheduler_id="s5")
    agent.state.set_status(6, S.QUEUED, scheduler_id="s6")
    agent.connect()
    FakeScheduler.states = {5: JobState(S.COMPLETED, started=1.0),
                            6: JobState(S.ERROR, "exit code 1")}  # never started
    assert agent.core.poll().result is True
    agent.settle()
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


# -- the file hooks' calling convention -----------------------------------------------

class _Hooks:
    def __init__(self, answer=None):
        self.answer = answer
        self.calls = []

    def file_send_start(self, file_path, extra_params):
        self.calls.append((file_path, extra_params))
        return self.answer


class _OneArgumentHooks:
    """Hooks written for this project's first release: the path only."""

    def __init__(self):
        self.calls = []

    def file_send_start(self, path):
        self.calls.append(path)

    def file_send_end(self, path):
        self.calls.append(("end", path))


@pytest.mark.parametrize("answer,expected", [
    (None, ("out.txt", False)), ("other.txt", ("other.txt", False)),
    (("/abs/archive.tar", True), ("/abs/archive.tar", True)),
    (["x", 1], ("x", True)),
])
def test_file_send_start_answers_are_taken_the_seed_way(answer, expected):
    hooks = _Hooks(answer)
    assert jobfiles._send_start(hooks, "out.txt", {"k": 1}) == expected
    assert hooks.calls == [("out.txt", {"k": 1})]


def test_a_file_send_start_answer_without_a_path_is_an_error():
    with pytest.raises(TypeError, match=r"\(path, ignore_prefix\)"):
        jobfiles._send_start(_Hooks((None, True)), "out.txt", None)


def test_one_argument_hooks_still_work():
    hooks = _OneArgumentHooks()
    assert jobfiles._send_start(hooks, "out.txt", {"k": 1}) == ("out.txt", False)
    jobfiles._call_hook(hooks.file_send_end, "/jobs/5/out.txt", None)
    assert hooks.calls == ["out.txt", ("end", "/jobs/5/out.txt")]


# -- uploads ------------------------------------------------------------------------

def test_an_upload_before_submission_makes_the_job_directory_and_a_temporary_file(
        agent, tmp_path):
    agent.connect()
    reply = agent.ask("upload_file", job=9, path="in/data.csv", token="tok", max_size=100)
    assert reply == {"type": "reply", "id": reply["id"], "ok": True, "result": {}}
    directory = tmp_path / "jobs" / "9"
    assert os.stat(directory).st_mode & 0o777 == 0o700  # HPC_JOB_DIRECTORY_MODE
    ((token, sink, done),) = agent.uploads
    assert token == "tok" and sink.path == str(directory / "in" / "data.csv")
    (temp,) = os.listdir(directory / "in")
    assert temp.startswith(".data.csv.upload-")
    sink.write(b"1,2\n").result  # noqa: B018 (done at once here)
    result = sink.commit(4, hashlib.sha256(b"1,2\n").hexdigest()).result
    assert result["size"] == 4
    assert os.listdir(directory / "in") == ["data.csv"]
    assert (directory / "in" / "data.csv").read_bytes() == b"1,2\n"


def test_an_upload_refused_is_answered_before_any_connection(agent, tmp_path):
    job_dir(tmp_path, files={"sub": b"a file"})
    agent.connect()
    for path in ("../escape", "sub/x", "/"):
        reply = agent.ask("upload_file", job=5, path=path, token="t")
        assert reply["error"] == "path_refused", path
    assert agent.uploads == []
