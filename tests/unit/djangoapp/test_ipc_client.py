"""Django's blocking AMP client for hpcd (djangoapp.ipc), against a plain-socket
fake hpcd on a thread that parses boxes itself and answers with AmpBox.serialize()."""

import json
import os
import socket
import struct
import tempfile
import threading
import time

import pytest
from twisted.protocols import amp

from djangoapp import ipc
from hpcd import commands

CLOSE = object()  # an answer: close the connection without answering
SILENCE = None  # an answer: say nothing, keep the connection


def read_box(conn):
    """One AMP box from ``conn`` as a dict, or None at EOF."""
    def exact(n):
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    box = {}
    try:
        while True:
            (n,) = struct.unpack("!H", exact(2))
            if n == 0:
                return box
            key = exact(n)
            (n,) = struct.unpack("!H", exact(2))
            box[key] = exact(n)
    except EOFError:
        return None


class FakeHpcd:
    """Listens on ``path``; ``answer(box)`` returns an AmpBox, SILENCE or CLOSE."""

    def __init__(self, path, answer):
        self.path = path
        self.answer = answer
        self.received = []  # (connection number, box)
        self.accepted = 0
        self._stopping = False
        self._conns = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stopping:
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            self._conns.append(conn)
            threading.Thread(target=self._handle, args=(conn, self.accepted),
                             daemon=True).start()

    def _handle(self, conn, number):
        try:
            while True:
                box = read_box(conn)
                if box is None:
                    return
                self.received.append((number, box))
                answer = self.answer(box)
                if answer is CLOSE:
                    conn.close()
                    return
                if answer is not SILENCE:
                    conn.sendall(answer.serialize())
        except OSError:
            return

    def stop(self):
        """Like hpcd exiting: every connection and the socket go away."""
        self._stopping = True
        self._thread.join(timeout=5)
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self.listener.close()
        os.unlink(self.path)


def answer_with(**values):
    def answer(box):
        return amp.AmpBox(_answer=box[b"_ask"], **values)
    return answer


@pytest.fixture
def socket_path(settings):
    """A short socket path (Unix sockets allow ~107 bytes) the client is told to use."""
    with tempfile.TemporaryDirectory(prefix="hpc-ipc-") as directory:
        path = os.path.join(directory, "hpcd.sock")
        settings.HPC_IPC_UNIX_SOCKET = path
        settings.HPC_IPC_TIMEOUT = 2.0
        yield path


@pytest.fixture
def servers():
    started = []

    def start(path, answer):
        server = FakeHpcd(path, answer)
        started.append(server)
        return server

    yield start
    connection = getattr(ipc._local, "connection", None)
    if connection is not None:
        connection.close()
        ipc._local.connection = None
    for server in started:
        if not server._stopping:
            server.stop()


def test_a_command_is_sent_as_one_box_and_its_answer_parsed(socket_path, servers):
    server = servers(socket_path, answer_with(token_id=b"42"))
    assert ipc.call(commands.IsClusterOnline, cluster_id=3) == {
        "token_id": 42, "token_purpose": None, "token_created": None, "token_expires": None,
        "token_used_at": None}
    ((_, box),) = server.received
    assert box[b"_command"] == b"IsClusterOnline"
    assert box[b"cluster_id"] == b"3"
    assert box[b"_ask"].isdigit()


def test_one_connection_is_reused_for_calls_on_the_same_thread(socket_path, servers):
    server = servers(socket_path, answer_with(token_id=b"0"))
    for cluster_id in range(3):
        assert ipc.call(commands.IsClusterOnline, cluster_id=cluster_id)["token_id"] == 0
    assert server.accepted == 1
    assert len({box[b"_ask"] for _, box in server.received}) == 3


def test_each_thread_has_its_own_connection(socket_path, servers):
    server = servers(socket_path, answer_with(token_id=b"1"))
    ipc.call(commands.IsClusterOnline, cluster_id=1)
    results = []

    def other_thread():
        results.append(ipc.call(commands.IsClusterOnline, cluster_id=2)["token_id"])
        ipc._local.connection.close()

    t = threading.Thread(target=other_thread)
    t.start()
    t.join(timeout=10)
    assert results == [1] and server.accepted == 2


