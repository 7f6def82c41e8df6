"""Agents launched over SSH by hpcd, against the loopback OpenSSH server.

The agent runs as the unprivileged test user, as on a real cluster, from an
agent directory in that user's home.  One virtual environment is prepared
per session (pip's cache makes later sessions quick); hpc_install_agent is
tested on a directory of its own.
"""

import hashlib
import os
import pwd
import shutil
import subprocess
import threading
import uuid

import pytest
from django.core.management import call_command

from djangoapp import crypto
from djangoapp.models import HpcCluster
from harness import wait_for
from sshtools import connect_and_run_a_job, make_cluster, read_key

pytestmark = pytest.mark.ssh


@pytest.mark.parametrize("key_name, passphrase", [
    ("id_ed25519", ""),
    ("id_ecdsa", "ecdsa-pass"),
    ("id_rsa", "rsa-pass"),
    ("id_rsa_pem", ""),
])
def test_each_key_type_launches_an_agent_that_runs_a_job(hpcd, ssh_server, remote_agent_dir,
                                                         key_name, passphrase):
    cluster = make_cluster(ssh_server, remote_agent_dir, key=read_key(ssh_server, key_name),
                           password=passphrase)
    assert connect_and_run_a_job(cluster) == ssh_server["user"]


def test_password_login_launches_an_agent_and_hides_the_token(hpcd, ssh_server,
                                                              remote_agent_dir):
    cluster = make_cluster(ssh_server, remote_agent_dir, password=ssh_server["password"])
    seen = set()
    stop = threading.Event()

    def watch_processes():
        # Every word of every argument list and environment of the user's
        # processes while the launch happens.
        uid = pwd.getpwnam(ssh_server["user"]).pw_uid
        while not stop.is_set():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if os.stat(f"/proc/{pid}").st_uid != uid:
                        continue
                    for name in ("cmdline", "environ"):
                        with open(f"/proc/{pid}/{name}", "rb") as f:
                            seen.update(f.read().replace(b"\0", b" ").split())
                except OSError:
                    pass

    watcher = threading.Thread(target=watch_processes)
    watcher.start()
    try:
        assert connect_and_run_a_job(cluster) == ssh_server["user"]
    finally:
        stop.set()
        watcher.join()
    token = cluster.is_connected()
    assert token.purpose == "agent"
    assert any(b"hpc_agent" in word for word in seen), "the watcher saw no agent process"
    hashes = {hashlib.sha256(word).hexdigest() for word in seen}
    assert token.token_hash not in hashes, "the launch token was visible in a process"
    assert not os.path.exists(os.path.expanduser(f"~{ssh_server['user']}/.bash_history")) or \
        token.token_hash not in {hashlib.sha256(line.strip().encode()).hexdigest() for line in
                                 open(os.path.expanduser(f"~{ssh_server['user']}/.bash_history"))}


@pytest.mark.parametrize("credentials, expected", [
    ({"password": "wrong-password"}, "refused the login"),
    ({"key": "id_ecdsa", "password": "wrong-passphrase"}, "passphrase"),
])
def test_wrong_credentials_are_refused_with_the_reason(hpcd, ssh_server, remote_agent_dir,
                                                       credentials, expected):
    if "key" in credentials:
        credentials = dict(credentials, key=read_key(ssh_server, credentials["key"]))
    cluster = make_cluster(ssh_server, remote_agent_dir, **credentials)
    cluster.try_connect()

    def failed():
        cluster.refresh_from_db()
        return "retrying in" in cluster.status_detail and cluster.status_detail

    detail = wait_for(failed, timeout=30, what="the launch to fail")
    assert expected in detail.lower()
    assert cluster.is_connected() is None
    assert "wrong-pass" not in detail


def test_a_changed_host_key_is_refused_naming_both_fingerprints(hpcd, ssh_server,
                                                                remote_agent_dir, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(tmp_path / "other")], check=True)
    other = (tmp_path / "other.pub").read_text().rsplit(" ", 1)[0]
    cluster = make_cluster(ssh_server, remote_agent_dir, key=read_key(ssh_server, "id_ed25519"))
    cluster.host_key = other
    cluster.save()
    cluster.try_connect()

    def failed():
        cluster.refresh_from_db()
        return "retrying in" in cluster.status_detail and cluster.status_detail

    detail = wait_for(failed, timeout=30, what="the launch to fail")
    pinned = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "other.pub")], check=True,
                            capture_output=True, text=True).stdout.split()[1]
    assert pinned in detail
    assert detail.count("SHA256:") >= 2
    assert cluster.host_name in detail


