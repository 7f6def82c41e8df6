"""hpcd's AMP server for Django (hpcd.ipc.ControlProtocol), over an in-memory
connection (twisted.test.iosim) with a fake daemon: what Django sends, what it
gets back, and how failures are translated into the errors Django sees."""

import datetime

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test import iosim

from djangoapp import protocol as commands
from djangoapp.protocol import (AgentError, ClusterOffline, HpcdError, NotFound, PathRefused,
                                Timeout)
from fakes import mismatches
from hpcd.agents import AgentSession
from hpcd.clusters import ClusterManager
from hpcd.ipc import ControlProtocol
from hpcd.store import Store

UTC = datetime.timezone.utc


class FakeSession:
    def __init__(self, cluster_id, pages=None):
        self.cluster_id = cluster_id
        self.token_id = 40 + cluster_id
        self.claim = {"purpose": "agent", "created": datetime.datetime(2026, 1, 2, tzinfo=UTC),
                      "expires": None, "used_at": datetime.datetime(2026, 1, 3, tzinfo=UTC)}
        self.requests = []
        self.pages = pages or []
        self.sent = []

    def request(self, mtype, timeout=None, **fields):
        self.requests.append((mtype, fields))
        return defer.succeed(self.pages.pop(0))

    def send_message(self, message):
        self.sent.append(message)


class FakeClusters:
    def __init__(self):
        self.sessions = {}
        self.connects = []

    def session(self, cluster_id):
        return self.sessions.get(cluster_id)

    def require_session(self, cluster_id):
        if cluster_id not in self.sessions:
            raise ClusterOffline(f"cluster {cluster_id} has no connected agent")
        return self.sessions[cluster_id]

    def try_connect(self, cluster_id, force):
        self.connects.append((cluster_id, force))
        if cluster_id == 404:
            return defer.fail(NotFound("no enabled cluster with id 404"))
        if cluster_id == 500:
            return defer.fail(RuntimeError("a bug"))
        return defer.succeed(None)


class FakeDispatcher:
    def __init__(self):
        self.notified = []

    def notify(self, job_id):
        self.notified.append(job_id)
        return defer.Deferred()  # never fires: Django must not wait for it


class FakeStore:
    def token_cluster(self, token_id):
        return defer.succeed({41: 1}.get(token_id))


class FakeSettings:
    HPC_AGENT_REQUEST_TIMEOUT = 60.0


class FakeDaemon:
    def __init__(self):
        self.clusters = FakeClusters()
        self.dispatcher = FakeDispatcher()
        self.store = FakeStore()
        self.settings = FakeSettings()
        self.reactor = Clock()


def test_the_fakes_match_the_real_classes():
    assert mismatches(FakeClusters, ClusterManager) == []
    assert mismatches(FakeStore, Store) == []
    assert mismatches(FakeSession, AgentSession) == []


@pytest.fixture
def daemon():
    return FakeDaemon()


@pytest.fixture
def call(daemon):
    server = ControlProtocol(daemon)
    client = amp.AMP()
    pump = iosim.connect(server, iosim.makeFakeServer(server), client,
                         iosim.makeFakeClient(client))

    def call(command, **arguments):
        results = []
        client.callRemote(command, **arguments).addBoth(results.append)
        pump.flush()
        (result,) = results
        if hasattr(result, "raiseException"):
            result.raiseException()
        return result

    call.client, call.pump = client, pump
    return call


def test_is_cluster_online_answers_the_live_token_from_memory(call, daemon):
    assert call(commands.IsClusterOnline, cluster_id=1)["token_id"] == 0
    daemon.clusters.sessions[1] = FakeSession(1)
    answer = call(commands.IsClusterOnline, cluster_id=1)
    assert answer["token_id"] == 41 and answer["token_purpose"] == "agent"
    assert answer["token_created"] == datetime.datetime(2026, 1, 2, tzinfo=UTC)
    assert answer["token_expires"] is None


def test_dispatch_answers_at_once_and_the_work_goes_on(call, daemon):
    assert call(commands.Dispatch, job_id=9) == {}
    assert daemon.dispatcher.notified == [9]


def test_try_connect_passes_errors_as_djangos_classes(call, daemon):
    assert call(commands.TryConnect, cluster_id=1, force=True) == {}
    with pytest.raises(NotFound, match="404"):
        call(commands.TryConnect, cluster_id=404, force=False)
    # A bug in hpcd is an HpcdError with its message, and the connection lives on.
    with pytest.raises(HpcdError, match="hpcd failed: a bug"):
        call(commands.TryConnect, cluster_id=500, force=False)
    assert call(commands.TryConnect, cluster_id=2, force=False) == {}
    assert daemon.clusters.connects == [(1, True), (404, False), (500, False), (2, False)]


