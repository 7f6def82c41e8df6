"""Keys and host keys in hpcd.ssh, without a network: parsing, fingerprints,
passphrases, the host key check and the RSA signature fix."""

import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ed25519
from twisted.conch.ssh import connection, keys
from twisted.conch.ssh.common import NS, getNS
from twisted.internet.testing import MemoryReactorClock

from hpcd.ssh import (
    HOST_KEY_ALGORITHMS, HostKey, SSHError, SSHTarget, _LoginTransport, _UserAuth, check_host_key,
    load_private_key, open_connection, parse_host_keys, signature_algorithm)

pytestmark = pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="needs ssh-keygen")

SECRET_PASSPHRASE = "correct horse battery"

# name -> ssh-keygen arguments (after -q -f FILE)
KEYS = {
    "host_ed25519": ["-t", "ed25519", "-N", ""],
    "host_ecdsa256": ["-t", "ecdsa", "-b", "256", "-N", ""],
    "host_ecdsa384": ["-t", "ecdsa", "-b", "384", "-N", ""],
    "host_ecdsa521": ["-t", "ecdsa", "-b", "521", "-N", ""],
    "host_rsa": ["-t", "rsa", "-b", "2048", "-N", ""],
    "user_ed25519": ["-t", "ed25519", "-N", ""],
    "user_ed25519_enc": ["-t", "ed25519", "-N", SECRET_PASSPHRASE],
    "user_ecdsa_enc": ["-t", "ecdsa", "-N", SECRET_PASSPHRASE],
    "user_rsa_enc": ["-t", "rsa", "-b", "2048", "-N", SECRET_PASSPHRASE],
    "user_rsa_pem": ["-t", "rsa", "-b", "2048", "-m", "PEM", "-N", ""],
    "user_rsa_pem_enc": ["-t", "rsa", "-b", "2048", "-m", "PEM", "-N", SECRET_PASSPHRASE],
    "user_ecdsa_pkcs8": ["-t", "ecdsa", "-m", "PKCS8", "-N", ""],
}


@pytest.fixture(scope="module")
def keydir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    for name, arguments in KEYS.items():
        subprocess.run(["ssh-keygen", "-q", "-C", f"{name}@test", "-f", str(directory / name),
                        *arguments], check=True)
    return directory


def private(keydir, name):
    return (keydir / name).read_text()


def public_line(keydir, name):
    return (keydir / f"{name}.pub").read_text().strip()


def keygen_fingerprint(path):
    """The SHA256 fingerprint as `ssh-keygen -lf` prints it."""
    output = subprocess.run(["ssh-keygen", "-lf", str(path)], check=True, capture_output=True,
                            text=True).stdout
    return output.split()[1]


def target(**overrides):
    values = dict(cluster_name="hal", host="login.example.org", port=2222, username="hpcuser")
    values.update(overrides)
    return SSHTarget(**values)


# --- pinned host key text ---------------------------------------------------


def test_parse_accepts_every_keyscan_form(keydir):
    """Bare, host-prefixed, [host]:port and hashed lines; comments and blanks skipped."""
    ed25519_line = public_line(keydir, "host_ed25519")
    ecdsa_line = public_line(keydir, "host_ecdsa256")
    rsa_line = public_line(keydir, "host_rsa")
    text = "\n".join(["# login.example.org:22 SSH-2.0-OpenSSH_9.2p1", "", "   ", ed25519_line,
                      f"login.example.org {ecdsa_line}", f"[login.example.org]:2222 {rsa_line}",
                      f"|1|c2FsdA==|aGFzaA== {ed25519_line}"])
    parsed = parse_host_keys(text, "hal")
    assert [k.key_type for k in parsed] == ["ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"]
    assert [k.line for k in parsed] == [" ".join(line.split()[:2])
                                        for line in (ed25519_line, ecdsa_line, rsa_line)]


def test_parse_empty_text_pins_nothing():
    assert parse_host_keys("") == []
    assert parse_host_keys(None) == []
    assert parse_host_keys("# only a comment\n\n") == []


@pytest.mark.parametrize("name", ["host_ed25519", "host_ecdsa256", "host_ecdsa384",
                                  "host_ecdsa521", "host_rsa"])
