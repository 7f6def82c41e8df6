"""Commands run on a cluster through hpcd: HpcCluster.get_ssh_connection()'s
connection and what its commands leave behind, also in paramiko's shapes."""

import io
import re
import shlex

from djangoapp import ipc, protocol

__all__ = ["ClusterShell", "CommandResult"]


class CommandResult:
    """What a command run by :class:`ClusterShell` left behind.

    ``exit_status`` (None when a signal ended it: see ``signal``), and
    ``stdout`` and ``stderr`` as bytes.  It also unpacks the way paramiko's
    ``exec_command`` answered, into three file-like objects::

        stdin, stdout, stderr = shell.exec_command("ls")
        stdout.read()                      # bytes; readline()/iteration give text
        stdout.channel.recv_exit_status()  # -1 when a signal ended it

    The command has already finished by then, so ``stdin`` only takes
    ``close()``: pass input as ``exec_command(command, stdin=...)``.
    """

    def __init__(self, exit_status, stdout, stderr, signal=None):
        self.exit_status = exit_status
        self.stdout = stdout
        self.stderr = stderr
        self.signal = signal

    def __iter__(self):
        channel = _FinishedChannel(self)
        return iter((_ClosedInput(channel), _Output(self.stdout, channel),
                     _Output(self.stderr, channel)))

    def __repr__(self):
        return f"<CommandResult exit_status={self.exit_status} signal={self.signal}>"


class _FinishedChannel:
    """What paramiko's ``stdout.channel`` answers about a finished command."""

    def __init__(self, result):
        self._result = result

    def recv_exit_status(self):
        return -1 if self._result.exit_status is None else self._result.exit_status

    def exit_status_ready(self):
        return True


class _Output:
    """A finished command's stdout or stderr, read like paramiko's ChannelFile:
    ``read()`` gives bytes, ``readline()``, ``readlines()`` and iteration text."""

    def __init__(self, data, channel):
        self._buffer = io.BytesIO(data)
        self.channel = channel

    def read(self, size=-1):
        return self._buffer.read(-1 if size is None else size)

    def readline(self, size=-1):
        return self._buffer.readline(size).decode("utf-8", "replace")

    def readlines(self, hint=-1):
        return [line.decode("utf-8", "replace") for line in self._buffer.readlines(hint)]

    def __iter__(self):
        return iter(self.readline, "")

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass


class _ClosedInput:
    def __init__(self, channel):
        self.channel = channel

    def write(self, data):
        raise OSError("the command has already run: pass its input as "
                      "exec_command(command, stdin=...)")

    def flush(self):
        pass

    def close(self):
        pass


class ClusterShell:
    """Runs commands on a cluster through hpcd (see get_ssh_connection)."""

    def __init__(self, cluster):
        self.cluster = cluster
        self._shell_id = ipc.call(protocol.OpenShell, cluster_id=cluster.pk, timeout=120)[
            "shell_id"]

    def exec_command(self, command, stdin=b"", timeout=60, environment=None, bufsize=-1,
                     get_pty=False):
        """Run ``command`` with a shell; returns a CommandResult (a non-zero
        exit status is a result, not an exception).

        ``timeout`` (seconds, None for 60) bounds the whole command.
        ``environment`` sets variables for it.  ``bufsize`` and ``get_pty``
        are paramiko's and ignored: output is collected whole, without a
        terminal.
        """
        if self._shell_id is None:
            raise protocol.NotFound("this connection is closed")
        if timeout is None:
            timeout = 60
        if environment:
            for name in environment:
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                    raise ValueError(f"{name!r} is not an environment variable name")
            command = "".join(f"export {name}={shlex.quote(str(value))}; "
                              for name, value in environment.items()) + command
        if isinstance(stdin, str):
            stdin = stdin.encode()
        # The socket waits for the command plus a margin for hpcd's own work.
        answer = ipc.call(protocol.RunCommand, timeout=float(timeout) + 30,
                          shell_id=self._shell_id, command=command, stdin=stdin,
                          timeout_seconds=float(timeout))
        return CommandResult(answer["exit_status"], answer["stdout"], answer["stderr"],
                             answer["signal"])

    def close(self):
        if self._shell_id is not None:
            shell_id, self._shell_id = self._shell_id, None
            ipc.call(protocol.CloseShell, shell_id=shell_id)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


