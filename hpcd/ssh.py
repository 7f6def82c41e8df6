"""
SSH for hpcd: run commands on cluster login nodes with Twisted Conch.

Everything here runs on the reactor and never blocks it:

- ``open_connection()`` logs in and gives an ``SSHConnection``; its ``run()``
  opens a new session channel per command, so several commands share one
  login; ``close()`` ends it.
- ``run_command()`` is connect, run one command, disconnect.
- ``scan_host_keys()`` fetches the server's host keys for the admin's "fetch
  and pin" action.
- ``parse_host_keys()``, ``load_private_key()``, ``check_host_key()`` and
  ``signature_algorithm()`` are the pure parts, testable without a socket.

Why not ``SSHCommandClientEndpoint``: its user-auth class is private and
built inside its private transport, so the RSA fix below cannot be plugged
in; its transport cannot be told which host key algorithms to offer; its
channel drops stderr and the name of a killing signal. The classes used here
(``SSHClientTransport``, ``SSHUserAuthClient``, ``SSHConnection``,
``SSHChannel``) are Conch's documented extension points. Host keys are
compared here directly, so no ``KnownHostsFile`` (which ignores
``[host]:port`` entries and wants to save keys) and no ``ConsoleUI`` is
involved: nothing here ever prompts or opens /dev/tty.

Authentication uses exactly one stored credential: a private key (ed25519,
ECDSA or RSA; OpenSSH, PEM or PKCS#8 format; ``SSHTarget.password`` is then
its passphrase) or else a password. There is no keyboard-interactive: Conch's
client only offers a raw prompt hook, and a daemon has nobody to answer MFA
prompts, so a server that allows only keyboard-interactive needs a key.

Secrets (password, key, passphrase) never appear in messages, logs or
process arguments; data for the remote command goes on its standard input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
)
from twisted.conch.error import ConchError
from twisted.conch.ssh import channel, common, connection, keys, transport, userauth
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.python.failure import Failure

# Protects the daemon's memory from a command that prints without end.
MAX_OUTPUT_BYTES = 64 * 1024 * 1024

REASONS = frozenset(
    {
        "refused",
        "auth_failed",
        "bad_passphrase",
        "bad_key",
        "host_key_unknown",
        "host_key_mismatch",
        "timeout",
        "command_failed",
    }
)

# Host key types we can pin, each with the host key algorithms Conch may
# negotiate for it; the order is our preference (OpenSSH's). RSA host keys
# must sign with SHA-2: plain ssh-rsa (SHA-1) is left out, as OpenSSH >= 8.8
# does. DSA is left out as OpenSSH >= 7.0 does.
HOST_KEY_ALGORITHMS = {
    "ssh-ed25519": [b"ssh-ed25519"],
    "ecdsa-sha2-nistp256": [b"ecdsa-sha2-nistp256"],
    "ecdsa-sha2-nistp384": [b"ecdsa-sha2-nistp384"],
    "ecdsa-sha2-nistp521": [b"ecdsa-sha2-nistp521"],
    "ssh-rsa": [b"rsa-sha2-512", b"rsa-sha2-256"],
}

_PIN_HINT = "fetch the host keys in the admin, check their fingerprints and pin them"


class SSHError(Exception):
    """An SSH failure explained for an admin; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown SSHError reason {reason!r}")
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class SSHTarget:
    """Where and how to log in. ``repr()`` leaves the secrets out."""

    cluster_name: str
    host: str
    port: int = 22
    username: str
    # Private key text, or None to log in with ``password``.
    key: str | None = field(default=None, repr=False)
    # The key's passphrase when ``key`` is set, else the login password.
    password: str | None = field(default=None, repr=False)
    # Pinned host keys as ``ssh-keyscan`` prints them (see parse_host_keys).
    host_keys: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class CommandResult:
    """What a remote command left: exit status (None if killed by ``signal``)."""

    exit_status: int | None
    stdout: bytes
    stderr: bytes
    signal: str | None = None


