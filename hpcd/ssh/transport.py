"""Connecting: Conch's client transport, logging in, and scanning host keys.

``open_connection()`` logs in and gives an SSHConnection (hpcd.ssh.session);
``run_command()`` is connect, run one command, disconnect;
``scan_host_keys()`` fetches the server's host keys for the admin's "fetch
and pin" action.  Each step has a timeout and every failure is an SSHError.
"""

from twisted.conch.error import ConchError
from twisted.conch.ssh import common, connection, transport
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.python.failure import Failure

from hpcd.ssh.auth import _UserAuth, load_private_key
from hpcd.ssh.hostkeys import (
    _PIN_HINT, HOST_KEY_ALGORITHMS, HostKey, SSHError, _blob_type, _who, check_host_key,
    fingerprint, parse_host_keys)
from hpcd.ssh.session import SSHConnection


class _ConnectionService(connection.SSHConnection):
    """The ssh-connection service; tells the transport once it is usable."""

    def __init__(self, started):
        super().__init__()
        self._started = started

    def serviceStarted(self):
        super().serviceStarted()
        self._started(self)


class _Transport(transport.SSHClientTransport):
    """Negotiates only the given host key algorithms; explains early ends.

    ``ready`` fires when the transport has done its job, or fails with the
    SSHError that says why the connection ended first.
    """

    def __init__(self, who, address, algorithms):
        self.who = who
        self.address = address
        # Shadows Conch's class-wide list, so the server can only choose a
        # host key algorithm named here (see _LoginTransport).
        self.supportedPublicKeys = algorithms
        self.ready = defer.Deferred(self._abort)
        self.failure = None  # the SSHError to report, once known
        self.server_host_key_algorithms = []
        self.disconnect_reason = ""
        self.lost = False
        self._lost_waiters = []

    def _abort(self, ready):
        self.transport.abortConnection()

    def ssh_KEXINIT(self, packet):
        # When no host key algorithm is common, Conch only says "couldn't
        # match all kex parts"; keep the server's list to say more.
        self.server_host_key_algorithms = common.getNS(packet[16:], 2)[1].split(b",")
        return super().ssh_KEXINIT(packet)

    def receiveError(self, reasonCode, description):
        self.disconnect_reason = description.decode("utf-8", "replace")
        super().receiveError(reasonCode, description)

    def sendDisconnect(self, reason, desc):
        self.disconnect_reason = desc.decode("utf-8", "replace")
        super().sendDisconnect(reason, desc)

    def when_lost(self):
        if self.lost:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._lost_waiters.append(waiter)
        return waiter

    def connectionLost(self, reason=None):
        super().connectionLost(reason)
        self.lost = True
        if not self.ready.called:
            self.ready.errback(self.failure or self.why_lost())
        for waiter in self._lost_waiters:
            waiter.callback(None)
        self._lost_waiters = []

    def why_lost(self):
        offered = self.server_host_key_algorithms
        if offered and not set(offered) & set(self.supportedPublicKeys):
            return SSHError("host_key_unknown",
                            f"{self.who}: the SSH server at {self.address} offers host key "
                            f"types {b', '.join(offered).decode()}, none of which is pinned; "
                            f"{_PIN_HINT} again.")
        detail = f" ({self.disconnect_reason})" if self.disconnect_reason else ""
        return SSHError("refused",
                        f"{self.who}: the SSH server at {self.address} closed the connection "
                        f"during the handshake{detail}. Check that the host and port point "
                        f"to an SSH server and that it accepts hpcd's address.")


class _LoginTransport(_Transport):
    """Checks the host key against the pinned ones, then logs in with ``key`` or the password.

    ``ready`` fires with an SSHConnection.
    """

    def __init__(self, reactor, target, pinned, key):
        # Only pinned key types are offered. Checking afterwards alone would
        # not do: Conch prefers ECDSA and RSA host keys, so a host with only
        # its ed25519 key pinned would present an ECDSA key and be refused.
        # Restricting makes the server present a key we can compare (when it
        # has one of those types); check_host_key then compares the key
        # itself, which is the security check.
        pinned_types = {host_key.key_type for host_key in pinned}
        algorithms = [algorithm
                      for key_type, type_algorithms in HOST_KEY_ALGORITHMS.items()
                      if key_type in pinned_types
                      for algorithm in type_algorithms]
        super().__init__(f"cluster '{target.cluster_name}'", target.address, algorithms)
        self.reactor = reactor
        self.target = target
        self.pinned = pinned
        self.key = key
        self.userauth = None

    def verifyHostKey(self, hostKey, md5_fingerprint):
        try:
            check_host_key(self.target, self.pinned, hostKey)
        except SSHError as error:
            self.failure = error
            # A plain reason, as Conch sends it to the server.
            return defer.fail(ConchError("host key not pinned"))
        return defer.succeed(True)

    def connectionSecure(self):
        password = None if self.key is not None else (self.target.password or "")
        service = _ConnectionService(self._logged_in)
        self.userauth = _UserAuth(self.target.username, service, self.key, password)
        self.requestService(self.userauth)

    def _logged_in(self, service):
        if not self.ready.called:
            self.ready.callback(SSHConnection(self.reactor, self.target, self, service))

    def why_lost(self):
        if self.userauth is None:
            return super().why_lost()
        if self.key is not None:
            credential = (f"the stored {self.key.sshType().decode()} key "
                          f"{fingerprint(self.key.public().blob())}; check that its public "
                          f"key is in ~{self.target.username}/.ssh/authorized_keys there")
        else:
            credential = "the stored password; check the user name and password"
        if self.userauth.password_expired:
            credential = "the stored password, which has expired: change it there"
        return SSHError("auth_failed",
                        f"{self.who}: the SSH server at {self.address} refused the login of "
                        f"user '{self.target.username}' with {credential}.")