def test_a_missing_agent_environment_is_reported(hpcd, ssh_server, remote_home):
    cluster = make_cluster(ssh_server, os.path.join(remote_home, "no-such-agent"),
                           key=read_key(ssh_server, "id_ed25519"))
    cluster.try_connect()

    def failed():
        cluster.refresh_from_db()
        return "retrying in" in cluster.status_detail and cluster.status_detail

    assert "no-such-agent" in wait_for(failed, timeout=30)


def test_credentials_are_encrypted_at_rest_and_survive_key_rotation(
        hpcd, ssh_server, remote_agent_dir, settings):
    from django.db import connection

    secret_key = read_key(ssh_server, "id_ecdsa")
    cluster = make_cluster(ssh_server, remote_agent_dir, key=secret_key, password="ecdsa-pass")
    with connection.cursor() as cursor:
        cursor.execute("SELECT key, password FROM djangoapp_hpccluster WHERE id = %s",
                       [cluster.pk])
        stored_key, stored_password = cursor.fetchone()
    assert stored_key.startswith("fernet:") and "PRIVATE KEY" not in stored_key
    assert "ecdsa-pass" not in stored_password
    # Rotation: a new first key, the old one kept to decrypt, then dropped.
    old_keys = list(settings.HPC_CREDENTIAL_KEYS)
    new_key = crypto.generate_key()
    settings.HPC_CREDENTIAL_KEYS = [new_key, *old_keys]
    call_command("hpc_rotate_credentials", stdout=open(os.devnull, "w"))
    settings.HPC_CREDENTIAL_KEYS = [new_key]
    rotated = HpcCluster.objects.get(pk=cluster.pk)
    assert rotated.credentials() == {"key": secret_key, "password": "ecdsa-pass"}
    with connection.cursor() as cursor:
        cursor.execute("SELECT key FROM djangoapp_hpccluster WHERE id = %s", [cluster.pk])
        assert cursor.fetchone()[0] != stored_key


def test_get_ssh_connection_runs_commands_through_hpcd(hpcd, ssh_server, remote_agent_dir):
    cluster = make_cluster(ssh_server, remote_agent_dir, password=ssh_server["password"])
    with cluster.get_ssh_connection() as shell:
        result = shell.exec_command("id -un; echo oops >&2; exit 4")
        assert result.exit_status == 4
        assert result.stdout.decode().strip() == ssh_server["user"]
        assert result.stderr == b"oops\n"
        big = os.urandom(300_000)
        assert shell.exec_command("cat", stdin=big).stdout == big
    from hpcd.commands import NotFound

    with pytest.raises(NotFound):
        shell.exec_command("true")


def test_host_keys_are_fetched_then_pinned(hpcd, ssh_server, remote_agent_dir):
    cluster = make_cluster(ssh_server, remote_agent_dir, password=ssh_server["password"])
    cluster.host_key = ""
    cluster.save()
    keys = cluster.fetch_host_keys()
    expected = subprocess.run(["ssh-keygen", "-lf", ssh_server["host_keys"]], check=True,
                              capture_output=True, text=True).stdout
    assert {k["fingerprint"] for k in keys} == {line.split()[1]
                                                for line in expected.splitlines()}
    cluster.pin_host_keys(keys)
    assert connect_and_run_a_job(cluster) == ssh_server["user"]


def test_hpc_install_agent_makes_a_working_agent_directory(hpcd, ssh_server, remote_home,
                                                           shared_venv):
    user = ssh_server["user"]
    path = os.path.join(remote_home, f"installed-{uuid.uuid4().hex[:8]}")
    cluster = make_cluster(ssh_server, path, key=read_key(ssh_server, "id_rsa"),
                           password="rsa-pass")
    out = open(os.devnull, "w")
    try:
        call_command("hpc_install_agent", str(cluster.pk), stdout=out)
        for name in ("venv/bin/python", "settings.py", "log", "jobs"):
            assert os.path.exists(os.path.join(path, name)), name
        assert os.stat(os.path.join(path, "settings.py")).st_uid == pwd.getpwnam(user).pw_uid
        # Running it again upgrades in place and keeps settings.py.
        with open(os.path.join(path, "settings.py"), "a") as f:
            f.write("\nHPC_RECONNECT_SECONDS = 31\n")
        call_command("hpc_install_agent", str(cluster.pk), stdout=out)
        assert "HPC_RECONNECT_SECONDS = 31" in open(os.path.join(path, "settings.py")).read()
        assert connect_and_run_a_job(cluster) == user
    finally:
        subprocess.run(["pkill", "-KILL", "-u", user, "-f", path], check=False)
        shutil.rmtree(path, ignore_errors=True)