@dataclass(frozen=True)
class HostKey:
    """A public host key; ``line`` is ``ssh-keyscan`` output without the host."""

    key_type: str
    fingerprint_sha256: str
    line: str

    @classmethod
    def from_blob(cls, blob: bytes) -> HostKey:
        key_type = _blob_type(blob)
        encoded = base64.b64encode(blob).decode("ascii")
        return cls(key_type, fingerprint(blob), f"{key_type} {encoded}")

    @property
    def blob(self) -> bytes:
        return base64.b64decode(self.line.split()[1])


def fingerprint(blob: bytes) -> str:
    """The key's fingerprint as ``ssh-keygen -l`` prints it.

    Conch's own SHA256_BASE64 format keeps the base64 padding, OpenSSH's
    does not, so admins could not compare them by eye.
    """
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii")
    return "SHA256:" + digest.rstrip("=")


def _blob_type(blob: bytes) -> str:
    """The key type named at the start of a public key blob."""
    try:
        return common.getNS(blob)[0].decode("ascii")
    except (struct.error, UnicodeDecodeError):
        return "unknown"


def _who(cluster_name: str | None, fallback: str = "the cluster") -> str:
    return f"cluster '{cluster_name}'" if cluster_name else fallback


def _describe(host_keys: list[HostKey]) -> str:
    return ", ".join(f"{k.fingerprint_sha256} ({k.key_type})" for k in host_keys)


