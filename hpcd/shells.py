"""Commands on a cluster: a local shell for ``localhost``, SSH for every other host.

``run_local()`` is the one way hpcd runs a command as a local process: the
local launcher (hpcd.launch) and ``LocalShell`` both use it, the way the SSH
side uses hpcd.ssh.  It gives what SSH gives: a ``CommandResult``, or an
``SSHError`` with reason "timeout" or "command_failed", so a caller handles a
command on ``localhost`` and one over SSH alike.

``Shells`` serves Django's ``HpcCluster.get_ssh_connection()``: hpcd holds the
connection (Conch, in its reactor; a LocalShell for ``localhost``) and Django
drives it over AMP: open, run commands, close.  A connection left idle for
``HPC_SSH_SESSION_IDLE_SECONDS`` is closed, so a Django process that forgets
to close cannot leak connections.
"""

import itertools
import shlex
import signal

from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from djangoapp.protocol import NotFound, SSHFailed
from hpcd import ssh

log = Logger()

#: The shell that runs commands on hpcd's own host (LocalShell, local agent launches).
SH = "/bin/sh"
_WHO = "cluster 'localhost'"


def ssh_target(cluster):
    """The SSH login of a cluster (a dict from the store, secrets included)."""
    return ssh.SSHTarget(
        cluster_name=cluster["host_name"], host=cluster["host_name"], port=cluster["port"],
        username=cluster["username"], key=cluster["key"] or None,
        password=cluster["password"] or None, host_keys=cluster["host_key"])


def run_local(reactor, args, stdin=b"", timeout=60, env=None, path=None,
              max_output=ssh.MAX_OUTPUT_BYTES):
    """Run ``args`` (a program and its arguments) here; fires with an ssh.CommandResult.

    ``stdin`` is written to the process's standard input, then EOF.  ``env``
    None inherits hpcd's environment; ``path`` is the working directory.
    Fails with ssh.SSHError: "timeout" when the process runs longer than
    ``timeout`` seconds, "command_failed" when stdout + stderr exceed
    ``max_output`` bytes or it cannot be started; the process is then killed.
    A non-zero exit status is a result, not an error.
    """
    shown = ssh.show_command(args[2] if args[:2] == [SH, "-c"] else shlex.join(args))
    process = _LocalProcess(shown, stdin, max_output)
    try:
        reactor.spawnProcess(process, args[0], args, env=env, path=path)
    except OSError as e:
        return defer.fail(ssh.SSHError("command_failed",
                                       f"{_WHO}: {shown} could not be started: {e}"))

    def timed_out(result, timeout):
        return Failure(ssh.SSHError("timeout",
                                    f"{_WHO}: the command {shown} did not finish within "
                                    f"{timeout:g} s and was killed."))

    return process.done.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)


class _LocalProcess(protocol.ProcessProtocol):
    """One local command: stdin in, then EOF; stdout, stderr, exit status out.

    ``done`` fires with a CommandResult; cancelling it kills the process.
    """

    def __init__(self, shown, stdin, max_output):
        self._shown = shown
        self._stdin = stdin
        self._max_output = max_output
        self._output = {1: [], 2: []}
        self._size = 0
        self.done = defer.Deferred(self._kill)

    def connectionMade(self):
        if self._stdin:
            self.transport.write(self._stdin)
        self.transport.closeStdin()

    def childDataReceived(self, childFD, data):
        buffer = self._output.get(childFD)
        if buffer is None or self.done.called:
            return  # failed or cancelled: drop the rest
        self._size += len(data)
        if self._size > self._max_output:
            self.done.errback(ssh.SSHError(
                "command_failed",
                f"{_WHO}: the command {self._shown} wrote more than {self._max_output} bytes "
                f"of output and was stopped; write large output to a file instead."))
            self._kill()
            return
        buffer.append(data)

    def processEnded(self, reason):
        if self.done.called:
            return
        number = getattr(reason.value, "signal", None)
        self.done.callback(ssh.CommandResult(
            exit_status=None if number else (reason.value.exitCode or 0),
            stdout=b"".join(self._output[1]), stderr=b"".join(self._output[2]),
            signal=_signal_name(number) if number else None))

    def _kill(self, done=None):
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass


def _signal_name(number):
    """``9`` -> ``"SIGKILL"``, as sshd names the signal that killed a command."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class LocalShell:
    """Runs commands with /bin/sh on hpcd's own host, as ssh.SSHConnection runs them remotely."""

    def __init__(self, reactor):
        self._reactor = reactor

    def run(self, command, stdin=b"", timeout=60, max_output=ssh.MAX_OUTPUT_BYTES):
        """Run ``command``; fires with a CommandResult or fails with SSHError (see run_local)."""
        return run_local(self._reactor, [SH, "-c", command], stdin=stdin, timeout=timeout,
                         max_output=max_output)

    def close(self):
        return defer.succeed(None)


class _OpenShell:
    """A shell held for Django, and its idle timer, which waits while commands run."""

    def __init__(self, shell):
        self.shell = shell
        self.running = 0
        self.idle_timer = None

    def stop_idle_timer(self):
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.cancel()
        self.idle_timer = None


class Shells:
    """Open command connections, by id, each closed when idle too long."""

    def __init__(self, reactor, store, limiter, idle_seconds):
        self._reactor = reactor
        self._store = store
        self._limiter = limiter
        self._idle_seconds = idle_seconds
        self._ids = itertools.count(1)
        self._open = {}

    @defer.inlineCallbacks
    def open(self, cluster_id):
        """Log in to cluster ``cluster_id``; fires with the new connection's id."""
        cluster = yield self._store.cluster(cluster_id)
        if cluster is None:
            raise NotFound(f"no cluster with id {cluster_id}")
        if cluster["host_name"] == "localhost":
            shell = LocalShell(self._reactor)
        else:
            yield self._limiter.acquire(cluster_id)
            try:
                shell = yield ssh.open_connection(self._reactor, ssh_target(cluster))
            except ssh.SSHError as e:
                raise SSHFailed(str(e)) from None
        shell_id = next(self._ids)
        self._open[shell_id] = _OpenShell(shell)
        self._start_idle_timer(shell_id)
        return shell_id

    def _start_idle_timer(self, shell_id):
        held = self._open[shell_id]
        held.stop_idle_timer()
        held.idle_timer = self._reactor.callLater(self._idle_seconds, self._expire, shell_id)

    def _expire(self, shell_id):
        log.info("closing command connection {id}: idle", id=shell_id)
        self.close(shell_id)

    @defer.inlineCallbacks
    def run(self, shell_id, command, stdin, timeout):
        """Run ``command`` on connection ``shell_id``; fires with an ssh.CommandResult."""
        held = self._open.get(shell_id)
        if held is None:
            raise NotFound(f"command connection {shell_id} is closed (idle connections "
                           "close by themselves); open a new one")
        # A connection running a command is not idle, however long it runs.
        held.running += 1
        held.stop_idle_timer()
        try:
            result = yield held.shell.run(command, stdin=stdin, timeout=timeout)
        except ssh.SSHError as e:
            raise SSHFailed(str(e)) from None
        finally:
            held.running -= 1
            if held.running == 0 and self._open.get(shell_id) is held:
                self._start_idle_timer(shell_id)
        return result

    def close(self, shell_id):
        """Close connection ``shell_id``; closing a closed one does nothing."""
        held = self._open.pop(shell_id, None)
        if held is None:
            return defer.succeed(None)
        held.stop_idle_timer()
        return held.shell.close()

    def close_all(self):
        return defer.gatherResults([self.close(i) for i in list(self._open)],
                                   consumeErrors=True)