def test_a_file_list_is_gathered_from_the_agents_pages(call, daemon):
    daemon.clusters.sessions[1] = FakeSession(1, pages=[
        {"files": [["a", False, 1]], "truncated": True, "next": 1},
        {"files": [["b", True, 0]], "truncated": False, "next": None}])
    answer = call(commands.ListFiles, cluster_id=1, job_id=5, path="/", recursive=True)
    assert answer == {"files": [["a", False, 1], ["b", True, 0]]}
    assert [f["offset"] for _, f in daemon.clusters.sessions[1].requests] == [0, 1]


def test_an_offline_cluster_and_a_refused_path_keep_their_error_classes(call, daemon):
    with pytest.raises(ClusterOffline):
        call(commands.ListFiles, cluster_id=3, job_id=5, path="/", recursive=False)
    session = daemon.clusters.sessions[1] = FakeSession(1)
    session.request = lambda mtype, timeout=None, **fields: defer.fail(
        AgentError("the agent answered path_refused: outside", "path_refused"))
    with pytest.raises(PathRefused, match="outside"):
        call(commands.ListFiles, cluster_id=1, job_id=5, path="../x", recursive=False)


def test_send_message_goes_only_over_the_tokens_live_connection(call, daemon):
    session = daemon.clusters.sessions[1] = FakeSession(1)
    assert call(commands.SendMessage, token_id=41, message={"type": "ack", "seqs": []}) == {}
    assert session.sent == [{"type": "ack", "seqs": []}]
    with pytest.raises(NotFound, match="no live connection"):
        call(commands.SendMessage, token_id=99, message={"type": "ack", "seqs": []})


def test_a_file_lists_pages_share_one_agent_deadline(call, daemon):
    """Django waits HPC_AGENT_REQUEST_TIMEOUT and a margin for ListFiles
    (issue 9, item 8): every page together gets that timeout, not each."""
    session = daemon.clusters.sessions[1] = FakeSession(1)
    clock, answers, timeouts = daemon.reactor, [], []

    def request(mtype, timeout=None, **fields):
        timeouts.append(timeout)
        clock.advance(25)  # each page takes 25 s
        return defer.succeed({"files": [[f"f{len(timeouts)}", False, 1]], "truncated": True,
                              "next": len(timeouts)})

    session.request = request
    server = ControlProtocol(daemon)
    server.list_files(cluster_id=1, job_id=5, path="/", recursive=True).addBoth(
        answers.append)
    (failure,) = answers
    assert failure.check(Timeout)
    assert "did not list '/' within 60 s" in failure.getErrorMessage()
    assert timeouts == [60, 35, 10]


@pytest.fixture
def failures():
    """Log events carrying a traceback (log.failure) while the test runs."""
    from twisted.logger import globalLogPublisher

    events = []

    def observe(event):
        if "log_failure" in event:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def ask_raw(call, name, **strings):
    """Send a command with raw string arguments, as a broken or hostile client would."""
    client = call.client
    results = []
    client.callRemoteString(name, **strings).addBoth(results.append)
    call.pump.flush()
    (result,) = results
    return result


@pytest.mark.parametrize("name,strings", [
    (b"ListFiles", {"cluster_id": b"one", "path": b"/", "recursive": b"True"}),
    (b"ListFiles", {"path": b"/", "recursive": b"True"}),  # cluster_id missing
    (b"ListFiles", {"cluster_id": b"1", "path": b"\xff\xfe", "recursive": b"True"}),
    (b"ListFiles", {"cluster_id": b"1", "path": b"/", "recursive": b"maybe"}),
    (b"IsClusterOnline", {"cluster_id": b"9" * 40}),  # beyond any database integer
    (b"SendMessage", {"token_id": b"1", "message": b"2", "message.0": b"{", "message.1": b""}),
    (b"SendMessage", {"token_id": b"1", "message": b"7"}),  # parts missing
    (b"FetchFile", {"cluster_id": b"1", "path": b"/x", "offset": b"1.5"}),
    (b"OpenShell", {"cluster_id": b"-" + b"9" * 30}),
])
def test_unreadable_arguments_get_bad_request_and_no_traceback(call, daemon, failures, name,
                                                                strings):
    daemon.clusters.sessions[1] = FakeSession(1, pages=[{"files": [], "truncated": False}])
    result = ask_raw(call, name, **strings)
    assert result.check(amp.RemoteAmpError)
    assert result.value.errorCode == commands.BAD_REQUEST
    assert "could not read the arguments of" in result.value.description
    assert failures == []
    # The connection still serves.
    assert call(commands.IsClusterOnline, cluster_id=1)["token_id"] == 41


def test_an_unknown_command_is_answered_unhandled_without_a_traceback(call, daemon, failures):
    result = ask_raw(call, b"LaunchMissiles", target=b"moon")
    assert result.check(amp.UnhandledCommand)
    assert failures == []
    assert call(commands.IsClusterOnline, cluster_id=7)["token_id"] == 0