def test_the_admin_shows_fingerprints_before_pinning(hpcd, ssh_server, remote_agent_dir):
    from django.contrib.auth.models import User
    from django.test import Client

    User.objects.create_superuser("admin", "admin@example.org", "pw")
    client = Client()
    client.login(username="admin", password="pw")
    cluster = make_cluster(ssh_server, remote_agent_dir, password=ssh_server["password"])
    cluster.host_key = ""
    cluster.save()
    page = client.post("/admin/djangoapp/hpccluster/", {
        "action": "pin_host_keys", "_selected_action": [cluster.pk]})
    html = page.content.decode()
    expected = subprocess.run(["ssh-keygen", "-lf", ssh_server["host_keys"]], check=True,
                              capture_output=True, text=True).stdout
    for line in expected.splitlines():
        assert line.split()[1] in html
    cluster.refresh_from_db()
    assert cluster.host_key == ""  # nothing pinned before the admin confirms
    lines = [k["line"] for k in cluster.fetch_host_keys()]
    client.post("/admin/djangoapp/hpccluster/", {
        "action": "pin_host_keys", "_selected_action": [cluster.pk], "confirm": "yes",
        f"key-{cluster.pk}": lines})
    cluster.refresh_from_db()
    assert sorted(cluster.host_key.split("\n")[:-1]) == sorted(lines)


def test_hpcd_logs_no_credential(hpcd, ssh_server, remote_agent_dir):
    cluster = make_cluster(ssh_server, remote_agent_dir, key=read_key(ssh_server, "id_ecdsa"),
                           password="ecdsa-pass")
    connect_and_run_a_job(cluster)
    bad = make_cluster(ssh_server, remote_agent_dir, password="a-wrong-password-123")
    bad.try_connect()
    wait_for(lambda: HpcCluster.objects.get(pk=bad.pk).status_detail.find("retrying") >= 0,
             timeout=30)
    log = hpcd.log()
    assert "ecdsa-pass" not in log and "a-wrong-password-123" not in log
    assert "PRIVATE KEY" not in log and read_key(ssh_server, "id_ecdsa").splitlines()[1] not in log


def test_a_refused_connection_is_reported_on_the_cluster(hpcd, ssh_server, remote_agent_dir):
    import socket as _socket

    with _socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    cluster = make_cluster(ssh_server, remote_agent_dir, password=ssh_server["password"])
    cluster.port = closed_port
    cluster.save()
    cluster.try_connect()
    detail = wait_for(lambda: (HpcCluster.objects.get(pk=cluster.pk).status_detail
                               if "retrying" in HpcCluster.objects.get(pk=cluster.pk)
                               .status_detail else None), timeout=30)
    assert str(closed_port) in detail and "retrying in" in detail


def test_the_host_keys_command_pins_only_when_confirmed(hpcd, ssh_server, remote_agent_dir,
                                                        monkeypatch):
    import io

    from django.core.management.base import CommandError

    cluster = make_cluster(ssh_server, remote_agent_dir, password=ssh_server["password"])
    cluster.host_key = ""
    cluster.save()
    out = io.StringIO()
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    with pytest.raises(CommandError, match="nothing pinned"):
        call_command("hpc_host_keys", str(cluster.pk), stdout=out)
    assert "SHA256:" in out.getvalue()
    cluster.refresh_from_db()
    assert cluster.host_key == ""
    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    call_command("hpc_host_keys", str(cluster.pk), stdout=out)
    cluster.refresh_from_db()
    assert cluster.host_key.count("\n") == 3  # ed25519, ECDSA and RSA


def test_hpc_install_agent_fails_clearly(hpcd, ssh_server, remote_home):
    from django.core.management.base import CommandError

    cluster = make_cluster(ssh_server, os.path.join(remote_home, "never"),
                           key=read_key(ssh_server, "id_ed25519"))
    with pytest.raises(CommandError, match="finding Python failed"):
        call_command("hpc_install_agent", str(cluster.pk), "--python", "python2.1",
                     stdout=open(os.devnull, "w"))
    cluster.password = "wrong"
    cluster.key = ""
    cluster.save()
    with pytest.raises(CommandError, match="refused the login"):
        call_command("hpc_install_agent", str(cluster.pk), stdout=open(os.devnull, "w"))
