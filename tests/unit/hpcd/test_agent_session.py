"""One agent's control connection in hpcd: AgentSession (hpcd.agents), driven with
a fake protocol, a fake daemon and a Clock."""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from hpc_agent import wire
from hpcd.agents import AgentSession
from hpcd.commands import AgentError, ClusterOffline, Timeout

REQUEST_TIMEOUT = 5.0
INSTALLATION = "5f0c6f4e-0000-4000-8000-000000000001"


class FakeProtocol:
    def __init__(self):
        self.frames = []
        self.closed = []

    def send_frame(self, frame):
        self.frames.append(frame)

    def sendClose(self, code=None, reason=None):
        self.closed.append((code, reason))


class FakeStore:
    def __init__(self):
        self.writes = []  # (cluster_id, batch, deferred)
        self.tokens = []

    def apply_updates(self, cluster_id, updates):
        d = defer.Deferred()
        self.writes.append((cluster_id, [u["seq"] for u in updates], d))
        return d

    def welcome(self, cluster_id):
        self.tokens.append((cluster_id, "resume"))
        return defer.succeed((INSTALLATION,
                              (100 + len(self.tokens), f"secret-{len(self.tokens)}")))


class FakeClusters:
    def __init__(self):
        self.events = []
        self.hello_result = None  # a Deferred to hold the takeover, or None

    def agent_hello(self, session):
        self.events.append("hello")
        return self.hello_result or defer.succeed(None)

    def agent_ready(self, session):
        self.events.append("ready")
        return defer.succeed(None)

    def agent_lost(self, session):
        self.events.append("lost")


class FakeSettings:
    HPC_AGENT_REQUEST_TIMEOUT = REQUEST_TIMEOUT
    HPC_AGENT_RESUME_GRACE_SECONDS = 15.0


class FakeDaemon:
    def __init__(self):
        self.store = FakeStore()
        self.clusters = FakeClusters()
        self.settings = FakeSettings()
        self.reactor = Clock()


@pytest.fixture
def daemon():
    return FakeDaemon()


@pytest.fixture
def protocol():
    return FakeProtocol()


@pytest.fixture
def session(daemon, protocol):
    return AgentSession(daemon, protocol, {"cluster_id": 3, "token_id": 11})


def hello(**changes):
    fields = dict(protocol=wire.PROTOCOL_VERSION, agent_version="1.0", scheduler="x.Local",
                  hostname="login1", nvx=True)
    fields.update(changes)
    return wire.encode("hello", **fields)


def update(seq, job=5, status=50):
    return wire.encode("update", seq=seq, job=job, status=status, detail="", at=1.0,
                       scheduler_id="s")


def frames(protocol):
    return [wire.decode(f, accept=wire.FROM_HPCD) for f in protocol.frames]


@pytest.fixture
def ready(session, protocol):
    session.message(hello(), False)
    protocol.frames.clear()
    return session


def test_frames_before_hello_are_answered_not_ready(session, protocol, daemon):
    session.message(update(1), False)
    session.message(wire.encode("reply", id=1, ok=True), False)
    assert frames(protocol) == [{"type": "error", "code": "not_ready",
                                 "message": "say hello first"}] * 2
    assert daemon.store.writes == [] and daemon.clusters.events == []


def test_hello_with_another_protocol_version_closes_with_4003(session, protocol, daemon):
    session.message(hello(protocol=wire.PROTOCOL_VERSION + 1), False)
    ((code, reason),) = protocol.closed
    assert code == wire.CLOSE_PROTOCOL == 4003
    assert "upgrade the agent" in reason
    assert protocol.frames == [] and daemon.clusters.events == []
    assert not session.ready


