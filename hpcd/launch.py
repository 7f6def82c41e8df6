"""Starting a cluster's agent, and rationing SSH logins.

The agent is started as ``cd AGENT_DIR && venv/bin/python -m hpc_agent``
with a single JSON line on its standard input (the single-use token and the
URL to connect to), never in its arguments or environment.  The command
returns once the agent has detached and holds its directory (see
``hpc_agent.__main__``), so its exit status and output are the launch's
verdict.  For ``localhost`` this runs as a local process; other hosts go
over SSH.
"""

import collections
import json
import os
import shlex

from twisted.internet import defer, error, protocol, task
from twisted.logger import Logger

from hpcd import ssh

log = Logger()

#: Bytes of a launch command's output kept for the error message.
OUTPUT_LIMIT = 64 * 1024


class LaunchFailed(Exception):
    """The agent did not start; the message says why, for the cluster's page."""


def launch_input(url, token):
    return json.dumps({"token": token, "url": url}).encode() + b"\n"


def _tail(data, limit=2000):
    text = data.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else "..." + text[-limit:]


class LoginLimiter:
    """At most ``per_minute`` SSH logins per cluster in any 60 s.

    Sites ban hosts that log in too often; every SSH login hpcd makes (agent
    launches and get_ssh_connection()) waits here for its turn.
    """

    def __init__(self, clock, per_minute):
        self._clock = clock
        self._per_minute = per_minute
        self._logins = collections.defaultdict(collections.deque)

    def delay(self, cluster_id):
        """Seconds until cluster ``cluster_id`` may log in again (0: now)."""
        logins = self._logins[cluster_id]
        now = self._clock.seconds()
        while logins and logins[0] <= now - 60:
            logins.popleft()
        if len(logins) < self._per_minute:
            return 0.0
        return logins[0] + 60 - now

    @defer.inlineCallbacks
    def acquire(self, cluster_id):
        """Fires when a login may happen, and counts it."""
        while (wait := self.delay(cluster_id)) > 0:
            log.info("cluster {id}: SSH login limit reached; waiting {s:.0f} s",
                     id=cluster_id, s=wait)
            yield task.deferLater(self._clock, wait, lambda: None)
        self._logins[cluster_id].append(self._clock.seconds())


def ssh_target(cluster):
    """The SSH login of a cluster (a dict from the store, secrets included)."""
    return ssh.SSHTarget(
        cluster_name=cluster["host_name"], host=cluster["host_name"], port=cluster["port"],
        username=cluster["username"], key=cluster["key"] or None,
        password=cluster["password"] or None, host_keys=cluster["host_key"])


def agent_command(client_path):
    """The shell command that starts the agent in ``client_path``."""
    return (f"cd {shlex.quote(client_path)} && "
            "if [ ! -x venv/bin/python ]; then "
            "echo \"$PWD/venv/bin/python not found: install the agent "
            "(manage.py hpc_install_agent)\" >&2; exit 127; fi && "
            "exec venv/bin/python -m hpc_agent")


class SSHLauncher:
    """Starts agents over SSH with Conch, the token on the command's stdin."""

    def __init__(self, reactor, limiter, timeout=60.0):
        self._reactor = reactor
        self._limiter = limiter
        self._timeout = timeout

    @defer.inlineCallbacks
    def launch(self, cluster, url, token):
        yield self._limiter.acquire(cluster["id"])
        try:
            result = yield ssh.run_command(
                self._reactor, ssh_target(cluster), agent_command(cluster["client_path"]),
                stdin=launch_input(url, token), timeout=self._timeout)
        except ssh.SSHError as e:
            raise LaunchFailed(str(e)) from None
        if result.exit_status != 0:
            how = (f"signal {result.signal}" if result.signal
                   else f"exit status {result.exit_status}")
            raise LaunchFailed(f"the agent exited at once ({how}): "
                               f"{_tail(result.stderr) or _tail(result.stdout) or 'no output'}")
        return _tail(result.stdout) or "agent started"


class Launcher:
    """A local process for ``localhost``, SSH for every other host."""

    def __init__(self, local, remote):
        self._local = local
        self._remote = remote

    def launch(self, cluster, url, token):
        chosen = self._local if cluster["host_name"] == "localhost" else self._remote
        return chosen.launch(cluster, url, token)


class _LaunchProtocol(protocol.ProcessProtocol):
    def __init__(self, stdin):
        self._stdin = stdin
        self.output = {1: bytearray(), 2: bytearray()}
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self._stdin)
        self.transport.closeStdin()

    def childDataReceived(self, fd, data):
        buf = self.output.get(fd)
        if buf is not None and len(buf) < OUTPUT_LIMIT:
            buf += data[:OUTPUT_LIMIT - len(buf)]

    def processEnded(self, reason):
        self.done.callback(reason.value)


class LocalLauncher:
    """Starts agents on this host (clusters whose host_name is localhost)."""

    def __init__(self, reactor, timeout=60.0):
        self._reactor = reactor
        self._timeout = timeout

    def launch(self, cluster, url, token):
        """Fires with the agent's start message, or fails with LaunchFailed."""
        directory = cluster["client_path"]
        python = os.path.join(directory, "venv", "bin", "python")
        if not os.path.isdir(directory):
            return defer.fail(LaunchFailed(f"agent directory {directory} does not exist"))
        if not os.access(python, os.X_OK):
            return defer.fail(LaunchFailed(
                f"{python} not found: create the agent's virtual environment there "
                "(see the README, 'Installing an agent')"))
        proto = _LaunchProtocol(launch_input(url, token))
        env = {k: v for k, v in os.environ.items()
               if k in ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TMPDIR")}
        self._reactor.spawnProcess(proto, python, [python, "-m", "hpc_agent"], env=env,
                                   path=directory)
        timer = self._reactor.callLater(self._timeout, _kill, proto)

        def ended(reason):
            timed_out = not timer.active()
            if not timed_out:
                timer.cancel()
            out, err = bytes(proto.output[1]), bytes(proto.output[2])
            if isinstance(reason, error.ProcessDone):
                return _tail(out) or "agent started"
            if timed_out:
                raise LaunchFailed(f"the agent did not finish starting within "
                                   f"{self._timeout:g} s and was killed: "
                                   f"{_tail(err) or _tail(out) or 'no output'}")
            raise LaunchFailed(f"the agent exited at once ({_describe(reason)}): "
                               f"{_tail(err) or _tail(out) or 'no output'}")

        return proto.done.addCallback(ended)


def _kill(proto):
    try:
        proto.transport.signalProcess("KILL")
    except error.ProcessExitedAlready:
        pass


def _describe(reason):
    if getattr(reason, "signal", None):
        return f"killed by signal {reason.signal}"
    return f"exit status {getattr(reason, 'exitCode', '?')}"