def parse_host_keys(text: str | None, cluster_name: str | None = None) -> list[HostKey]:
    """Read pinned host keys: one key per line as ``ssh-keyscan`` prints it.

    A line may start with a host field (``host``, ``[host]:port``, hashed
    ``|1|...``), which is ignored: keys are compared, never host names.
    Blank lines and ``#`` comments are skipped. Raises SSHError("bad_key").
    """
    who = _who(cluster_name)
    found: list[HostKey] = []
    for number, line in enumerate((text or "").splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        host_key = _key_from_fields(fields) or _key_from_fields(fields[1:])
        if host_key is None:
            raise SSHError(
                "bad_key",
                f"{who}: line {number} of the pinned host keys "
                f"is not an SSH public key; paste lines as `ssh-keyscan` prints "
                f"them (for example 'ssh-ed25519 AAAA...') or {_PIN_HINT}.",
            )
        if host_key.key_type not in HOST_KEY_ALGORITHMS:
            raise SSHError(
                "bad_key",
                f"{who}: line {number} of the pinned host keys "
                f"is a {host_key.key_type} key, which hpcd does not accept; "
                f"remove it and pin one of: {', '.join(HOST_KEY_ALGORITHMS)}.",
            )
        if host_key not in found:
            found.append(host_key)
    return found


def _key_from_fields(fields: list[str]) -> HostKey | None:
    """A HostKey if ``fields`` starts with a key type and its base64 blob."""
    if len(fields) < 2:
        return None
    try:
        blob = base64.b64decode(fields[1], validate=True)
        if _blob_type(blob) != fields[0]:
            return None
        keys.Key.fromString(blob)
    except (binascii.Error, keys.BadKeyError, ValueError, struct.error):
        return None
    return HostKey.from_blob(blob)


def check_host_key(target: SSHTarget, pinned: list[HostKey], blob: bytes) -> None:
    """Accept the server's host key only if it is one of the pinned keys."""
    if any(host_key.blob == blob for host_key in pinned):
        return
    offered = HostKey.from_blob(blob)
    raise SSHError(
        "host_key_mismatch",
        f"cluster '{target.cluster_name}': the SSH server at {target.address} "
        f"presented the {offered.key_type} host key {offered.fingerprint_sha256}, "
        f"which is not a pinned key (pinned: {_describe(pinned)}). The server may "
        f"have been reinstalled, or someone may be intercepting the connection. "
        f"Connection refused. Ask the cluster's administrators for the server's "
        f"fingerprints; if they match the new one, {_PIN_HINT} again.",
    )


def load_private_key(
    text: str, passphrase: str | None = None, cluster_name: str | None = None
) -> keys.Key:
    """Load a private key (OpenSSH, PEM or PKCS#8), or raise SSHError.

    cryptography's loaders are used rather than Conch's: they read PKCS#8
    too, tell "encrypted" (TypeError) from "malformed" (ValueError), and do
    not fail when a passphrase is stored for an unencrypted key.
    """
    who = _who(cluster_name)
    data = text.strip().replace("\r\n", "\n").encode() + b"\n"
    if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
        loader = load_ssh_private_key
    else:
        loader = load_pem_private_key
    try:
        return _conch_key(loader(data, None), who)
    except TypeError:
        pass  # encrypted: needs the passphrase
    except (ValueError, UnsupportedAlgorithm):
        raise SSHError(
            "bad_key",
            f"{who}: the stored SSH key is not a private key hpcd can read; paste "
            f"the whole private key file, from '-----BEGIN' to '-----END ... "
            f"PRIVATE KEY-----' (OpenSSH, PEM or PKCS#8 format).",
        ) from None
    if not passphrase:
        raise SSHError(
            "bad_passphrase",
            f"{who}: the stored SSH private key is encrypted but no passphrase is "
            f"stored; enter the key's passphrase on the cluster record.",
        )
    try:
        return _conch_key(loader(data, passphrase.encode()), who)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        raise SSHError(
            "bad_passphrase",
            f"{who}: the stored SSH private key cannot be decrypted with the stored "
            f"passphrase; enter the right passphrase on the cluster record.",
        ) from None


def _conch_key(private_key: object, who: str) -> keys.Key:
    accepted = (
        rsa.RSAPrivateKey,
        ec.EllipticCurvePrivateKey,
        ed25519.Ed25519PrivateKey,
    )
    if not isinstance(private_key, accepted):
        raise SSHError(
            "bad_key",
            f"{who}: the stored SSH key type is not supported; use an ed25519, "
            f"ECDSA or RSA key.",
        )
    return keys.Key(private_key)


def signature_algorithm(key: keys.Key, server_sig_algs: bytes | None) -> bytes:
    """The public key algorithm to log in with ``key``.

    For RSA keys, the first of rsa-sha2-512, rsa-sha2-256 that the server
    lists in its RFC 8308 "server-sig-algs" extension. A server that sends no
    such list predates RFC 8332 (OpenSSH < 7.2), so plain ssh-rsa is all it
    knows.
    """
    if server_sig_algs is None:
        return key.sshType()
    offered = server_sig_algs.split(b",")
    for algorithm in key.supportedSignatureAlgorithms():
        if algorithm in offered:
            return algorithm
    return key.sshType()


class _UserAuth(userauth.SSHUserAuthClient):
    """Logs in with the one stored credential, once, without prompting."""

    def __init__(
        self, username: str, service, key: keys.Key | None, password: str | None
    ) -> None:
        super().__init__(username.encode(), service)
        self._key = key
        self._password = password
        self._untried = {b"publickey"} if key is not None else {b"password"}
        self.password_expired = False

    def tryAuth(self, kind: bytes):
        # Only our method, only once: Conch would otherwise resend the same
        # password after each failure until sshd's MaxAuthTries, and try
        # keyboard-interactive, whose prompts nobody can answer here.
        if kind not in self._untried:
            return None
        self._untried.discard(kind)
        return super().tryAuth(kind)

    def auth_publickey(self) -> bool:
        # THE RSA FIX (twisted issue 11808). SSHUserAuthClient names every
        # key by Key.sshType() and signs with Key.sign()'s default, so RSA
        # keys go out as "ssh-rsa" (SHA-1), which OpenSSH >= 8.8 refuses.
        # Twisted 26.10 already has the other parts: Key.sign() takes a
        # signatureType (rsa-sha2-256/512), and the transport stores the
        # server's "server-sig-algs" in peerExtensions. What is missing is
        # choosing the algorithm, done here. We send the signed request at
        # once instead of first asking whether the key is acceptable
        # (RFC 4252 section 7 allows this), so this one method replaces
        # Conch's query/PK_OK/sign round and no private method is touched.
        algorithm = signature_algorithm(
            self._key, self.transport.peerExtensions.get(b"server-sig-algs")
        )
        blob = self._key.public().blob()
        signed_data = (
            common.NS(self.transport.sessionID)
            + bytes((userauth.MSG_USERAUTH_REQUEST,))
            + common.NS(self.user)
            + common.NS(self.instance.name)
            + common.NS(b"publickey")
            + b"\x01"
            + common.NS(algorithm)
            + common.NS(blob)
        )
        signature = self._key.sign(signed_data, signatureType=algorithm)
        self.askForAuth(
            b"publickey",
            b"\x01" + common.NS(algorithm) + common.NS(blob) + common.NS(signature),
        )
        return True

    def getPassword(self, prompt=None):
        return defer.succeed(self._password.encode())

    def ssh_USERAUTH_PK_OK_password(self, packet: bytes) -> None:
        # The server demands that the expired password be changed; Conch
        # would prompt for a new one, which we never choose: give up.
        self.password_expired = True
        self.transport.sendDisconnect(
            transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, b"password expired"
        )


class _ConnectionService(connection.SSHConnection):
    """The ssh-connection service; tells the transport once it is usable."""

    def __init__(self, started) -> None:
        super().__init__()
        self._started = started

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self._started(self)


class _Transport(transport.SSHClientTransport):
    """Negotiates only the given host key algorithms; explains early ends.

    ``ready`` fires when the transport has done its job, or fails with the
    SSHError that says why the connection ended first.
    """

    def __init__(self, who: str, address: str, algorithms: list[bytes]) -> None:
        self.who = who
        self.address = address
        # Shadows Conch's class-wide list, so the server can only choose a
        # host key algorithm named here (see _LoginTransport).
        self.supportedPublicKeys = algorithms
        self.ready = defer.Deferred(self._abort)
        self.failure: SSHError | None = None
        self.server_host_key_algorithms: list[bytes] = []
        self.disconnect_reason = ""
        self.lost = False
        self._lost_waiters: list[defer.Deferred] = []

    def _abort(self, ready: defer.Deferred) -> None:
        self.transport.abortConnection()

    def ssh_KEXINIT(self, packet: bytes):
        # When no host key algorithm is common, Conch only says "couldn't
        # match all kex parts"; keep the server's list to say more.
        self.server_host_key_algorithms = common.getNS(packet[16:], 2)[1].split(b",")
        return super().ssh_KEXINIT(packet)

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        self.disconnect_reason = description.decode("utf-8", "replace")
        super().receiveError(reasonCode, description)

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        self.disconnect_reason = desc.decode("utf-8", "replace")
        super().sendDisconnect(reason, desc)

    def when_lost(self) -> defer.Deferred:
        if self.lost:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self._lost_waiters.append(waiter)
        return waiter

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        self.lost = True
        if not self.ready.called:
            self.ready.errback(self.failure or self.why_lost())
        for waiter in self._lost_waiters:
            waiter.callback(None)
        self._lost_waiters = []

    def why_lost(self) -> SSHError:
        offered = self.server_host_key_algorithms
        if offered and not set(offered) & set(self.supportedPublicKeys):
            return SSHError(
                "host_key_unknown",
                f"{self.who}: the SSH server at {self.address} offers host key "
                f"types {b', '.join(offered).decode()}, none of which is pinned; "
                f"{_PIN_HINT} again.",
            )
        detail = f" ({self.disconnect_reason})" if self.disconnect_reason else ""
        return SSHError(
            "refused",
            f"{self.who}: the SSH server at {self.address} closed the connection "
            f"during the handshake{detail}. Check that the host and port point "
            f"to an SSH server and that it accepts hpcd's address.",
        )


class _LoginTransport(_Transport):
    """Checks the host key against the pinned ones, then logs in."""

    def __init__(self, reactor, target: SSHTarget, pinned: list[HostKey], key) -> None:
        # Only pinned key types are offered. Checking afterwards alone would
        # not do: Conch prefers ECDSA and RSA host keys, so a host with only
        # its ed25519 key pinned would present an ECDSA key and be refused.
        # Restricting makes the server present a key we can compare (when it
        # has one of those types); check_host_key then compares the key
        # itself, which is the security check.
        pinned_types = {host_key.key_type for host_key in pinned}
        algorithms = [
            algorithm
            for key_type, type_algorithms in HOST_KEY_ALGORITHMS.items()
            if key_type in pinned_types
            for algorithm in type_algorithms
        ]
        super().__init__(f"cluster '{target.cluster_name}'", target.address, algorithms)
        self.reactor = reactor
        self.target = target
        self.pinned = pinned
        self.key = key
        self.userauth: _UserAuth | None = None

    def verifyHostKey(self, hostKey: bytes, md5_fingerprint: bytes) -> defer.Deferred:
        try:
            check_host_key(self.target, self.pinned, hostKey)
        except SSHError as error:
            self.failure = error
            # A plain reason, as Conch sends it to the server.
            return defer.fail(ConchError("host key not pinned"))
        return defer.succeed(True)

    def connectionSecure(self) -> None:
        password = None if self.key is not None else (self.target.password or "")
        service = _ConnectionService(self._logged_in)
        self.userauth = _UserAuth(self.target.username, service, self.key, password)
        self.requestService(self.userauth)

    def _logged_in(self, service: _ConnectionService) -> None:
        if not self.ready.called:
            self.ready.callback(SSHConnection(self.reactor, self.target, self, service))

    def why_lost(self) -> SSHError:
        if self.userauth is None:
            return super().why_lost()
        if self.key is not None:
            credential = (
                f"the stored {self.key.sshType().decode()} key "
                f"{fingerprint(self.key.public().blob())}; check that its public "
                f"key is in ~{self.target.username}/.ssh/authorized_keys there"
            )
        else:
            credential = "the stored password; check the user name and password"
        if self.userauth.password_expired:
            credential = "the stored password, which has expired: change it there"
        return SSHError(
            "auth_failed",
            f"{self.who}: the SSH server at {self.address} refused the login of "
            f"user '{self.target.username}' with {credential}.",
        )


class _ScanTransport(_Transport):
    """Fetches the server's host key of one type, without logging in."""

    def __init__(self, who: str, address: str, key_type: str) -> None:
        super().__init__(who, address, HOST_KEY_ALGORITHMS[key_type])
        self.key_type = key_type
        self.host_key = b""

    def verifyHostKey(self, hostKey: bytes, md5_fingerprint: bytes) -> defer.Deferred:
        if _blob_type(hostKey) != self.key_type:
            return defer.fail(ConchError("host key of another type than negotiated"))
        # Accept for now: Conch then checks the server's key exchange
        # signature with it, so the key is proven (ssh-keyscan skips that).
        self.host_key = hostKey
        return defer.succeed(True)

    def connectionSecure(self) -> None:
        self.ready.callback(HostKey.from_blob(self.host_key))
        self.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, b"host key scan done")


