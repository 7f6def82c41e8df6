"""Logging in: the stored private key or password, and the RSA SHA-2 fix.

Authentication uses exactly one stored credential: a private key (ed25519,
ECDSA or RSA; OpenSSH, PEM or PKCS#8 format; ``SSHTarget.password`` is then
its passphrase) or else a password.  There is no keyboard-interactive: Conch's
client only offers a raw prompt hook, and a daemon has nobody to answer MFA
prompts, so a server that allows only keyboard-interactive needs a key.
"""

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from twisted.conch.ssh import common, keys, transport, userauth
from twisted.internet import defer

from hpcd.ssh.hostkeys import SSHError, _who


def load_private_key(text, passphrase=None, cluster_name=None):
    """Load a private key (OpenSSH, PEM or PKCS#8) as a Conch Key, or raise SSHError.

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
        raise SSHError("bad_key",
                       f"{who}: the stored SSH key is not a private key hpcd can read; paste "
                       f"the whole private key file, from '-----BEGIN' to '-----END ... "
                       f"PRIVATE KEY-----' (OpenSSH, PEM or PKCS#8 format).") from None
    if not passphrase:
        raise SSHError("bad_passphrase",
                       f"{who}: the stored SSH private key is encrypted but no passphrase is "
                       f"stored; enter the key's passphrase on the cluster record.")
    try:
        return _conch_key(loader(data, passphrase.encode()), who)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        raise SSHError("bad_passphrase",
                       f"{who}: the stored SSH private key cannot be decrypted with the stored "
                       f"passphrase; enter the right passphrase on the cluster record.") from None


def _conch_key(private_key, who):
    accepted = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)
    if not isinstance(private_key, accepted):
        raise SSHError("bad_key",
                       f"{who}: the stored SSH key type is not supported; use an ed25519, "
                       f"ECDSA or RSA key.")
    return keys.Key(private_key)


def signature_algorithm(key, server_sig_algs):
    """The public key algorithm (bytes) to log in with ``key``.

    For RSA keys, the first of rsa-sha2-512, rsa-sha2-256 that the server
    lists in its RFC 8308 "server-sig-algs" extension (bytes, or None when
    it sent none).  A server that sends no such list predates RFC 8332
    (OpenSSH < 7.2), so plain ssh-rsa is all it knows.
    """
    if server_sig_algs is None:
        return key.sshType()
    offered = server_sig_algs.split(b",")
    for algorithm in key.supportedSignatureAlgorithms():
        if algorithm in offered:
            return algorithm
    return key.sshType()


class _UserAuth(userauth.SSHUserAuthClient):
    """Logs in with the one stored credential, once, without prompting.

    ``key`` is a Conch Key, or None to log in with ``password``.
    """

    def __init__(self, username, service, key, password):
        super().__init__(username.encode(), service)
        self._key = key
        self._password = password
        self._untried = {b"publickey"} if key is not None else {b"password"}
        self.password_expired = False

    def tryAuth(self, kind):
        # Only our method, only once: Conch would otherwise resend the same
        # password after each failure until sshd's MaxAuthTries, and try
        # keyboard-interactive, whose prompts nobody can answer here.
        if kind not in self._untried:
            return None
        self._untried.discard(kind)
        return super().tryAuth(kind)

    def auth_publickey(self):
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
        algorithm = signature_algorithm(self._key,
                                        self.transport.peerExtensions.get(b"server-sig-algs"))
        blob = self._key.public().blob()
        signed_data = (common.NS(self.transport.sessionID)
                       + bytes((userauth.MSG_USERAUTH_REQUEST,))
                       + common.NS(self.user)
                       + common.NS(self.instance.name)
                       + common.NS(b"publickey")
                       + b"\x01"
                       + common.NS(algorithm)
                       + common.NS(blob))
        signature = self._key.sign(signed_data, signatureType=algorithm)
        self.askForAuth(b"publickey",
                        b"\x01" + common.NS(algorithm) + common.NS(blob) + common.NS(signature))
        return True

    def getPassword(self, prompt=None):
        return defer.succeed(self._password.encode())

    def ssh_USERAUTH_PK_OK_password(self, packet):
        # The server demands that the expired password be changed; Conch
        # would prompt for a new one, which we never choose: give up.
        self.password_expired = True
        self.transport.sendDisconnect(transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
                                      b"password expired")
