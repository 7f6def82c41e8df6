"""hpcd.spawn: a child is returned once it says READY=1, and stopped when it cannot."""

import os
import sys

import pytest

from hpcd import spawn

READY = ("import os, socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
         "s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET']); import time; time.sleep(30)")


def test_returns_the_running_process_once_it_is_ready():
    process = spawn.start([sys.executable, "-c", READY], timeout=20)
    try:
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()


def test_a_child_that_exits_first_is_reported_with_its_status():
    with pytest.raises(spawn.NotReady, match="exited with status 3"):
        spawn.start([sys.executable, "-c", "raise SystemExit(3)"], timeout=20)


def test_a_child_that_never_says_ready_is_killed(tmp_path):
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    with pytest.raises(spawn.NotReady, match="within 5 s"):
        spawn.start([sys.executable, "-c", code], timeout=5)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