def _connect(reactor, ssh: _Transport, host: str, port: int, timeout: float):
    """Connect ``ssh`` and wait for its ``ready``; each step gets ``timeout``.

    TCP failures (refused, unreachable, no answer, unknown host) become
    "refused"; an SSH handshake or login that stalls becomes "timeout".
    """
    def tcp_timed_out(result, timeout):
        return Failure(
            SSHError(
                "refused",
                f"{ssh.who}: {ssh.address} did not accept a TCP connection within "
                f"{timeout:g} s; check the host, the port and firewalls.",
            )
        )

    def tcp_failed(failure: Failure):
        if failure.check(SSHError):
            return failure
        raise SSHError(
            "refused",
            f"{ssh.who}: cannot connect to {ssh.address}: "
            f"{failure.getErrorMessage().rstrip('.')}; check the host, the port "
            f"and that sshd is running.",
        )

    def handshake_timed_out(result, timeout):
        return Failure(
            SSHError(
                "timeout",
                f"{ssh.who}: the SSH handshake and login at {ssh.address} did not "
                f"finish within {timeout:g} s; the server may be overloaded, try "
                f"again later.",
            )
        )

    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    connected = connectProtocol(endpoint, ssh)
    # Name resolution has no timeout of its own.
    connected.addTimeout(timeout, reactor, onTimeoutCancel=tcp_timed_out)
    connected.addErrback(tcp_failed)
    connected.addCallback(
        lambda _: ssh.ready.addTimeout(
            timeout, reactor, onTimeoutCancel=handshake_timed_out
        )
    )
    return connected