@pytest.mark.parametrize("box", [
    {b"_answer": b"99", b"x": b"1"},  # an answer to a question hpcd never asked
    {b"_error": b"99", b"_error_code": b"X", b"_error_description": b""},
    {b"just": b"data"},
    {b"_command": b"IsClusterOnline", b"cluster_id": b"1"},  # no _ask: no one to answer
])
def test_a_box_that_is_no_question_closes_the_connection_without_a_traceback(daemon,
                                                                             failures, box):
    from twisted.internet.testing import StringTransport

    server = ControlProtocol(daemon)
    transport = StringTransport()
    server.makeConnection(transport)
    server.dataReceived(amp.AmpBox(box).serialize())
    assert transport.disconnecting
    assert failures == []


def test_arguments_the_agents_protocol_cannot_carry_are_a_bad_request(call, daemon,
                                                                      failures):
    """A negative offset, say: AMP reads it, the wire refuses to encode it.
    That was "hpcd failed" with a traceback in hpcd's log per request."""
    from hpc_agent import wire

    def request(mtype, timeout=None, **fields):
        raise wire.ProtocolError("bad_frame", "'offset' must be a count, got -5")

    session = daemon.clusters.sessions[1] = FakeSession(1)
    session.request = request
    # As Django's client sees it: the wire's error code (ipc.ERROR_CLASSES).
    result = ask_raw(call, b"ListFiles", cluster_id=b"1", job_id=b"5", path=b"/",
                     recursive=b"False")
    assert result.value.errorCode == commands.BAD_REQUEST
    assert "offset" in result.value.description
    result = ask_raw(call, b"SendMessage", token_id=b"41", message=b"1",
                     **{"message.0": b"[1, 2]"})
    assert result.value.errorCode == commands.BAD_REQUEST
    assert "JSON object" in result.value.description
    assert failures == []


def test_notify_needs_no_ask_tag_is_never_answered_and_passes_the_hints(daemon, failures):
    from twisted.internet.testing import StringTransport

    daemon.dispatcher.notify = lambda *args: daemon.dispatcher.notified.append(args)
    server = ControlProtocol(daemon)
    transport = StringTransport()
    server.makeConnection(transport)
    for arguments in ({"job_id": 5, "status": 10, "cluster_id": 2}, {"job_id": 0}):
        box = commands.Notify.makeArguments(arguments, None)
        box[b"_command"] = b"Notify"
        server.dataReceived(box.serialize())
    assert daemon.dispatcher.notified == [(5, 10, 2), (0, None, None)]
    assert transport.value() == b"" and not transport.disconnecting
    assert failures == []


def test_answers_at_once_are_the_same_as_amps_dispatch(call, daemon, monkeypatch):
    """IsClusterOnline and Dispatch skip AMP's Deferreds (hpcd.ipc._AT_ONCE);
    the client cannot tell the difference."""
    from hpcd import ipc as server_ipc

    daemon.clusters.sessions[1] = FakeSession(1)
    fast = [call(commands.IsClusterOnline, cluster_id=1), call(commands.Dispatch, job_id=4)]
    monkeypatch.setattr(server_ipc, "_AT_ONCE", {})
    slow = [call(commands.IsClusterOnline, cluster_id=1), call(commands.Dispatch, job_id=4)]
    assert fast == slow and fast[0]["token_purpose"] == "agent"
    assert daemon.dispatcher.notified == [4, 4]


def test_a_bug_in_an_answer_at_once_is_answered_and_logged_as_amp_does(call, daemon,
                                                                        failures):
    """The fast path leaves a failing responder to AMP's dispatch: the
    client gets an error, not silence, and the bug is logged."""
    daemon.clusters.sessions[1] = FakeSession(1)
    daemon.clusters.sessions[1].claim = None  # a bug: .get() fails
    with pytest.raises(amp.UnknownRemoteError):
        call(commands.IsClusterOnline, cluster_id=1)
    assert len(failures) == 1
    failures.clear()


class WritingTransport:
    """A StringTransport that also counts doWrite(), as a socket's transport has."""

    def __init__(self, disconnecting=False):
        from twisted.internet.testing import StringTransport

        self.inner = StringTransport()
        self.connected = True
        self.disconnecting = disconnecting
        self.writes_now = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def doWrite(self):
        self.writes_now += 1


@pytest.mark.parametrize("disconnecting", [False, True])
def test_an_answer_at_once_is_written_out_before_the_next_poll(daemon, disconnecting):
    server = ControlProtocol(daemon)
    transport = WritingTransport(disconnecting)
    server.makeConnection(transport)
    box = commands.IsClusterOnline.makeArguments({"cluster_id": 1}, None)
    box.update({b"_command": b"IsClusterOnline", b"_ask": b"1"})
    server.dataReceived(box.serialize())
    assert transport.writes_now == (0 if disconnecting else 1)
    assert b"token_id" in transport.inner.value()
