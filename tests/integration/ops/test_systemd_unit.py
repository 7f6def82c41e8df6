"""contrib/systemd/hpcd.service: the README shows it verbatim, systemd accepts it,
and it matches how hpcd behaves (READY=1 from the main process, the socket in
its RuntimeDirectory)."""

import configparser
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from harness import REPO, Hpcd

UNIT = os.path.join(REPO, "contrib", "systemd", "hpcd.service")


def unit_text():
    with open(UNIT) as f:
        return f.read()


def unit():
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str
    parser.read_string(unit_text())
    return parser


def test_the_readme_shows_the_unit_verbatim():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    blocks = re.findall(r"```ini\n(.*?)```", readme, re.S)
    shown = [b for b in blocks if "[Service]" in b]
    assert shown == [unit_text()], "README's systemd unit differs from " + UNIT


def test_the_unit_matches_how_hpcd_runs():
    service = unit()["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"  # hpcd sends READY=1 itself (tested below)
    assert "--nodaemon" in service["ExecStart"] and "--pidfile= " in service["ExecStart"]
    assert service["RuntimeDirectory"] == "hpcd"
    assert "PrivateTmp" not in service  # it would hide a socket in /tmp from Django
    assert service["KillMode"] == "process"  # localhost agents outlive a restart
    # The socket path the comments tell users to set lies in that directory.
    assert 'HPC_IPC_UNIX_SOCKET = "/run/hpcd/hpcd.sock"' in unit_text()


def test_systemd_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    # verify checks that ExecStart exists: point it at this environment's twistd.
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    copy = tmp_path / "hpcd.service"
    copy.write_text(unit_text().replace("/srv/mysite/venv/bin/twistd", twistd))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                            timeout=60)
    # Unknown or misspelt keys are only warnings: any output is a failure.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_hpcd_sends_ready_from_its_main_process(transactional_db, short_tmp):
    """NotifyAccess=main is enough: the READY=1 datagram's sender is twistd itself."""
    daemon = Hpcd(short_tmp)
    path = os.path.join(short_tmp, "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(path)
    notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    notify.settimeout(30)
    env = {**daemon.environment(), "NOTIFY_SOCKET": path}
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    process = subprocess.Popen([twistd, "--nodaemon", "--pidfile=", "--logfile=-", "hpcd"],
                               env=env, cwd=short_tmp, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        message, ancillary, _, _ = notify.recvmsg(64, socket.CMSG_SPACE(12))
        assert message == b"READY=1"
        (level, kind, data), = ancillary
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
        assert int.from_bytes(data[:4], sys.byteorder) == process.pid
    finally:
        process.terminate()
        process.wait(timeout=15)
        notify.close()
