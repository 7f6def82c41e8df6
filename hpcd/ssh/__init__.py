"""SSH for hpcd: run commands on cluster login nodes with Twisted Conch.

Everything here runs on the reactor and never blocks it.  Four modules, each
building on the ones before it; import their names from ``hpcd.ssh``:

- ``hostkeys``: ``SSHTarget`` (where and how to log in), ``SSHError`` (every
  failure, with a ``reason``), and the pinned host keys: ``parse_host_keys()``,
  ``check_host_key()``, ``fingerprint()``.
- ``auth``: the stored credential, ``load_private_key()``, and the login
  itself with the RSA SHA-2 fix (``signature_algorithm()``).
- ``session``: ``SSHConnection``, whose ``run()`` opens a new session channel
  per command, so several commands share one login, and ``close()`` ends it;
  ``CommandResult``, what a command left.
- ``transport``: Conch's client transport; ``open_connection()`` logs in and
  gives an SSHConnection; ``run_command()`` is connect, run one command,
  disconnect; ``scan_host_keys()`` fetches the server's host keys for the
  admin's "fetch and pin" action.

The pure parts (parsing keys and host keys, the host key check, choosing the
signature algorithm) are testable without a socket.

Why not ``SSHCommandClientEndpoint``: its user-auth class is private and
built inside its private transport, so the RSA fix cannot be plugged in; its
transport cannot be told which host key algorithms to offer; its channel
drops stderr and the name of a killing signal.  The classes used here
(``SSHClientTransport``, ``SSHUserAuthClient``, ``SSHConnection``,
``SSHChannel``) are Conch's documented extension points.  Host keys are
compared here directly, so no ``KnownHostsFile`` (which ignores
``[host]:port`` entries and wants to save keys) and no ``ConsoleUI`` is
involved: nothing here ever prompts or opens /dev/tty.

Secrets (password, key, passphrase) never appear in messages, logs or
process arguments; data for the remote command goes on its standard input.
"""

from hpcd.ssh.auth import _UserAuth, load_private_key, signature_algorithm
from hpcd.ssh.hostkeys import (
    HOST_KEY_ALGORITHMS, REASONS, HostKey, SSHError, SSHTarget, check_host_key, fingerprint,
    parse_host_keys)
from hpcd.ssh.session import MAX_OUTPUT_BYTES, CommandResult, SSHConnection, show_command
from hpcd.ssh.transport import _LoginTransport, open_connection, run_command, scan_host_keys

__all__ = [
    "HOST_KEY_ALGORITHMS", "MAX_OUTPUT_BYTES", "REASONS", "CommandResult", "HostKey",
    "SSHConnection", "SSHError", "SSHTarget", "check_host_key", "fingerprint",
    "load_private_key", "open_connection", "parse_host_keys", "run_command", "scan_host_keys",
    "show_command", "signature_algorithm",
    # Internals the unit tests drive directly.
    "_LoginTransport", "_UserAuth",
]