def open_connection(reactor, target: SSHTarget, timeout: float = 30) -> defer.Deferred:
    """Log in to ``target``; fires with an SSHConnection or fails with SSHError.

    The key and the pinned host keys are checked before connecting. TCP
    connect and SSH handshake + login each get ``timeout`` seconds.
    """
    try:
        pinned = parse_host_keys(target.host_keys, target.cluster_name)
        if not pinned:
            raise SSHError(
                "host_key_unknown",
                f"cluster '{target.cluster_name}': no SSH host key is pinned for "
                f"{target.address}; {_PIN_HINT}.",
            )
        key = None
        if target.key:
            key = load_private_key(target.key, target.password, target.cluster_name)
    except SSHError:
        return defer.fail()
    ssh = _LoginTransport(reactor, target, pinned, key)
    return _connect(reactor, ssh, target.host, target.port, timeout)


def run_command(
    reactor,
    target: SSHTarget,
    command: bytes | str,
    stdin: bytes = b"",
    timeout: float = 60,
    connect_timeout: float = 30,
) -> defer.Deferred:
    """Connect, run ``command``, disconnect; fires with a CommandResult.

    ``stdin`` is written to the command's standard input, then EOF: pass
    secrets this way, never in ``command``, which sshd's host shows in ``ps``.
    ``timeout`` limits the command; ``connect_timeout`` each connect step.
    """
    def run(ssh_connection: SSHConnection) -> defer.Deferred:
        def close(outcome):
            # Wait for the close, then pass the result or failure on.
            return ssh_connection.close().addCallback(lambda _: outcome)

        return ssh_connection.run(command, stdin, timeout).addBoth(close)

    return open_connection(reactor, target, connect_timeout).addCallback(run)