class _ScanTransport(_Transport):
    """Fetches the server's host key of one type, without logging in.

    ``ready`` fires with a HostKey.
    """

    def __init__(self, who, address, key_type):
        super().__init__(who, address, HOST_KEY_ALGORITHMS[key_type])
        self.key_type = key_type
        self.host_key = b""

    def verifyHostKey(self, hostKey, md5_fingerprint):
        if _blob_type(hostKey) != self.key_type:
            return defer.fail(ConchError("host key of another type than negotiated"))
        # Accept for now: Conch then checks the server's key exchange
        # signature with it, so the key is proven (ssh-keyscan skips that).
        self.host_key = hostKey
        return defer.succeed(True)

    def connectionSecure(self):
        self.ready.callback(HostKey.from_blob(self.host_key))
        self.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, b"host key scan done")


def _connect(reactor, ssh, host, port, timeout):
    """Connect the _Transport ``ssh`` and wait for its ``ready``; each step gets ``timeout``.

    TCP failures (refused, unreachable, no answer, unknown host) become
    "refused"; an SSH handshake or login that stalls becomes "timeout".
    """
    def tcp_timed_out(result, timeout):
        return Failure(SSHError("refused",
                                f"{ssh.who}: {ssh.address} did not accept a TCP connection "
                                f"within {timeout:g} s; check the host, the port and "
                                f"firewalls."))

    def tcp_failed(failure):
        if failure.check(SSHError):
            return failure
        raise SSHError("refused",
                       f"{ssh.who}: cannot connect to {ssh.address}: "
                       f"{failure.getErrorMessage().rstrip('.')}; check the host, the port "
                       f"and that sshd is running.")

    def handshake_timed_out(result, timeout):
        return Failure(SSHError("timeout",
                                f"{ssh.who}: the SSH handshake and login at {ssh.address} did "
                                f"not finish within {timeout:g} s; the server may be "
                                f"overloaded, try again later."))

    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    connected = connectProtocol(endpoint, ssh)
    # Name resolution has no timeout of its own.
    connected.addTimeout(timeout, reactor, onTimeoutCancel=tcp_timed_out)
    connected.addErrback(tcp_failed)
    connected.addCallback(
        lambda _: ssh.ready.addTimeout(timeout, reactor, onTimeoutCancel=handshake_timed_out))
    return connected


def open_connection(reactor, target, timeout=30):
    """Log in to the SSHTarget ``target``; fires with an SSHConnection or fails with SSHError.

    The key and the pinned host keys are checked before connecting.  TCP
    connect and SSH handshake + login each get ``timeout`` seconds.
    """
    try:
        pinned = parse_host_keys(target.host_keys, target.cluster_name)
        if not pinned:
            raise SSHError("host_key_unknown",
                           f"cluster '{target.cluster_name}': no SSH host key is pinned for "
                           f"{target.address}; {_PIN_HINT}.")
        key = None
        if target.key:
            key = load_private_key(target.key, target.password, target.cluster_name)
    except SSHError:
        return defer.fail()
    ssh = _LoginTransport(reactor, target, pinned, key)
    return _connect(reactor, ssh, target.host, target.port, timeout)


def run_command(reactor, target, command, stdin=b"", timeout=60, connect_timeout=30):
    """Connect, run ``command`` (bytes or str), disconnect; fires with a CommandResult.

    ``stdin`` is written to the command's standard input, then EOF: pass
    secrets this way, never in ``command``, which sshd's host shows in ``ps``.
    ``timeout`` limits the command; ``connect_timeout`` each connect step.
    """
    def run(ssh_connection):
        def close(outcome):
            # Wait for the close, then pass the result or failure on.
            return ssh_connection.close().addCallback(lambda _: outcome)

        return ssh_connection.run(command, stdin, timeout).addBoth(close)

    return open_connection(reactor, target, connect_timeout).addCallback(run)


def scan_host_keys(reactor, host, port=22, timeout=30, cluster_name=None):
    """Fetch each type of host key the server has: Deferred[list[HostKey]].

    One connection per key type, each offering only that type's algorithms,
    since a server presents a single host key per connection.  No login.
    """
    address = f"{host}:{port}"
    who = _who(cluster_name, f"SSH server {address}")

    def absent_type(failure):
        failure.trap(SSHError)
        if failure.value.reason == "host_key_unknown":
            return None  # the server has no key of this type
        return failure

    def scan(key_type):
        ssh = _ScanTransport(who, address, key_type)
        return _connect(reactor, ssh, host, port, timeout).addErrback(absent_type)

    def collect(found):
        host_keys = [host_key for host_key in found if host_key is not None]
        if not host_keys:
            raise SSHError("host_key_unknown",
                           f"{who}: the SSH server at {address} has no host key of a type hpcd "
                           f"supports ({', '.join(HOST_KEY_ALGORITHMS)}).")
        return host_keys

    scans = defer.gatherResults([scan(key_type) for key_type in HOST_KEY_ALGORITHMS],
                                consumeErrors=True)
    scans.addErrback(lambda failure: failure.value.subFailure)  # unwrap FirstError
    return scans.addCallback(collect)
