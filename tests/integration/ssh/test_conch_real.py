"""hpcd.ssh against the real OpenSSH server of scripts/services.sh.

The reactor runs in a background thread (see conftest.py); each test calls
into it with reactor_thread.call() and asserts on what an admin would see.
"""

import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from twisted.conch.ssh import keys
from twisted.internet import defer

from hpcd.ssh import (
    SSHError,
    open_connection,
    parse_host_keys,
    run_command,
    scan_host_keys,
)

pytestmark = pytest.mark.ssh

# name -> (key file, passphrase)
LOGINS = {
    "ed25519 plain": ("id_ed25519", None),
    "ecdsa encrypted openssh": ("id_ecdsa", "ecdsa-pass"),
    "rsa encrypted openssh": ("id_rsa", "rsa-pass"),
    "rsa pem": ("id_rsa_pem", None),
}


@pytest.fixture(params=[*LOGINS, "password"])
def login_target(request, make_target, user_key, ssh_server):
    """A target for each way to log in."""
    if request.param == "password":
        return make_target(password=ssh_server["password"])
    name, passphrase = LOGINS[request.param]
    return make_target(key=user_key(name), password=passphrase)


def keygen_fingerprints(path):
    output = subprocess.run(
        ["ssh-keygen", "-lf", str(path)], check=True, capture_output=True, text=True
    ).stdout
    return {line.split()[1] for line in output.splitlines()}


def random_host_key_line(private_key):
    return keys.Key(private_key).public().toString("openssh").decode()


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_every_login_method_runs_commands(reactor_thread, login_target):
    reactor = reactor_thread.reactor
    echoed = reactor_thread.call(run_command, reactor, login_target, "echo ok", timeout=20)
    assert (echoed.exit_status, echoed.stdout, echoed.stderr) == (0, b"ok\n", b"")
    piped = reactor_thread.call(
        run_command, reactor, login_target, "tr a-z A-Z", stdin=b"from stdin\n", timeout=20
    )
    assert (piped.exit_status, piped.stdout) == (0, b"FROM STDIN\n")


def test_stderr_and_exit_status_are_delivered(reactor_thread, make_target, user_key):
    target = make_target(key=user_key("id_ed25519"))
    result = reactor_thread.call(
        run_command, reactor_thread.reactor, target, "echo out; echo err >&2; exit 7"
    )
    assert (result.exit_status, result.stdout, result.stderr) == (7, b"out\n", b"err\n")
    assert result.signal is None


def test_killing_signal_is_named(reactor_thread, make_target, user_key):
    target = make_target(key=user_key("id_ed25519"))
    result = reactor_thread.call(run_command, reactor_thread.reactor, target, "kill -TERM $$")
    assert (result.exit_status, result.signal) == (None, "SIGTERM")


def test_stdin_larger_than_the_channel_window_arrives_whole(reactor_thread, make_target, user_key):
    target = make_target(key=user_key("id_ed25519"))
    data = bytes(range(256)) * (5 * 4096)  # 5 MiB
    result = reactor_thread.call(
        run_command, reactor_thread.reactor, target, "wc -c", stdin=data, timeout=60
    )
    assert int(result.stdout) == len(data)


def test_wrong_password_is_auth_failed(reactor_thread, make_target):
    target = make_target(password="not-the-password-42")
    with pytest.raises(SSHError) as caught:
        reactor_thread.call(run_command, reactor_thread.reactor, target, "echo ok")
    assert caught.value.reason == "auth_failed"
    assert "cluster 'loopback'" in str(caught.value)
    assert "not-the-password-42" not in str(caught.value)


def test_unauthorized_key_is_auth_failed(reactor_thread, make_target):
    stranger = ed25519.Ed25519PrivateKey.generate()
    target = make_target(key=keys.Key(stranger).toString("openssh").decode())
    with pytest.raises(SSHError) as caught:
        reactor_thread.call(run_command, reactor_thread.reactor, target, "echo ok")
    assert caught.value.reason == "auth_failed"
    assert "authorized_keys" in str(caught.value)


def test_wrong_passphrase_is_bad_passphrase(reactor_thread, make_target, user_key):
    target = make_target(key=user_key("id_rsa"), password="not-rsa-pass")
    with pytest.raises(SSHError) as caught:
        reactor_thread.call(run_command, reactor_thread.reactor, target, "echo ok")
    assert caught.value.reason == "bad_passphrase"
    assert "not-rsa-pass" not in str(caught.value)


def test_changed_host_key_is_refused_naming_both_fingerprints(
    reactor_thread, make_target, user_key, ssh_server
):
    impostor = random_host_key_line(ed25519.Ed25519PrivateKey.generate())
    (pinned,) = parse_host_keys(impostor)
    target = make_target(key=user_key("id_ed25519"), host_keys=impostor)
    with pytest.raises(SSHError) as caught:
        reactor_thread.call(run_command, reactor_thread.reactor, target, "echo ok")
    message = str(caught.value)
    assert caught.value.reason == "host_key_mismatch"
    assert "cluster 'loopback'" in message
    assert pinned.fingerprint_sha256 in message
    server_ed25519 = [
        k for k in parse_host_keys(Path(ssh_server["host_keys"]).read_text())
        if k.key_type == "ssh-ed25519"
    ]
    assert server_ed25519[0].fingerprint_sha256 in message


def test_no_pinned_host_key_is_host_key_unknown(reactor_thread, make_target, user_key):
    target = make_target(key=user_key("id_ed25519"), host_keys="")
    with pytest.raises(SSHError) as caught:
        reactor_thread.call(run_command, reactor_thread.reactor, target, "echo ok")
    assert caught.value.reason == "host_key_unknown"