def test_fingerprint_matches_ssh_keygen(keydir, name):
    (host_key,) = parse_host_keys(public_line(keydir, name))
    assert host_key.fingerprint_sha256 == keygen_fingerprint(keydir / f"{name}.pub")
    assert host_key.key_type in HOST_KEY_ALGORITHMS


def test_host_key_from_blob_round_trips(keydir):
    (host_key,) = parse_host_keys(public_line(keydir, "host_ecdsa384"))
    assert HostKey.from_blob(host_key.blob) == host_key


@pytest.mark.parametrize("line", [
    "not a key",
    "ssh-ed25519 !!!notbase64!!!",
    "ssh-ed25519",
    "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIAamjcM",  # truncated
])
def test_parse_rejects_garbage_naming_cluster_and_line(line):
    with pytest.raises(SSHError) as caught:
        parse_host_keys(f"# header\n{line}\n", "hal")
    assert caught.value.reason == "bad_key"
    assert "cluster 'hal'" in str(caught.value)
    assert "line 2" in str(caught.value)


def test_parse_rejects_type_field_that_lies_about_the_blob(keydir):
    blob = public_line(keydir, "host_ed25519").split()[1]
    with pytest.raises(SSHError) as caught:
        parse_host_keys(f"ssh-rsa {blob}", "hal")
    assert caught.value.reason == "bad_key"


def test_parse_rejects_dsa_host_keys():
    dsa_key = dsa.generate_private_key(key_size=1024)
    line = keys.Key(dsa_key).public().toString("openssh").decode()
    with pytest.raises(SSHError) as caught:
        parse_host_keys(line, "hal")
    assert caught.value.reason == "bad_key"
    assert "ssh-dss" in str(caught.value)


# --- host key check ---------------------------------------------------------


def test_pinned_host_key_is_accepted(keydir):
    pinned = parse_host_keys(public_line(keydir, "host_ed25519"))
    check_host_key(target(), pinned, pinned[0].blob)


def test_mismatch_names_cluster_and_both_fingerprints_without_secrets(keydir):
    pinned = parse_host_keys(public_line(keydir, "host_ed25519") + "\n"
                             + public_line(keydir, "host_rsa"))
    (offered,) = parse_host_keys(public_line(keydir, "host_ecdsa256"))
    secret_key = private(keydir, "user_ed25519_enc")
    with pytest.raises(SSHError) as caught:
        check_host_key(target(key=secret_key, password=SECRET_PASSPHRASE), pinned, offered.blob)
    message = str(caught.value)
    assert caught.value.reason == "host_key_mismatch"
    assert "cluster 'hal'" in message
    assert keygen_fingerprint(keydir / "host_ecdsa256.pub") in message
    assert keygen_fingerprint(keydir / "host_ed25519.pub") in message
    assert keygen_fingerprint(keydir / "host_rsa.pub") in message
    assert SECRET_PASSPHRASE not in message
    assert secret_key.splitlines()[1] not in message


@pytest.mark.parametrize("pinned_names, algorithms", [
    (["host_ed25519"], [b"ssh-ed25519"]),
    (["host_rsa"], [b"rsa-sha2-512", b"rsa-sha2-256"]),
    (["host_rsa", "host_ecdsa256"], [b"ecdsa-sha2-nistp256", b"rsa-sha2-512", b"rsa-sha2-256"]),
])
def test_only_pinned_host_key_types_are_negotiated(keydir, pinned_names, algorithms):
    """Conch would otherwise pick ECDSA even when only ed25519 is pinned."""
    pinned = parse_host_keys("\n".join(public_line(keydir, n) for n in pinned_names))
    ssh = _LoginTransport(MemoryReactorClock(), target(), pinned, None)
    assert ssh.supportedPublicKeys == algorithms


# --- private keys -----------------------------------------------------------