def test_a_large_json_answer_arrives_whole_across_many_amp_values(socket_path, servers):
    files = [[f"dir/file-{i:06d}.dat", False, i * 1000] for i in range(8000)]
    data = json.dumps(files).encode()
    assert len(data) > 200_000
    part = commands.JSONValue.PART
    parts = [data[i:i + part] for i in range(0, len(data), part)]
    values = {f"files.{i}": p for i, p in enumerate(parts)}

    def answer(box):
        result = amp.AmpBox(_answer=box[b"_ask"], files=str(len(parts)).encode())
        result.update({k.encode(): v for k, v in values.items()})
        return result

    servers(socket_path, answer)
    assert len(parts) >= 4 and all(len(p) <= 65535 for p in parts)
    assert ipc.call(commands.ListFiles, cluster_id=1, job_id=None, path="/",
                    recursive=True) == {"files": files}


def test_a_large_json_argument_is_split_into_amp_sized_values(socket_path, servers):
    server = servers(socket_path, lambda box: amp.AmpBox(_answer=box[b"_ask"]))
    message = {"type": "cancel", "id": 1, "job": 5, "padding": "x" * 150_000}
    assert ipc.call(commands.SendMessage, token_id=9, message=message) == {}
    ((_, box),) = server.received
    count = int(box[b"message"])
    assert count >= 3
    joined = b"".join(box[b"message.%d" % i] for i in range(count))
    assert json.loads(joined) == message


@pytest.mark.parametrize("code,cls", sorted(commands.ERROR_CLASSES.items()))
def test_an_error_answer_raises_the_matching_exception_with_hpcds_message(
        socket_path, servers, code, cls):
    def answer(box):
        return amp.AmpBox(_error=box[b"_ask"], _error_code=code,
                          _error_description="cluster 'hpc1' has no connected agent".encode())

    servers(socket_path, answer)
    with pytest.raises(cls) as info:
        ipc.call(commands.ListFiles, cluster_id=1, job_id=5, path="/", recursive=False)
    assert type(info.value) is cls
    assert str(info.value) == "cluster 'hpc1' has no connected agent"


def test_an_unknown_error_code_raises_the_base_hpcd_error(socket_path, servers):
    servers(socket_path, lambda box: amp.AmpBox(_error=box[b"_ask"], _error_code=b"WEIRD",
                                                 _error_description=b""))
    with pytest.raises(commands.HpcdError) as info:
        ipc.call(commands.Dispatch, job_id=1)
    assert type(info.value) is commands.HpcdError and str(info.value) == "WEIRD"


def test_an_error_answer_keeps_the_connection_usable(socket_path, servers):
    answers = iter([amp.AmpBox(_error_code=b"NOT_FOUND", _error_description=b"no such"),
                    amp.AmpBox(token_id=b"5")])

    def answer(box):
        result = next(answers)
        result[b"_error" if b"_error_code" in result else b"_answer"] = box[b"_ask"]
        return result

    server = servers(socket_path, answer)
    with pytest.raises(commands.NotFound):
        ipc.call(commands.IsClusterOnline, cluster_id=1)
    assert ipc.call(commands.IsClusterOnline, cluster_id=1)["token_id"] == 5
    assert server.accepted == 1


def test_an_absent_hpcd_raises_hpcd_unavailable_naming_the_socket(socket_path):
    with pytest.raises(ipc.HpcdUnavailable) as info:
        ipc.call(commands.IsClusterOnline, cluster_id=1)
    assert socket_path in str(info.value)
    assert getattr(ipc._local, "connection", None) is None


def test_an_hpcd_restart_is_survived_by_reconnecting_once(socket_path, servers):
    first = servers(socket_path, answer_with(token_id=b"1"))
    assert ipc.call(commands.IsClusterOnline, cluster_id=1)["token_id"] == 1
    first.stop()
    second = servers(socket_path, answer_with(token_id=b"2"))
    assert ipc.call(commands.IsClusterOnline, cluster_id=1)["token_id"] == 2
    assert second.accepted == 1 and len(second.received) == 1