def test_pinned_type_the_server_lacks_is_host_key_unknown(
    reactor_thread, make_target, user_key, ssh_server
):
    server_types = {
        k.key_type for k in parse_host_keys(Path(ssh_server["host_keys"]).read_text())
    }
    if "ecdsa-sha2-nistp521" in server_types:
        pytest.skip("the test sshd has a nistp521 host key")
    other = random_host_key_line(ec.generate_private_key(ec.SECP521R1()))
    target = make_target(key=user_key("id_ed25519"), host_keys=other)
    with pytest.raises(SSHError) as caught:
        reactor_thread.call(run_command, reactor_thread.reactor, target, "echo ok")
    assert caught.value.reason == "host_key_unknown"
    assert "ssh-ed25519" in str(caught.value)  # names what the server offers


def test_each_pinned_host_key_type_alone_is_enough(
    reactor_thread, make_target, user_key, ssh_server
):
    """Only the pinned types are negotiated, whatever Conch would prefer."""
    for line in Path(ssh_server["host_keys"]).read_text().splitlines():
        target = make_target(key=user_key("id_ed25519"), host_keys=line)
        result = reactor_thread.call(run_command, reactor_thread.reactor, target, "echo ok")
        assert result.stdout == b"ok\n", line


def test_closed_port_is_refused(reactor_thread, make_target, user_key):
    target = make_target(key=user_key("id_ed25519"), port=closed_port())
    with pytest.raises(SSHError) as caught:
        reactor_thread.call(run_command, reactor_thread.reactor, target, "echo ok")
    assert caught.value.reason == "refused"
    assert str(target.port) in str(caught.value)


def test_server_that_never_speaks_is_timeout(reactor_thread, make_target, user_key):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the TCP handshake; nobody answers
        target = make_target(key=user_key("id_ed25519"), port=silent.getsockname()[1])
        with pytest.raises(SSHError) as caught:
            reactor_thread.call(open_connection, reactor_thread.reactor, target, 1)
    assert caught.value.reason == "timeout"


def test_scan_finds_every_host_key_like_ssh_keyscan(reactor_thread, ssh_server):
    found = reactor_thread.call(
        scan_host_keys, reactor_thread.reactor, ssh_server["host"], ssh_server["port"], 20
    )
    assert {k.fingerprint_sha256 for k in found} == keygen_fingerprints(ssh_server["host_keys"])
    keyscan = parse_host_keys(Path(ssh_server["host_keys"]).read_text())
    assert {k.line for k in found} == {k.line for k in keyscan}
    assert all(len(k.line.split()) == 2 for k in found)


def test_scan_of_a_closed_port_is_refused(reactor_thread):
    with pytest.raises(SSHError) as caught:
        reactor_thread.call(scan_host_keys, reactor_thread.reactor, "127.0.0.1", closed_port(), 10)
    assert caught.value.reason == "refused"


def test_several_commands_share_one_connection(reactor_thread, make_target, user_key):
    reactor = reactor_thread.reactor
    target = make_target(key=user_key("id_ecdsa"), password="ecdsa-pass")
    connection = reactor_thread.call(open_connection, reactor, target, 20)
    try:
        first = reactor_thread.call(connection.run, "echo $PPID")
        second = reactor_thread.call(connection.run, "echo $PPID")
        # The same sshd session process serves both channels.
        assert first.stdout == second.stdout
        together = reactor_thread.call(
            lambda: defer.gatherResults(
                [connection.run(f"echo {n}", stdin=b"") for n in range(5)]
            )
        )
        assert [r.stdout for r in together] == [f"{n}\n".encode() for n in range(5)]
    finally:
        reactor_thread.call(connection.close)
    assert not connection.is_open
    with pytest.raises(SSHError) as caught:
        reactor_thread.call(connection.run, "echo late")
    assert caught.value.reason == "command_failed"


def test_command_timeout_closes_only_its_channel(reactor_thread, make_target, user_key):
    target = make_target(key=user_key("id_ed25519"))
    connection = reactor_thread.call(open_connection, reactor_thread.reactor, target, 20)
    try:
        with pytest.raises(SSHError) as caught:
            reactor_thread.call(connection.run, "sleep 30", timeout=1)
        assert caught.value.reason == "timeout"
        assert reactor_thread.call(connection.run, "echo still here").stdout == b"still here\n"
    finally:
        reactor_thread.call(connection.close)


def test_output_over_the_limit_fails_the_command(reactor_thread, make_target, user_key):
    target = make_target(key=user_key("id_ed25519"))
    connection = reactor_thread.call(open_connection, reactor_thread.reactor, target, 20)
    try:
        with pytest.raises(SSHError) as caught:
            reactor_thread.call(connection.run, "head -c 3000000 /dev/zero", max_output=1000000)
        assert caught.value.reason == "command_failed"
        assert "1000000" in str(caught.value)
    finally:
        reactor_thread.call(connection.close)


def test_secret_on_stdin_never_shows_in_ps(reactor_thread, make_target, user_key):
    """sshd is local, so local `ps` sees the remote command's processes."""
    secret = f"secret-{uuid.uuid4().hex}"
    marker = f"hpc-ps-probe-{uuid.uuid4().hex}"
    target = make_target(key=user_key("id_ed25519"))
    running = reactor_thread.submit(
        run_command,
        reactor_thread.reactor,
        target,
        f": {marker}; sleep 3; cat",
        stdin=secret.encode(),
        timeout=30,
    )
    saw_command = False
    while not running.done():
        listing = subprocess.run(
            ["ps", "-eo", "args"], check=True, capture_output=True, text=True
        ).stdout
        assert secret not in listing
        saw_command = saw_command or marker in listing
        time.sleep(0.05)
    assert running.result().stdout == secret.encode()
    assert saw_command, "ps never showed the remote command, so the check proved nothing"