@pytest.mark.parametrize("name, passphrase, ssh_type", [
    ("user_ed25519", None, b"ssh-ed25519"),
    ("user_ed25519", "stray passphrase is ignored", b"ssh-ed25519"),
    ("user_ed25519_enc", SECRET_PASSPHRASE, b"ssh-ed25519"),
    ("user_ecdsa_enc", SECRET_PASSPHRASE, b"ecdsa-sha2-nistp256"),
    ("user_rsa_enc", SECRET_PASSPHRASE, b"ssh-rsa"),
    ("user_rsa_pem", None, b"ssh-rsa"),
    ("user_rsa_pem", "stray passphrase is ignored", b"ssh-rsa"),
    ("user_rsa_pem_enc", SECRET_PASSPHRASE, b"ssh-rsa"),
    ("user_ecdsa_pkcs8", None, b"ecdsa-sha2-nistp256"),
])
def test_private_key_formats_load(keydir, name, passphrase, ssh_type):
    key = load_private_key(private(keydir, name), passphrase, "hal")
    assert key.sshType() == ssh_type
    assert not key.isPublic()
    public_blob = keys.Key.fromString(public_line(keydir, name)).blob()
    assert key.public().blob() == public_blob


def test_private_key_with_windows_line_ends_loads(keydir):
    text = private(keydir, "user_ecdsa_enc").replace("\n", "\r\n")
    assert load_private_key(text, SECRET_PASSPHRASE, "hal").sshType() == b"ecdsa-sha2-nistp256"


@pytest.mark.parametrize("name", ["user_ed25519_enc", "user_ecdsa_enc", "user_rsa_enc",
                                  "user_rsa_pem_enc"])
@pytest.mark.parametrize("passphrase", [None, "", "wrong passphrase"])
def test_bad_or_missing_passphrase_is_detected(keydir, name, passphrase):
    key_text = private(keydir, name)
    with pytest.raises(SSHError) as caught:
        load_private_key(key_text, passphrase, "hal")
    message = str(caught.value)
    assert caught.value.reason == "bad_passphrase"
    assert "cluster 'hal'" in message
    assert "passphrase" in message
    assert SECRET_PASSPHRASE not in message
    assert not passphrase or passphrase not in message
    assert key_text.splitlines()[1] not in message


@pytest.mark.parametrize("name", ["user_ed25519", "user_rsa_pem"])
def test_unparseable_key_text_is_bad_key(keydir, name):
    for text in ["", "garbage", public_line(keydir, name), private(keydir, name)[:120]]:
        with pytest.raises(SSHError) as caught:
            load_private_key(text, None, "hal")
        assert caught.value.reason == "bad_key"
        assert "cluster 'hal'" in str(caught.value)


def test_dsa_private_key_is_refused():
    pem = dsa.generate_private_key(key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())
    with pytest.raises(SSHError) as caught:
        load_private_key(pem.decode(), None, "hal")
    assert caught.value.reason == "bad_key"


def test_target_repr_hides_secrets(keydir):
    secret_key = private(keydir, "user_rsa_enc")
    text = repr(target(key=secret_key, password=SECRET_PASSPHRASE))
    assert SECRET_PASSPHRASE not in text
    assert "PRIVATE KEY" not in text


# --- checks done before connecting ------------------------------------------


def _failure_of(deferred):
    failures = []
    deferred.addErrback(failures.append)
    assert failures, "expected a failed Deferred"
    return failures[0].value


def test_no_pinned_host_key_fails_before_connecting(keydir):
    reactor = MemoryReactorClock()
    error = _failure_of(open_connection(reactor, target(password="pw", host_keys="")))
    assert error.reason == "host_key_unknown"
    assert "cluster 'hal'" in str(error)
    assert reactor.tcpClients == []


def test_bad_passphrase_fails_before_connecting(keydir):
    reactor = MemoryReactorClock()
    doomed = target(key=private(keydir, "user_rsa_enc"), password="wrong passphrase",
                    host_keys=public_line(keydir, "host_ed25519"))
    error = _failure_of(open_connection(reactor, doomed))
    assert error.reason == "bad_passphrase"
    assert reactor.tcpClients == []


# --- the RSA signature fix --------------------------------------------------


@pytest.mark.parametrize("server_sig_algs, expected", [
    (b"ssh-ed25519,ssh-rsa,rsa-sha2-256,rsa-sha2-512", b"rsa-sha2-512"),
    (b"ssh-rsa,rsa-sha2-256", b"rsa-sha2-256"),
    (b"ssh-ed25519", b"ssh-rsa"),
    (None, b"ssh-rsa"),
])
def test_rsa_signature_algorithm_follows_server_sig_algs(keydir, server_sig_algs, expected):
    key = load_private_key(private(keydir, "user_rsa_pem"))
    assert signature_algorithm(key, server_sig_algs) == expected