def test_a_connection_closed_by_hpcd_between_calls_is_replaced(socket_path, servers):
    server = servers(socket_path, answer_with(token_id=b"3"))
    ipc.call(commands.IsClusterOnline, cluster_id=1)
    server._conns[0].shutdown(socket.SHUT_RDWR)
    server._conns[0].close()
    assert ipc.call(commands.IsClusterOnline, cluster_id=1)["token_id"] == 3
    assert server.accepted == 2


def test_a_command_whose_answer_was_lost_is_not_sent_again(socket_path, servers):
    seen = []

    def answer(box):
        seen.append(box)
        return CLOSE if len(seen) == 1 else amp.AmpBox(_answer=box[b"_ask"])

    servers(socket_path, answer)
    with pytest.raises(ipc.HpcdUnavailable):
        ipc.call(commands.TryConnect, cluster_id=1, force=True)
    assert len(seen) == 1


def test_a_silent_hpcd_raises_hpcd_unavailable_after_the_timeout(socket_path, servers,
                                                                  settings):
    settings.HPC_IPC_TIMEOUT = 0.3
    server = servers(socket_path, lambda box: SILENCE)
    start = time.monotonic()
    with pytest.raises(ipc.HpcdUnavailable, match="did not answer"):
        ipc.call(commands.IsClusterOnline, cluster_id=1)
    assert 0.3 <= time.monotonic() - start < 2
    assert len(server.received) == 1  # not repeated
    assert getattr(ipc._local, "connection", None) is None


def test_a_per_call_timeout_overrides_the_setting(socket_path, servers, settings):
    settings.HPC_IPC_TIMEOUT = 30
    servers(socket_path, lambda box: SILENCE)
    start = time.monotonic()
    with pytest.raises(ipc.HpcdUnavailable):
        ipc.call(commands.IsClusterOnline, timeout=0.2, cluster_id=1)
    assert time.monotonic() - start < 2


def test_a_changed_socket_setting_opens_a_new_connection(socket_path, servers, settings):
    first = servers(socket_path, answer_with(token_id=b"1"))
    ipc.call(commands.IsClusterOnline, cluster_id=1)
    other = os.path.join(os.path.dirname(socket_path), "other.sock")
    servers(other, answer_with(token_id=b"2"))
    settings.HPC_IPC_UNIX_SOCKET = other
    assert ipc.call(commands.IsClusterOnline, cluster_id=1)["token_id"] == 2
    assert first.accepted == 1


def test_a_connection_inherited_across_fork_is_not_reused(monkeypatch, settings, tmp_path):
    """A pre-forking server's children must not share the parent's socket."""
    settings.HPC_IPC_UNIX_SOCKET = str(tmp_path / "nobody.sock")

    class Recorded:
        pid = os.getpid() + 1  # made by "another process"
        closed = False

        def close(self):
            self.closed = True

    inherited = Recorded()
    monkeypatch.setattr(ipc._local, "connection", inherited, raising=False)
    monkeypatch.setattr(ipc._local, "path", ipc.hpc_settings.HPC_IPC_UNIX_SOCKET, raising=False)
    with pytest.raises(ipc.HpcdUnavailable):
        ipc.call(commands.IsClusterOnline, cluster_id=1)  # no hpcd at this socket path
    assert inherited.closed


def test_an_agent_timeout_reaches_django_as_hpcds_timeout_not_as_a_silent_hpcd(
        socket_path, servers, settings, monkeypatch):
    """The deadlines nest: for a command that waits for the agent, Django
    waits longer than hpcd waits for the agent (issue 9, item 8)."""
    settings.HPC_IPC_TIMEOUT = 0.2
    settings.HPC_AGENT_REQUEST_TIMEOUT = 0.5
    monkeypatch.setattr(ipc, "AGENT_MARGIN_SECONDS", 1.0)

    def answer(box):
        time.sleep(0.6)  # hpcd waited HPC_AGENT_REQUEST_TIMEOUT for the agent, then answers
        return amp.AmpBox(_error=box[b"_ask"], _error_code=b"TIMEOUT",
                          _error_description=b"the agent of cluster 1 did not answer "
                                             b"list_files within 0.5 s")

    servers(socket_path, answer)
    with pytest.raises(commands.Timeout, match="the agent of cluster 1 did not answer"):
        ipc.call(commands.ListFiles, cluster_id=1, job_id=5, path="/", recursive=False)


