"""Starting a cluster's agent.

The agent is started as ``cd AGENT_DIR && venv/bin/python -m hpc_agent``
with a single JSON line on its standard input (the single-use token and the
URL to connect to), never in its arguments or environment.  The command
returns once the agent has detached and holds its directory (see
``hpc_agent.__main__``), so its exit status and output are the launch's
verdict.  For ``localhost`` this runs as a local process; other hosts go
over SSH.
"""

import json
import os

from twisted.internet import defer, error, protocol
from twisted.logger import Logger

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
            if timer.active():
                timer.cancel()
            out, err = bytes(proto.output[1]), bytes(proto.output[2])
            if isinstance(reason, error.ProcessDone):
                return _tail(out) or "agent started"
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
