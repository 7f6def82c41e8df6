"""Starting agents (hpcd.launch): the local launcher on a recording reactor with
fake processes, the SSH launcher with a fake ssh.run_command checked against
the real one, and both judging a launch command's result alike."""

import json
import signal

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from fakes import function_mismatches
from hpcd import ssh
from hpcd.launch import (
    LaunchFailed, Launcher, LocalLauncher, LoginLimiter, SSHLauncher, agent_command)
from hpcd.shells import ssh_target
from process_fakes import ProcessReactor

URL = "wss://hpcd.example.org:8001/agent"
TOKEN = "single-use-token"
TIMEOUT = 60.0


def result_of(d):
    """The result of an already fired Deferred (raises its failure)."""
    outcome = []
    d.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if isinstance(outcome[0], defer.Failure):
        outcome[0].raiseException()
    return outcome[0]


def cluster(host_name, client_path, **fields):
    return {"id": 7, "host_name": host_name, "port": 22, "username": "hpc", "key": "",
            "password": "pw", "host_key": "ssh-ed25519 AAAA", "client_path": client_path,
            **fields}


# -- the local launcher -----------------------------------------------------------


@pytest.fixture
def agent_dir(tmp_path):
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    return str(tmp_path)


def local_launch(agent_dir):
    reactor = ProcessReactor()
    d = LocalLauncher(reactor, timeout=TIMEOUT).launch(cluster("localhost", agent_dir), URL,
                                                       TOKEN)
    return reactor, d


def test_a_missing_agent_directory_fails_before_starting_anything(tmp_path):
    reactor = ProcessReactor()
    d = LocalLauncher(reactor).launch(cluster("localhost", str(tmp_path / "gone")), URL, TOKEN)
    with pytest.raises(LaunchFailed, match="gone does not exist"):
        result_of(d)
    assert reactor.processes == []


def test_a_missing_virtual_environment_says_how_to_make_one(tmp_path):
    reactor = ProcessReactor()
    d = LocalLauncher(reactor).launch(cluster("localhost", str(tmp_path)), URL, TOKEN)
    with pytest.raises(LaunchFailed, match="venv/bin/python not found: create the agent's"):
        result_of(d)
    assert reactor.processes == []


def test_the_agent_starts_by_the_ssh_launch_command_with_the_token_on_stdin_only(agent_dir,
                                                                              monkeypatch):
    monkeypatch.setenv("HPC_CREDENTIALS_KEY", "not for the agent")
    monkeypatch.setenv("LANG", "C.UTF-8")
    reactor, d = local_launch(agent_dir)
    [process] = reactor.processes
    # The SSH launch's command; no working directory, so Twisted can posix_spawn it.
    assert (process.executable, process.args, process.path) == (
        "/bin/sh", ["/bin/sh", "-c", agent_command(agent_dir)], None)
    assert json.loads(process.stdin) == {"token": TOKEN, "url": URL}
    assert process.stdin.endswith(b"\n") and process.stdin_closed
    assert process.env["LANG"] == "C.UTF-8"
    assert "HPC_CREDENTIALS_KEY" not in process.env
    assert not any(TOKEN in arg for arg in process.args)


def test_a_started_agent_reports_its_start_message(agent_dir):
    reactor, d = local_launch(agent_dir)
    reactor.processes[0].output(1, b"agent 1234 started in /srv/agent\n")
    reactor.processes[0].exit(0)
    assert result_of(d) == "agent 1234 started in /srv/agent"


def test_an_agent_that_exits_at_once_is_reported_with_its_own_words(agent_dir):
    reactor, d = local_launch(agent_dir)
    reactor.processes[0].output(1, b"starting\n")
    reactor.processes[0].output(2, b"No module named 'no'\n")
    reactor.processes[0].exit(2)
    with pytest.raises(LaunchFailed) as caught:
        result_of(d)
    assert str(caught.value) == "the agent exited at once (exit status 2): No module named 'no'"


def test_an_agent_that_hangs_is_killed_at_the_timeout(agent_dir):
    reactor, d = local_launch(agent_dir)
    reactor.advance(TIMEOUT)
    assert reactor.processes[0].signals == ["KILL"]
    with pytest.raises(LaunchFailed, match="did not finish within 60 s and was killed"):
        result_of(d)


# -- the SSH launcher --------------------------------------------------------------


class FakeSSH:
    """Stands in for hpcd.ssh.run_command; answers with ``outcome``."""

    def __init__(self, outcome):
        self.outcome = outcome  # a CommandResult or an SSHError
        self.calls = []

    def run_command(self, reactor, target, command, stdin=b"", timeout=60, connect_timeout=30):
        self.calls.append({"target": target, "command": command, "stdin": stdin,
                           "timeout": timeout})
        if isinstance(self.outcome, Exception):
            return defer.fail(self.outcome)
        return defer.succeed(self.outcome)


