"""hpcd's local shell (run_local, LocalShell) and the command connections Django
holds (Shells), driven with a recording reactor, fake processes and a Clock;
a few tests start a real /bin/sh to keep the fakes true."""

import inspect
import signal

import pytest
from twisted.internet import defer
from twisted.internet.interfaces import IProcessTransport, IReactorProcess
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from djangoapp.protocol import NotFound, SSHFailed
from fakes import function_mismatches, mismatches
from hpcd import ssh
from hpcd.launch import LoginLimiter
from hpcd.shells import LocalShell, Shells, run_local, ssh_target
from hpcd.store import Store
from process_fakes import FakeProcess, ProcessReactor, run_in_reactor

IDLE = 600.0


def result_of(d):
    """The result of an already fired Deferred (raises its failure)."""
    outcome = []
    d.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if isinstance(outcome[0], defer.Failure):
        outcome[0].raiseException()
    return outcome[0]


def not_fired(d):
    return not d.called


# -- the fakes are true ---------------------------------------------------------


def test_the_fake_process_and_reactor_provide_twisteds_interfaces():
    reactor = ProcessReactor()
    assert verifyObject(IReactorProcess, reactor)
    assert function_mismatches(reactor.spawnProcess, PosixReactorBase.spawnProcess.__get__(
        reactor)) == []
    assert verifyObject(IProcessTransport, FakeProcess(None, "/bin/true", [], None, None))


def test_the_function_check_catches_a_drifted_fake():
    def run_command(reactor, target, command, stdin=b"", timeout=60):  # no connect_timeout
        pass

    assert len(function_mismatches(run_command, ssh.run_command)) == 1


def test_a_local_shell_takes_the_calls_an_ssh_connection_takes():
    assert mismatches(LocalShell, ssh.SSHConnection) == []


def test_a_real_sh_gives_what_the_fake_process_gives():
    script = "cat; echo to-err >&2; exit 3"
    real = run_in_reactor(lambda r: run_local(r, ["/bin/sh", "-c", script], stdin=b"in\n"))
    reactor = ProcessReactor()
    d = run_local(reactor, ["/bin/sh", "-c", script], stdin=b"in\n")
    process = reactor.processes[0]
    process.output(1, process.stdin)
    process.output(2, b"to-err\n")
    process.exit(3)
    assert result_of(d) == real == ssh.CommandResult(3, b"in\n", b"to-err\n", None)


def test_a_real_sh_killed_by_a_signal_is_named_as_sshd_names_it():
    real = run_in_reactor(lambda r: run_local(r, ["/bin/sh", "-c", "kill -TERM $$"]))
    reactor = ProcessReactor()
    d = run_local(reactor, ["/bin/sh", "-c", "kill -TERM $$"])
    reactor.processes[0].killed_by(signal.SIGTERM)
    # hpcd/ssh/session.py names it "SIG" + the name sshd sends (RFC 4254 6.10).
    assert result_of(d) == real == ssh.CommandResult(None, b"", b"", "SIGTERM")


def test_a_real_process_gets_the_environment_and_directory_asked_for(tmp_path):
    real = run_in_reactor(lambda r: run_local(r, ["/bin/sh", "-c", 'pwd; echo "$ONLY"'],
                                              env={"ONLY": "this"}, path=str(tmp_path)))
    assert real.stdout.decode().split() == [str(tmp_path), "this"]


# -- run_local -------------------------------------------------------------------


def test_stdin_is_written_then_closed_before_any_output():
    reactor = ProcessReactor()
    run_local(reactor, ["/bin/cat"], stdin=b"secret token\n")
    process = reactor.processes[0]
    assert (process.executable, process.args) == ("/bin/cat", ["/bin/cat"])
    assert (process.stdin, process.stdin_closed) == (b"secret token\n", True)


def test_without_stdin_the_process_reads_eof_at_once():
    reactor = ProcessReactor()
    run_local(reactor, ["/bin/cat"])
    assert (reactor.processes[0].stdin, reactor.processes[0].stdin_closed) == (b"", True)


def test_a_failing_command_is_a_result_not_an_error():
    reactor = ProcessReactor()
    d = run_local(reactor, ["/bin/false"])
    reactor.processes[0].exit(1)
    assert result_of(d) == ssh.CommandResult(1, b"", b"", None)


def test_output_arriving_in_pieces_is_joined_per_stream():
    reactor = ProcessReactor()
    d = run_local(reactor, ["/bin/prog"])
    process = reactor.processes[0]
    for fd, data in [(1, b"a"), (2, b"x"), (1, b"b"), (2, b"y"), (3, b"other fd: dropped")]:
        process.output(fd, data)
    process.exit(0)
    assert result_of(d) == ssh.CommandResult(0, b"ab", b"xy", None)


