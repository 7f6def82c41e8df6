"""Commands on a logged-in connection: one session channel per command.

``SSHConnection.run()`` opens a new channel for each command, so several
commands share one login.  Data for the command goes on its standard input,
never in the command line, which the server's host shows in ``ps``.
``CommandResult`` is also what hpcd's local shell (hpcd.shells) gives, so a
caller treats a command on ``localhost`` and one over SSH alike.
"""

import dataclasses
import struct

from twisted.conch.ssh import channel, common, connection
from twisted.internet import defer
from twisted.python.failure import Failure

from hpcd.ssh.hostkeys import SSHError

#: Protects the daemon's memory from a command that prints without end.
MAX_OUTPUT_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """What a command left: exit status (None if killed by ``signal``, e.g. "SIGKILL")."""

    exit_status: int
    stdout: bytes
    stderr: bytes
    signal: str = None


def show_command(command):
    """``command`` (bytes or str) shortened and quoted, for messages."""
    if isinstance(command, bytes):
        command = command.decode("utf-8", "replace")
    return repr(command if len(command) <= 80 else command[:77] + "...")


class SSHConnection:
    """A logged-in SSH connection; each ``run()`` is a new session channel.

    ``ssh`` is the logged-in transport (hpcd.ssh.transport), ``service`` its
    ssh-connection service.
    """

    def __init__(self, reactor, target, ssh, service):
        self._reactor = reactor
        self.target = target
        self._ssh = ssh
        self._service = service

    @property
    def is_open(self):
        return not self._ssh.lost

    def run(self, command, stdin=b"", timeout=60, max_output=MAX_OUTPUT_BYTES):
        """Run ``command``; fires with a CommandResult or fails with SSHError.

        A non-zero exit status is a result, not an error.  "command_failed"
        means the command could not run or finish: channel or exec refused,
        connection lost, or stdout + stderr over ``max_output`` bytes.
        """
        if isinstance(command, str):
            command = command.encode()
        who = f"cluster '{self.target.cluster_name}'"
        if not self.is_open:
            closed = f"{who}: the SSH connection is closed; open a new one."
            return defer.fail(SSHError("command_failed", closed))
        session = _CommandChannel(who, command, stdin, max_output)
        self._service.openChannel(session)

        def timed_out(result, timeout):
            return Failure(SSHError("timeout",
                                    f"{who}: the command {show_command(command)} did not finish "
                                    f"within {timeout:g} s; its channel was closed."))

        return session.done.addTimeout(timeout, self._reactor, onTimeoutCancel=timed_out)

    def close(self):
        """Disconnect; the Deferred fires once the connection is gone."""
        lost = self._ssh.when_lost()
        if self.is_open:
            self._ssh.loseConnection()
        return lost


class _CommandChannel(channel.SSHChannel):
    """Runs one command: stdin in, then EOF; stdout, stderr, exit status out.

    ``done`` fires with a CommandResult; cancelling it closes the channel.
    """

    name = b"session"

    def __init__(self, who, command, stdin, max_output):
        super().__init__()
        self._who = who
        self._command = command
        self._stdin = stdin
        self._max_output = max_output
        self._stdout = []
        self._stderr = []
        self._size = 0
        self._exit_status = None
        self._signal = None
        self._is_open = False
        self._eof_pending = False
        self.done = defer.Deferred(self._cancel)

    def _fail(self, message):
        if not self.done.called:
            self.done.errback(SSHError("command_failed", f"{self._who}: {message}"))

    def _cancel(self, done):
        # Closing the channel makes sshd close the command's pipes. A channel
        # still opening is closed in channelOpen.
        if self._is_open:
            self.loseConnection()

    def openFailed(self, reason):
        self._fail(f"no SSH session could be opened for {show_command(self._command)} (the "
                   f"server's MaxSessions reached, or the connection lost); try again.")

    def channelOpen(self, specificData):
        self._is_open = True
        if self.done.called:
            self.loseConnection()
            return
        started = self.conn.sendRequest(self, b"exec", common.NS(self._command), wantReply=True)
        started.addCallbacks(self._exec_started, self._exec_refused)

    def _exec_started(self, ignored):
        if self._stdin:
            self.write(self._stdin)
        # write() keeps what the server's window cannot take yet; EOF must
        # follow the last byte, so it may have to wait for addWindowBytes.
        self._eof_pending = True
        self._send_eof_when_flushed()

    def _exec_refused(self, reason):
        self._fail(f"the SSH server refused to run {show_command(self._command)}.")
        self.loseConnection()

    def addWindowBytes(self, data):
        super().addWindowBytes(data)
        self._send_eof_when_flushed()

    def _send_eof_when_flushed(self):
        if self._eof_pending and not self.buf:
            self._eof_pending = False
            self.conn.sendEOF(self)

    def dataReceived(self, data):
        self._collect(self._stdout, data)

    def extReceived(self, dataType, data):
        # SSHChannel drops extended data; stderr comes this way.
        if dataType == connection.EXTENDED_DATA_STDERR:
            self._collect(self._stderr, data)

    def _collect(self, buffer, data):
        if self.done.called:
            return  # failed, cancelled or over the limit: drop the rest
        self._size += len(data)
        if self._size > self._max_output:
            self._fail(f"the command {show_command(self._command)} wrote more than "
                       f"{self._max_output} bytes of output and was stopped; write large "
                       f"output to a file on the cluster instead.")
            self.loseConnection()
            return
        buffer.append(data)

    def request_exit_status(self, data):
        (self._exit_status,) = struct.unpack(">L", data[:4])
        return True

    def request_exit_signal(self, data):
        self._signal = "SIG" + common.getNS(data)[0].decode("ascii", "replace")
        return True

    def closed(self):
        if self._exit_status is None and self._signal is None:
            self._fail(f"the connection closed before {show_command(self._command)} reported "
                       f"its exit status; it may still be running.")
        elif not self.done.called:
            self.done.callback(CommandResult(self._exit_status, b"".join(self._stdout),
                                             b"".join(self._stderr), self._signal))