def scan_host_keys(
    reactor,
    host: str,
    port: int = 22,
    timeout: float = 30,
    cluster_name: str | None = None,
) -> defer.Deferred:
    """Fetch each type of host key the server has: Deferred[list[HostKey]].

    One connection per key type, each offering only that type's algorithms,
    since a server presents a single host key per connection. No login.
    """
    address = f"{host}:{port}"
    who = _who(cluster_name, f"SSH server {address}")

    def absent_type(failure: Failure):
        failure.trap(SSHError)
        if failure.value.reason == "host_key_unknown":
            return None  # the server has no key of this type
        return failure

    def scan(key_type: str) -> defer.Deferred:
        ssh = _ScanTransport(who, address, key_type)
        return _connect(reactor, ssh, host, port, timeout).addErrback(absent_type)

    def collect(found: list[HostKey | None]) -> list[HostKey]:
        host_keys = [host_key for host_key in found if host_key is not None]
        if not host_keys:
            raise SSHError(
                "host_key_unknown",
                f"{who}: the SSH server at {address} has no host key of a type hpcd "
                f"supports ({', '.join(HOST_KEY_ALGORITHMS)}).",
            )
        return host_keys

    scans = defer.gatherResults(
        [scan(key_type) for key_type in HOST_KEY_ALGORITHMS], consumeErrors=True
    )
    scans.addErrback(lambda failure: failure.value.subFailure)  # unwrap FirstError
    return scans.addCallback(collect)