def test_a_command_past_its_timeout_is_killed_and_reported():
    reactor = ProcessReactor()
    d = run_local(reactor, ["/bin/sh", "-c", "sleep 100"], timeout=30)
    process = reactor.processes[0]
    reactor.advance(29.9)
    assert not_fired(d) and process.signals == []
    reactor.advance(0.1)
    assert process.signals == ["KILL"]
    with pytest.raises(ssh.SSHError) as caught:
        result_of(d)
    assert caught.value.reason == "timeout"
    assert str(caught.value) == ("cluster 'localhost': the command 'sleep 100' did not finish "
                                 "within 30 s and was killed.")
    process.killed_by(signal.SIGKILL)  # arrives later: ignored


def test_output_over_the_limit_kills_the_command_and_fails_it():
    reactor = ProcessReactor()
    d = run_local(reactor, ["/usr/bin/yes"], max_output=10)
    process = reactor.processes[0]
    process.output(1, b"y\n" * 3)
    process.output(2, b"err")
    assert not_fired(d)
    process.output(1, b"y\n" * 3)
    assert process.signals == ["KILL"]
    with pytest.raises(ssh.SSHError) as caught:
        result_of(d)
    assert caught.value.reason == "command_failed"
    assert "'/usr/bin/yes' wrote more than 10 bytes" in str(caught.value)
    process.output(1, b"y\n")  # still draining: dropped
    process.killed_by(signal.SIGKILL)


def test_a_process_that_cannot_be_started_is_command_failed():
    reactor = ProcessReactor()
    reactor.refuse_with = OSError(11, "Resource temporarily unavailable")
    with pytest.raises(ssh.SSHError) as caught:
        result_of(run_local(reactor, ["/bin/true"]))
    assert caught.value.reason == "command_failed"
    assert "could not be started" in str(caught.value)


def test_a_local_shell_runs_commands_with_sh_in_hpcds_environment():
    reactor = ProcessReactor()
    shell = LocalShell(reactor)
    d = shell.run("echo $HOME", stdin=b"in", timeout=5)
    process = reactor.processes[0]
    assert (process.args, process.env, process.path) == (["/bin/sh", "-c", "echo $HOME"], None,
                                                         None)
    process.output(1, b"/home/hpcd\n")
    process.exit(0)
    assert result_of(d).stdout == b"/home/hpcd\n"
    assert result_of(shell.close()) is None


# -- Shells: the connections Django holds ----------------------------------------


CLUSTERS = {
    1: {"id": 1, "host_name": "localhost", "port": 22, "username": "", "key": "",
        "password": "", "host_key": ""},
    2: {"id": 2, "host_name": "login.example.org", "port": 2222, "username": "hpc",
        "key": "", "password": "pw", "host_key": "ssh-ed25519 AAAA"},
}


class FakeStore:
    def cluster(self, cluster_id):
        return defer.succeed(CLUSTERS.get(cluster_id))


class FakeConnection:
    """An SSHConnection whose commands finish when the test says."""

    def __init__(self):
        self.commands = []  # (command, stdin, timeout, Deferred)
        self.closed = False

    def run(self, command, stdin=b"", timeout=60, max_output=ssh.MAX_OUTPUT_BYTES):
        d = defer.Deferred()
        self.commands.append((command, stdin, timeout, d))
        return d

    def close(self):
        self.closed = True
        return defer.succeed(None)


class FakeSSH:
    """Stands in for hpcd.ssh.open_connection."""

    def __init__(self):
        self.opened = []  # (target, connection)
        self.error = None

    def open_connection(self, reactor, target, timeout=30):
        if self.error is not None:
            return defer.fail(self.error)
        connection = FakeConnection()
        self.opened.append((target, connection))
        return defer.succeed(connection)


@pytest.fixture
def fake_ssh(monkeypatch):
    fake = FakeSSH()
    monkeypatch.setattr(ssh, "open_connection", fake.open_connection)
    return fake


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def shells(clock):
    return Shells(clock, FakeStore(), LoginLimiter(clock, per_minute=2), IDLE)


def test_the_shells_fakes_match_the_real_code():
    assert mismatches(FakeStore, Store) == []
    assert mismatches(FakeConnection, ssh.SSHConnection) == []
    assert function_mismatches(FakeSSH().open_connection, ssh.open_connection) == []


def test_localhost_gets_a_local_shell_and_no_login(monkeypatch, fake_ssh):
    reactor = ProcessReactor()
    shells = Shells(reactor, FakeStore(), LoginLimiter(reactor, per_minute=1), IDLE)
    shell_id = result_of(shells.open(1))
    d = shells.run(shell_id, "hostname", b"", 10.0)
    reactor.processes[0].output(1, b"here\n")
    reactor.processes[0].exit(0)
    assert result_of(d) == ssh.CommandResult(0, b"here\n", b"", None)
    assert fake_ssh.opened == []