def test_hello_is_answered_with_welcome_and_a_fresh_resume_token(session, protocol, daemon):
    session.message(hello(), False)
    assert frames(protocol) == [{"type": "welcome", "protocol": wire.PROTOCOL_VERSION,
                                 "cluster": "3", "resume_token": "secret-1",
                                 "resume_grace_seconds": 15.0,
                                 "installation": INSTALLATION}]
    assert daemon.store.tokens == [(3, "resume")]
    assert daemon.clusters.events == ["hello", "ready"]
    assert session.ready and session.hello["hostname"] == "login1"


def test_welcome_waits_until_the_previous_agent_is_gone(session, protocol, daemon):
    daemon.clusters.hello_result = held = defer.Deferred()
    session.message(hello(), False)
    session.message(update(1), False)  # not ready yet
    assert [f["type"] for f in frames(protocol)] == ["error"]
    held.callback(None)
    assert [f["type"] for f in frames(protocol)] == ["error", "welcome"]
    assert session.ready


def test_a_session_closed_before_welcome_sends_nothing(session, protocol, daemon):
    daemon.clusters.hello_result = held = defer.Deferred()
    session.message(hello(), False)
    session.lost(1006, "gone")
    held.callback(None)
    assert protocol.frames == [] and "ready" not in daemon.clusters.events


def test_a_second_hello_is_refused(ready, protocol, daemon):
    ready.message(hello(hostname="other"), False)
    assert [(f["type"], f["code"]) for f in frames(protocol)] == [("error", "bad_frame")]
    assert ready.hello["hostname"] == "login1"


def test_malformed_and_binary_frames_get_an_error_and_nothing_else(ready, protocol, daemon):
    ready.message(b"{not json", False)
    ready.message(b"\x00\x01", True)
    ready.message(wire.encode("file_header", size=1, name="x"), False)  # /file only
    ready.message(wire.encode("submit", id=4, job=1, parameters={}), False)  # hpcd's own
    answers = frames(protocol)
    assert [(f["type"], f.get("code") or f.get("error")) for f in answers] == [
        ("error", "bad_frame"), ("error", "bad_frame"), ("error", "unknown_type"),
        ("reply", "unknown_type")]
    assert daemon.store.writes == [] and ready.ready


def test_updates_are_batched_while_a_store_write_runs_and_acked_after(ready, protocol,
                                                                      daemon):
    ready.message(update(1), False)
    ready.message(update(2), False)
    ready.message(update(3), False)
    writes = daemon.store.writes
    assert [(c, seqs) for c, seqs, _ in writes] == [(3, [1])]
    assert protocol.frames == []
    writes[0][2].callback([1])
    assert frames(protocol) == [{"type": "ack", "seqs": [1]}]
    assert [seqs for _, seqs, _ in writes] == [[1], [2, 3]]
    writes[1][2].callback([2, 3])
    assert frames(protocol)[-1] == {"type": "ack", "seqs": [2, 3]}
    ready.message(update(4), False)
    assert [seqs for _, seqs, _ in writes] == [[1], [2, 3], [4]]


def test_a_failed_store_write_is_acked_as_retry_and_the_next_batch_proceeds(ready, protocol,
                                                                            daemon):
    ready.message(update(1), False)
    ready.message(update(2), False)
    daemon.store.writes[0][2].errback(RuntimeError("database is locked"))
    # Not stored: the agent is told to send it again soon (its backoff).
    assert frames(protocol) == [{"type": "ack", "seqs": [], "retry": [1]}]
    protocol.frames.clear()
    assert [seqs for _, seqs, _ in daemon.store.writes] == [[1], [2]]
    daemon.store.writes[1][2].callback([2])
    assert frames(protocol) == [{"type": "ack", "seqs": [2]}]


def test_a_request_is_answered_by_the_reply_with_its_id(ready, protocol):
    first = ready.request("cancel", job=5)
    second = ready.request("list_files", job=None, path="/", recursive=False)
    sent = frames(protocol)
    assert [(f["type"], f["id"]) for f in sent] == [("cancel", 1), ("list_files", 2)]
    results = []
    first.addCallback(results.append)
    second.addCallback(results.append)
    ready.message(wire.encode("reply", id=2, ok=True, result={"files": []}), False)
    ready.message(wire.encode("reply", id=1, ok=True, result={"status": 60}), False)
    assert results == [{"files": []}, {"status": 60}]