def test_non_rsa_keys_sign_with_their_own_type(keydir):
    key = load_private_key(private(keydir, "user_ed25519"))
    assert signature_algorithm(key, b"rsa-sha2-512,ssh-ed25519") == b"ssh-ed25519"


class _RecordingTransport:
    sessionID = b"\x01session-id"
    peerExtensions = {b"server-sig-algs": b"ssh-ed25519,ssh-rsa,rsa-sha2-256,rsa-sha2-512"}

    def __init__(self):
        self.packets = []

    def sendPacket(self, message_type, payload):
        self.packets.append((message_type, payload))


def test_rsa_login_request_is_signed_with_rsa_sha2_512(keydir):
    """The request names rsa-sha2-512 and carries a valid SHA-512 signature."""
    key = load_private_key(private(keydir, "user_rsa_enc"), SECRET_PASSPHRASE)
    auth = _UserAuth("hpcuser", connection.SSHConnection(), key, None)
    auth.transport = _RecordingTransport()

    assert auth.auth_publickey() is True

    ((message_type, payload),) = auth.transport.packets
    user, service, method, rest = getNS(payload, 3)
    assert (message_type, user, service, method) == (50, b"hpcuser", b"ssh-connection",
                                                      b"publickey")
    assert rest[:1] == b"\x01"
    algorithm, blob, signature, _ = getNS(rest[1:], 3)
    assert algorithm == b"rsa-sha2-512"
    assert getNS(signature)[0] == b"rsa-sha2-512"
    signed = (NS(_RecordingTransport.sessionID) + bytes((50,)) + NS(user) + NS(service)
              + NS(b"publickey") + b"\x01" + NS(algorithm) + NS(blob))
    assert keys.Key.fromString(blob).verify(signature, signed)


def test_each_login_method_is_tried_once_and_never_keyboard_interactive(keydir):
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    with_key = _UserAuth("hpcuser", connection.SSHConnection(), key, None)
    with_key.transport = _RecordingTransport()
    assert with_key.tryAuth(b"password") is None
    assert with_key.tryAuth(b"keyboard-interactive") is None
    assert with_key.tryAuth(b"publickey") is True
    assert with_key.tryAuth(b"publickey") is None

    with_password = _UserAuth("hpcuser", connection.SSHConnection(), None, "pw")
    with_password.transport = _RecordingTransport()
    assert with_password.tryAuth(b"publickey") is None
    assert with_password.tryAuth(b"password") is True
    assert with_password.tryAuth(b"password") is None


class _DisconnectingTransport(_RecordingTransport):
    def sendDisconnect(self, reason, description):
        self.packets.append(("disconnect", reason))


def test_expired_password_gives_up_and_says_so(keydir):
    """Conch would prompt for a new password; we disconnect and explain."""
    pinned = parse_host_keys(public_line(keydir, "host_ed25519"))
    ssh = _LoginTransport(MemoryReactorClock(), target(password="old-pw-123"), pinned, None)
    ssh.userauth = _UserAuth("hpcuser", connection.SSHConnection(), None, "old-pw-123")
    ssh.userauth.transport = _DisconnectingTransport()

    ssh.userauth.ssh_USERAUTH_PK_OK_password(NS(b"Password expired") + NS(b""))

    assert ssh.userauth.transport.packets[0][0] == "disconnect"
    error = ssh.why_lost()
    assert error.reason == "auth_failed"
    assert "expired" in str(error)
    assert "old-pw-123" not in str(error)


def test_refused_key_login_names_the_key_fingerprint(keydir):
    pinned = parse_host_keys(public_line(keydir, "host_ed25519"))
    key = load_private_key(private(keydir, "user_ed25519"))
    ssh = _LoginTransport(MemoryReactorClock(), target(), pinned, key)
    ssh.userauth = _UserAuth("hpcuser", connection.SSHConnection(), key, None)
    error = ssh.why_lost()
    assert error.reason == "auth_failed"
    assert keygen_fingerprint(keydir / "user_ed25519.pub") in str(error)
    assert "authorized_keys" in str(error)