def test_an_ssh_connection_logs_in_with_the_clusters_credentials(shells, fake_ssh):
    shell_id = result_of(shells.open(2))
    [(target, connection)] = fake_ssh.opened
    assert target == ssh_target(CLUSTERS[2])
    assert (target.host, target.port, target.username, target.password, target.key) == (
        "login.example.org", 2222, "hpc", "pw", None)
    d = shells.run(shell_id, "squeue", b"data", 30.0)
    assert [c[:3] for c in connection.commands] == [("squeue", b"data", 30.0)]
    connection.commands[0][3].callback(ssh.CommandResult(0, b"ok", b"", None))
    assert result_of(d).stdout == b"ok"


def test_ids_are_new_for_each_connection(shells, fake_ssh):
    assert [result_of(shells.open(2)) for _ in range(2)] == [1, 2]


def test_ssh_logins_wait_for_the_clusters_login_limit(shells, fake_ssh, clock):
    result_of(shells.open(2))
    result_of(shells.open(2))
    third = shells.open(2)
    assert not_fired(third) and len(fake_ssh.opened) == 2
    clock.advance(60)
    assert result_of(third) == 3


def test_an_unknown_cluster_is_not_found(shells):
    with pytest.raises(NotFound):
        result_of(shells.open(99))


def test_a_failed_login_is_ssh_failed_with_the_ssh_message(shells, fake_ssh):
    fake_ssh.error = ssh.SSHError("auth_failed", "cluster 'x': refused the login")
    with pytest.raises(SSHFailed, match="refused the login"):
        result_of(shells.open(2))


def test_a_failed_command_is_ssh_failed_and_the_connection_stays(shells, fake_ssh):
    shell_id = result_of(shells.open(2))
    connection = fake_ssh.opened[0][1]
    d = shells.run(shell_id, "sleep 99", b"", 1.0)
    connection.commands[0][3].errback(ssh.SSHError("timeout", "did not finish within 1 s"))
    with pytest.raises(SSHFailed, match="did not finish"):
        result_of(d)
    assert not connection.closed
    shells.run(shell_id, "true", b"", 1.0)
    assert len(connection.commands) == 2


def test_an_idle_connection_is_closed_and_then_not_found(shells, fake_ssh, clock):
    shell_id = result_of(shells.open(2))
    clock.advance(IDLE - 1)
    assert not fake_ssh.opened[0][1].closed
    clock.advance(1)
    assert fake_ssh.opened[0][1].closed
    with pytest.raises(NotFound, match="open a new one"):
        result_of(shells.run(shell_id, "true", b"", 1.0))


def test_each_command_restarts_the_idle_time(shells, fake_ssh, clock):
    shell_id = result_of(shells.open(2))
    connection = fake_ssh.opened[0][1]
    clock.advance(IDLE - 1)
    shells.run(shell_id, "true", b"", 1.0)
    connection.commands[0][3].callback(ssh.CommandResult(0, b"", b"", None))
    clock.advance(IDLE - 1)
    assert not connection.closed
    clock.advance(1)
    assert connection.closed


def test_a_connection_running_a_long_command_is_not_idle(shells, fake_ssh, clock):
    shell_id = result_of(shells.open(2))
    connection = fake_ssh.opened[0][1]
    d = shells.run(shell_id, "make", b"", 3 * IDLE)
    clock.advance(2 * IDLE)
    assert not connection.closed
    connection.commands[0][3].callback(ssh.CommandResult(0, b"built", b"", None))
    assert result_of(d).stdout == b"built"
    clock.advance(IDLE)
    assert connection.closed


def test_closing_twice_and_close_all(shells, fake_ssh, clock):
    first, second = result_of(shells.open(2)), result_of(shells.open(2))
    assert result_of(shells.close(first)) is None
    assert result_of(shells.close(first)) is None
    result_of(shells.close_all())
    assert [c.closed for _, c in fake_ssh.opened] == [True, True]
    assert clock.getDelayedCalls() == []
    with pytest.raises(NotFound):
        result_of(shells.run(second, "true", b"", 1.0))


def test_a_command_ending_after_its_connection_closed_starts_no_timer(shells, fake_ssh, clock):
    shell_id = result_of(shells.open(2))
    d = shells.run(shell_id, "true", b"", 1.0)
    shells.close(shell_id)
    fake_ssh.opened[0][1].commands[0][3].callback(ssh.CommandResult(0, b"", b"", None))
    assert result_of(d).exit_status == 0
    assert clock.getDelayedCalls() == []


def test_run_takes_what_the_amp_responder_passes():
    # hpcd/ipc.py calls shells.run(shell_id, command, stdin, timeout_seconds).
    assert list(inspect.signature(Shells.run).parameters) == [
        "self", "shell_id", "command", "stdin", "timeout"]