@pytest.mark.parametrize("command", [commands.ListFiles, commands.FetchFile,
                                     commands.UploadFile])
def test_commands_that_wait_for_the_agent_get_longer_than_hpcd_gives_it(settings, command):
    settings.HPC_IPC_TIMEOUT = 30
    settings.HPC_AGENT_REQUEST_TIMEOUT = 60
    assert ipc._timeout(command) == 60 + ipc.AGENT_MARGIN_SECONDS
    assert ipc._timeout(commands.IsClusterOnline) == 30
    settings.HPC_IPC_TIMEOUT = 500  # never shortened
    assert ipc._timeout(command) == 500


# -- tell: commands that want no answer --------------------------------------------

def wait_until(predicate, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_tell_writes_one_box_without_an_ask_tag_and_reads_nothing(socket_path, servers):
    server = servers(socket_path, lambda box: SILENCE)  # a reading tell() would hang
    started = time.monotonic()
    assert ipc.tell(commands.Notify, job_id=7, status=10, cluster_id=2) is None
    assert time.monotonic() - started < 1
    wait_until(lambda: server.received)
    ((_, box),) = server.received
    assert box == {b"_command": b"Notify", b"job_id": b"7", b"status": b"10",
                   b"cluster_id": b"2"}


def test_tell_shares_the_threads_connection_with_call(socket_path, servers):
    server = servers(socket_path, lambda box: (
        amp.AmpBox(_answer=box[b"_ask"], token_id=b"5") if b"_ask" in box else SILENCE))
    ipc.tell(commands.Notify, job_id=1)
    assert ipc.call(commands.IsClusterOnline, cluster_id=1)["token_id"] == 5
    ipc.tell(commands.Notify, job_id=2)
    wait_until(lambda: len(server.received) == 3)
    assert server.accepted == 1
    assert [box[b"_command"] for _, box in server.received] == [
        b"Notify", b"IsClusterOnline", b"Notify"]


def test_tell_does_not_write_into_a_connection_hpcd_closed(socket_path, servers):
    """A write into a socket whose peer closed succeeds once and is lost;
    tell() notices the close first and writes on a new connection."""
    first = servers(socket_path, lambda box: SILENCE)
    ipc.tell(commands.Notify, job_id=1)
    wait_until(lambda: first.received)
    first.stop()
    second = servers(socket_path, lambda box: SILENCE)
    ipc.tell(commands.Notify, job_id=2)
    wait_until(lambda: second.received)
    assert [box[b"job_id"] for _, box in second.received] == [b"2"]


def test_tell_to_an_absent_hpcd_raises_hpcd_unavailable(socket_path):
    with pytest.raises(ipc.HpcdUnavailable, match="cannot reach hpcd"):
        ipc.tell(commands.Notify, timeout=0.2, job_id=1)
    assert getattr(ipc._local, "connection", None) is None


@pytest.mark.parametrize("value", [
    "2026-12-05T12:00:00.123456+00:00", "1969-07-20T20:17:40+00:00",
    "2026-06-01T10:00:00.000001+10:00"])
def test_utc_microseconds_carry_an_aware_time_exactly(value):
    import datetime

    moment = datetime.datetime.fromisoformat(value)
    argument = commands.UTCMicroseconds()
    back = argument.fromString(argument.toString(moment))
    assert back == moment and back.utcoffset() == datetime.timedelta(0)


def test_utc_microseconds_refuse_a_naive_time():
    import datetime

    with pytest.raises(ValueError, match="naive"):
        commands.UTCMicroseconds().toString(datetime.datetime(2026, 1, 1))