class SSHConnection:
    """A logged-in SSH connection; each ``run()`` is a new session channel."""

    def __init__(self, reactor, target: SSHTarget, ssh: _Transport, service) -> None:
        self._reactor = reactor
        self.target = target
        self._ssh = ssh
        self._service = service

    @property
    def is_open(self) -> bool:
        return not self._ssh.lost

    def run(
        self,
        command: bytes | str,
        stdin: bytes = b"",
        timeout: float = 60,
        max_output: int = MAX_OUTPUT_BYTES,
    ) -> defer.Deferred:
        """Run ``command``; fires with a CommandResult or fails with SSHError.

        A non-zero exit status is a result, not an error. "command_failed"
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
            return Failure(
                SSHError(
                    "timeout",
                    f"{who}: the command {_show(command)} did not finish within "
                    f"{timeout:g} s; its channel was closed.",
                )
            )

        return session.done.addTimeout(
            timeout, self._reactor, onTimeoutCancel=timed_out
        )

    def close(self) -> defer.Deferred:
        """Disconnect; the Deferred fires once the connection is gone."""
        lost = self._ssh.when_lost()
        if self.is_open:
            self._ssh.loseConnection()
        return lost


def _show(command: bytes) -> str:
    text = command.decode("utf-8", "replace")
    return repr(text if len(text) <= 80 else text[:77] + "...")


class _CommandChannel(channel.SSHChannel):
    """Runs one command: stdin in, then EOF; stdout, stderr, exit status out.

    ``done`` fires with a CommandResult; cancelling it closes the channel.
    """

    name = b"session"

    def __init__(self, who: str, command: bytes, stdin: bytes, max_output: int) -> None:
        super().__init__()
        self._who = who
        self._command = command
        self._stdin = stdin
        self._max_output = max_output
        self._stdout: list[bytes] = []
        self._stderr: list[bytes] = []
        self._size = 0
        self._exit_status: int | None = None
        self._signal: str | None = None
        self._is_open = False
        self._eof_pending = False
        self.done = defer.Deferred(self._cancel)

    def _fail(self, message: str) -> None:
        if not self.done.called:
            self.done.errback(SSHError("command_failed", f"{self._who}: {message}"))

    def _cancel(self, done: defer.Deferred) -> None:
        # Closing the channel makes sshd close the command's pipes. A channel
        # still opening is closed in channelOpen.
        if self._is_open:
            self.loseConnection()

    def openFailed(self, reason) -> None:
        self._fail(
            f"no SSH session could be opened for {_show(self._command)} (the "
            f"server's MaxSessions reached, or the connection lost); try again."
        )

    def channelOpen(self, specificData: bytes) -> None:
        self._is_open = True
        if self.done.called:
            self.loseConnection()
            return
        started = self.conn.sendRequest(
            self, b"exec", common.NS(self._command), wantReply=True
        )
        started.addCallbacks(self._exec_started, self._exec_refused)

    def _exec_started(self, ignored) -> None:
        if self._stdin:
            self.write(self._stdin)
        # write() keeps what the server's window cannot take yet; EOF must
        # follow the last byte, so it may have to wait for addWindowBytes.
        self._eof_pending = True
        self._send_eof_when_flushed()

    def _exec_refused(self, reason: Failure) -> None:
        self._fail(f"the SSH server refused to run {_show(self._command)}.")
        self.loseConnection()

    def addWindowBytes(self, data: int) -> None:
        super().addWindowBytes(data)
        self._send_eof_when_flushed()

    def _send_eof_when_flushed(self) -> None:
        if self._eof_pending and not self.buf:
            self._eof_pending = False
            self.conn.sendEOF(self)

    def dataReceived(self, data: bytes) -> None:
        self._collect(self._stdout, data)

    def extReceived(self, dataType: int, data: bytes) -> None:
        # SSHChannel drops extended data; stderr comes this way.
        if dataType == connection.EXTENDED_DATA_STDERR:
            self._collect(self._stderr, data)

    def _collect(self, buffer: list[bytes], data: bytes) -> None:
        if self.done.called:
            return  # failed, cancelled or over the limit: drop the rest
        self._size += len(data)
        if self._size > self._max_output:
            self._fail(
                f"the command {_show(self._command)} wrote more than "
                f"{self._max_output} bytes of output and was stopped; write large "
                f"output to a file on the cluster instead."
            )
            self.loseConnection()
            return
        buffer.append(data)

    def request_exit_status(self, data: bytes) -> bool:
        (self._exit_status,) = struct.unpack(">L", data[:4])
        return True

    def request_exit_signal(self, data: bytes) -> bool:
        self._signal = "SIG" + common.getNS(data)[0].decode("ascii", "replace")
        return True

    def closed(self) -> None:
        if self._exit_status is None and self._signal is None:
            self._fail(
                f"the connection closed before {_show(self._command)} reported "
                f"its exit status; it may still be running."
            )
        elif not self.done.called:
            self.done.callback(
                CommandResult(
                    self._exit_status,
                    b"".join(self._stdout),
                    b"".join(self._stderr),
                    self._signal,
                )
            )
