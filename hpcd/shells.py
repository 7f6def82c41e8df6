"""Commands on a cluster for Django: ``HpcCluster.get_ssh_connection()``.

hpcd holds the SSH connection (Conch, in its reactor) and Django drives it
over AMP: open, run commands, close.  A connection left idle for
``HPC_SSH_SESSION_IDLE_SECONDS`` is closed, so a Django process that forgets
to close cannot leak connections.  For ``localhost`` the commands run as
local processes of hpcd's user.
"""

import itertools

from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from hpcd import ssh
from djangoapp.protocol import NotFound, SSHFailed
from hpcd.launch import ssh_target

log = Logger()

#: Most bytes of output a command may produce.
MAX_OUTPUT = 64 * 1024 * 1024


class _LocalCommand(protocol.ProcessProtocol):
    def __init__(self, stdin):
        self._stdin = stdin
        self.out, self.err = bytearray(), bytearray()
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self._stdin)
        self.transport.closeStdin()

    def outReceived(self, data):
        self._collect(self.out, data)

    def errReceived(self, data):
        self._collect(self.err, data)

    def _collect(self, buf, data):
        if len(self.out) + len(self.err) + len(data) > MAX_OUTPUT:
            self.transport.signalProcess("KILL")
        else:
            buf += data

    def processEnded(self, reason):
        value = reason.value
        signal = getattr(value, "signal", None)
        self.done.callback(ssh.CommandResult(
            exit_status=None if signal else (value.exitCode or 0),
            stdout=bytes(self.out), stderr=bytes(self.err),
            signal=f"signal {signal}" if signal else None))


class LocalShell:
    """Runs commands with /bin/sh on hpcd's own host."""

    def __init__(self, reactor):
        self._reactor = reactor

    def run(self, command, stdin=b"", timeout=60):
        proto = _LocalCommand(stdin)
        self._reactor.spawnProcess(proto, "/bin/sh", ["/bin/sh", "-c", command], env=None)

        def kill(result, timeout):
            try:
                proto.transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
            raise SSHFailed(f"the command did not finish within {timeout:g} s; killed")

        return proto.done.addTimeout(timeout, self._reactor, onTimeoutCancel=kill)

    def close(self):
        return defer.succeed(None)


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
        self._open[shell_id] = [shell, None]
        self._touch(shell_id)
        return shell_id

    def _touch(self, shell_id):
        entry = self._open[shell_id]
        if entry[1] is not None and entry[1].active():
            entry[1].cancel()
        entry[1] = self._reactor.callLater(self._idle_seconds, self._expire, shell_id)

    def _expire(self, shell_id):
        log.info("closing command connection {id}: idle", id=shell_id)
        self.close(shell_id)

    def _get(self, shell_id):
        entry = self._open.get(shell_id)
        if entry is None:
            raise NotFound(f"command connection {shell_id} is closed (idle connections "
                           "close by themselves); open a new one")
        return entry[0]

    @defer.inlineCallbacks
    def run(self, shell_id, command, stdin, timeout):
        shell = self._get(shell_id)
        self._touch(shell_id)
        try:
            result = yield shell.run(command, stdin=stdin, timeout=timeout)
        except ssh.SSHError as e:
            raise SSHFailed(str(e)) from None
        finally:
            if shell_id in self._open:
                self._touch(shell_id)
        return result

    def close(self, shell_id):
        entry = self._open.pop(shell_id, None)
        if entry is None:
            return defer.succeed(None)
        if entry[1] is not None and entry[1].active():
            entry[1].cancel()
        return entry[0].close()

    def close_all(self):
        return defer.gatherResults([self.close(i) for i in list(self._open)],
                                   consumeErrors=True)