def test_an_error_reply_fails_the_request_with_the_agents_code(ready):
    d = ready.request("delete", job=5)
    ready.message(wire.encode("reply", id=1, ok=False, error="job_active",
                              message="job 5 is RUNNING"), False)
    failure = []
    d.addErrback(failure.append)
    (f,) = failure
    assert f.check(AgentError)
    assert f.value.code == "job_active"
    assert "job_active: job 5 is RUNNING" in str(f.value) and "cluster 3" in str(f.value)


def test_a_reply_to_an_unknown_request_is_ignored(ready, protocol):
    ready.message(wire.encode("reply", id=99, ok=True), False)
    assert protocol.frames == [] and ready.ready


def test_an_unanswered_request_times_out_on_the_clock(ready, daemon):
    d = ready.request("cancel", job=5)
    errors = []
    d.addErrback(errors.append)
    daemon.reactor.advance(REQUEST_TIMEOUT - 0.1)
    assert errors == []
    daemon.reactor.advance(0.1)
    (f,) = errors
    assert f.check(Timeout) and "within 5 s" in str(f.value)
    # A late reply finds nothing pending and changes nothing.
    ready.message(wire.encode("reply", id=1, ok=True, result={}), False)


def test_a_request_may_give_its_own_timeout(ready, daemon):
    d = ready.request("list_files", timeout=30, job=None, path="/", recursive=True)
    errors = []
    d.addErrback(errors.append)
    daemon.reactor.advance(REQUEST_TIMEOUT + 1)
    assert errors == []
    daemon.reactor.advance(30)
    assert errors[0].check(Timeout)


def test_losing_the_connection_fails_pending_requests_and_fires_gone(ready, daemon):
    d = ready.request("cancel", job=5)
    errors = []
    d.addErrback(errors.append)
    gone = ready.gone()
    ready.lost(1006, "connection lost")
    assert errors[0].check(ClusterOffline)
    assert gone.called
    assert daemon.clusters.events == ["hello", "ready", "lost"]
    assert not ready.ready
    assert daemon.reactor.getDelayedCalls() == []  # the timeout was cancelled too
    assert ready.gone().called  # asked after the end: fires at once


def test_a_closed_session_refuses_requests_and_sends_nothing(ready, protocol):
    ready.lost(1000, "bye")
    failures = []
    ready.request("cancel", job=5).addErrback(failures.append)
    assert failures[0].check(ClusterOffline)
    ready.send(wire.encode("ack", seqs=[1]))
    ready.close(4001, "superseded")
    assert protocol.frames == [] and protocol.closed == []


def test_send_message_sends_a_caller_built_frame_and_checks_it(ready, protocol):
    ready.send_message({"type": "cancel", "id": 77, "job": 5})
    assert frames(protocol) == [{"type": "cancel", "id": 77, "job": 5}]
    with pytest.raises(wire.ProtocolError):
        ready.send_message({"job": 5})
    with pytest.raises(wire.ProtocolError):
        ready.send_message({"type": "cancel", "job": "five", "id": 1})


def test_an_agent_closing_with_4005_leaves_its_reason_for_the_cluster(ready, daemon):
    assert ready.refusal is None
    ready.protocol.frames.clear()
    ready.lost(wire.CLOSE_INSTALLATION, "this agent directory belongs to installation X; "
                                        "use another agent directory")
    assert ready.refusal.startswith("this agent directory belongs to installation X")
    assert daemon.clusters.events[-1] == "lost"


def test_other_closes_leave_no_refusal(ready):
    ready.lost(1006, "gone")
    assert ready.refusal is None
