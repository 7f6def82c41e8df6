"""Where to log in, what can go wrong, and the host keys that prove the server.

The rest of hpcd.ssh builds on this module: ``SSHTarget`` names the login,
``SSHError`` explains every failure, and a server is accepted only if it
presents one of the host keys pinned on the cluster record.
"""

import base64
import binascii
import dataclasses
import hashlib
import struct

from twisted.conch.ssh import common, keys

#: The ``SSHError.reason`` values, for callers that branch on them.
REASONS = frozenset({"refused", "auth_failed", "bad_passphrase", "bad_key", "host_key_unknown",
                     "host_key_mismatch", "timeout", "command_failed"})

#: Host key types we can pin, each with the host key algorithms Conch may
#: negotiate for it; the order is our preference (OpenSSH's).  RSA host keys
#: must sign with SHA-2: plain ssh-rsa (SHA-1) is left out, as OpenSSH >= 8.8
#: does.  DSA is left out as OpenSSH >= 7.0 does.
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

    def __init__(self, reason, message):
        if reason not in REASONS:
            raise ValueError(f"unknown SSHError reason {reason!r}")
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True, kw_only=True)
class SSHTarget:
    """Where and how to log in.  ``repr()`` leaves the secrets out."""

    cluster_name: str
    host: str
    port: int = 22
    username: str
    #: Private key text, or None to log in with ``password``.
    key: str = dataclasses.field(default=None, repr=False)
    #: The key's passphrase when ``key`` is set, else the login password.
    password: str = dataclasses.field(default=None, repr=False)
    #: Pinned host keys as ``ssh-keyscan`` prints them (see parse_host_keys).
    host_keys: str = ""

    @property
    def address(self):
        return f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class HostKey:
    """A public host key; ``line`` is ``ssh-keyscan`` output without the host."""

    key_type: str
    fingerprint_sha256: str
    line: str

    @classmethod
    def from_blob(cls, blob):
        key_type = _blob_type(blob)
        encoded = base64.b64encode(blob).decode("ascii")
        return cls(key_type, fingerprint(blob), f"{key_type} {encoded}")

    @property
    def blob(self):
        return base64.b64decode(self.line.split()[1])


def fingerprint(blob):
    """The key's fingerprint as ``ssh-keygen -l`` prints it.

    Conch's own SHA256_BASE64 format keeps the base64 padding, OpenSSH's
    does not, so admins could not compare them by eye.
    """
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii")
    return "SHA256:" + digest.rstrip("=")


def _blob_type(blob):
    """The key type named at the start of a public key blob."""
    try:
        return common.getNS(blob)[0].decode("ascii")
    except (struct.error, UnicodeDecodeError):
        return "unknown"


def _who(cluster_name, fallback="the cluster"):
    return f"cluster '{cluster_name}'" if cluster_name else fallback


def _describe(host_keys):
    return ", ".join(f"{k.fingerprint_sha256} ({k.key_type})" for k in host_keys)


def parse_host_keys(text, cluster_name=None):
    """Read pinned host keys (a list of HostKey): one per line, as ``ssh-keyscan`` prints them.

    A line may start with a host field (``host``, ``[host]:port``, hashed
    ``|1|...``), which is ignored: keys are compared, never host names.
    Blank lines and ``#`` comments are skipped.  Raises SSHError("bad_key").
    """
    who = _who(cluster_name)
    found = []
    for number, line in enumerate((text or "").splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        host_key = _key_from_fields(fields) or _key_from_fields(fields[1:])
        if host_key is None:
            raise SSHError("bad_key",
                           f"{who}: line {number} of the pinned host keys is not an SSH public "
                           f"key; paste lines as `ssh-keyscan` prints them (for example "
                           f"'ssh-ed25519 AAAA...') or {_PIN_HINT}.")
        if host_key.key_type not in HOST_KEY_ALGORITHMS:
            raise SSHError("bad_key",
                           f"{who}: line {number} of the pinned host keys is a "
                           f"{host_key.key_type} key, which hpcd does not accept; remove it and "
                           f"pin one of: {', '.join(HOST_KEY_ALGORITHMS)}.")
        if host_key not in found:
            found.append(host_key)
    return found


def _key_from_fields(fields):
    """A HostKey if ``fields`` starts with a key type and its base64 blob, else None."""
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


def check_host_key(target, pinned, blob):
    """Accept the server's host key ``blob`` only if it is one of the ``pinned`` HostKeys."""
    if any(host_key.blob == blob for host_key in pinned):
        return
    offered = HostKey.from_blob(blob)
    raise SSHError("host_key_mismatch",
                   f"cluster '{target.cluster_name}': the SSH server at {target.address} "
                   f"presented the {offered.key_type} host key {offered.fingerprint_sha256}, "
                   f"which is not a pinned key (pinned: {_describe(pinned)}). The server may "
                   f"have been reinstalled, or someone may be intercepting the connection. "
                   f"Connection refused. Ask the cluster's administrators for the server's "
                   f"fingerprints; if they match the new one, {_PIN_HINT} again.")