def fake_ssh(monkeypatch, outcome):
    fake = FakeSSH(outcome)
    monkeypatch.setattr(ssh, "run_command", fake.run_command)
    return fake


def ssh_launcher(clock=None, per_minute=6):
    clock = clock or Clock()
    return SSHLauncher(clock, LoginLimiter(clock, per_minute), timeout=TIMEOUT)


def test_the_fake_run_command_matches_the_real_one():
    assert function_mismatches(FakeSSH(None).run_command, ssh.run_command) == []


def test_an_ssh_launch_runs_the_agent_command_with_the_token_on_stdin(monkeypatch):
    fake = fake_ssh(monkeypatch, ssh.CommandResult(0, b"agent started\n", b""))
    info = cluster("login.example.org", "/home/hpc/agent dir")
    assert result_of(ssh_launcher().launch(info, URL, TOKEN)) == "agent started"
    [call] = fake.calls
    assert call["target"] == ssh_target(info)
    assert call["command"] == agent_command("/home/hpc/agent dir")
    assert "'/home/hpc/agent dir'" in call["command"]
    assert json.loads(call["stdin"]) == {"token": TOKEN, "url": URL}
    assert TOKEN not in call["command"]
    assert call["timeout"] == TIMEOUT


def test_an_ssh_failure_is_a_launch_failure_with_its_message(monkeypatch):
    fake_ssh(monkeypatch, ssh.SSHError("auth_failed", "cluster 'x': the login was refused"))
    with pytest.raises(LaunchFailed) as caught:
        result_of(ssh_launcher().launch(cluster("x", "/a"), URL, TOKEN))
    assert str(caught.value) == "cluster 'x': the login was refused"


def test_ssh_launches_wait_for_the_login_limit(monkeypatch):
    fake = fake_ssh(monkeypatch, ssh.CommandResult(0, b"", b""))
    clock = Clock()
    launcher = ssh_launcher(clock, per_minute=1)
    assert result_of(launcher.launch(cluster("x", "/a"), URL, TOKEN)) == "agent started"
    second = launcher.launch(cluster("x", "/a"), URL, TOKEN)
    assert not second.called and len(fake.calls) == 1
    clock.advance(60)
    assert result_of(second) == "agent started" and len(fake.calls) == 2


# -- both launchers ------------------------------------------------------------------


def local_outcome(result, agent_dir):
    reactor, d = local_launch(agent_dir)
    process = reactor.processes[0]
    process.output(1, result.stdout)
    process.output(2, result.stderr)
    if result.signal:
        process.killed_by(getattr(signal, result.signal))
    else:
        process.exit(result.exit_status)
    return d


def ssh_outcome(result, monkeypatch):
    fake_ssh(monkeypatch, result)
    return ssh_launcher().launch(cluster("x", "/a"), URL, TOKEN)


@pytest.mark.parametrize("result, verdict", [
    (ssh.CommandResult(0, b"started " * 500, b"warning"), "..." + ("started " * 500)[-2001:-1]),
    (ssh.CommandResult(0, b"", b""), "agent started"),
    (ssh.CommandResult(3, b"out", b"err"), LaunchFailed("the agent exited at once "
                                                       "(exit status 3): err")),
    (ssh.CommandResult(1, b"out only", b""), LaunchFailed("the agent exited at once "
                                                         "(exit status 1): out only")),
    (ssh.CommandResult(None, b"", b"", "SIGKILL"), LaunchFailed("the agent exited at once "
                                                                "(signal SIGKILL): no output")),
], ids=["long output", "silent", "stderr", "stdout", "signal"])
def test_local_and_ssh_launches_judge_a_result_alike(result, verdict, agent_dir, monkeypatch):
    for d in (local_outcome(result, agent_dir), ssh_outcome(result, monkeypatch)):
        if isinstance(verdict, Exception):
            with pytest.raises(LaunchFailed) as caught:
                result_of(d)
            assert str(caught.value) == str(verdict)
        else:
            assert result_of(d) == verdict


class Recording:
    def __init__(self, name):
        self.name = name

    def launch(self, cluster, url, token):
        return defer.succeed(self.name)


@pytest.mark.parametrize("host_name, chosen", [
    ("localhost", "local"), ("login.example.org", "ssh"), ("127.0.0.1", "ssh")])
def test_only_localhost_is_launched_locally(host_name, chosen):
    launcher = Launcher(Recording("local"), Recording("ssh"))
    assert result_of(launcher.launch(cluster(host_name, "/a"), URL, TOKEN)) == chosen
