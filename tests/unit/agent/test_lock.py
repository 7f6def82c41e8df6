"""One agent per directory: taking over the lock from a running holder (hpc_agent.lock)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from hpc_agent.lock import LockBusy, take_over

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))

HOLDER = """
import signal, sys, time
from hpc_agent.lock import take_over
if sys.argv[2] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
fd = take_over(sys.argv[1], log=lambda m: None)
if sys.argv[2] == "hide-pid":
    import os
    os.ftruncate(fd, 0)
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holders():
    started = []

    def start(path, mode="plain"):
        process = subprocess.Popen([sys.executable, "-c", HOLDER, path, mode], cwd=REPO,
                                   stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline().strip() == "locked"
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()


def pid_in(path):
    with open(path) as f:
        return int(f.read())


def test_a_free_lock_is_taken_and_the_pid_written(tmp_path):
    path = str(tmp_path / "agent.lock")
    fd = take_over(path, log=lambda m: None)
    try:
        assert pid_in(path) == os.getpid()
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
    finally:
        os.close(fd)


def test_a_stale_pid_in_a_free_lock_file_is_replaced(tmp_path):
    path = tmp_path / "agent.lock"
    path.write_text("999999999\n")
    fd = take_over(str(path), log=lambda m: None)
    try:
        assert path.read_text() == f"{os.getpid()}\n"
    finally:
        os.close(fd)


def test_a_holder_is_sent_sigterm_and_the_lock_taken_when_it_exits(tmp_path, holders):
    path = str(tmp_path / "agent.lock")
    holder = holders(path)
    assert pid_in(path) == holder.pid
    logged = []
    start = time.monotonic()
    fd = take_over(path, term_wait=5, kill_wait=5, log=logged.append)
    try:
        assert time.monotonic() - start < 3  # did not need the SIGKILL stage
        assert holder.wait(timeout=5) == -signal.SIGTERM
        assert pid_in(path) == os.getpid()
        assert logged == [f"agent pid {holder.pid} holds {path}: sending SIGTERM"]
    finally:
        os.close(fd)


def test_a_holder_ignoring_sigterm_gets_sigkill(tmp_path, holders):
    path = str(tmp_path / "agent.lock")
    holder = holders(path, "ignore-term")
    logged = []
    fd = take_over(path, term_wait=0.3, kill_wait=5, log=logged.append)
    try:
        assert holder.wait(timeout=5) == -signal.SIGKILL
        assert [m.rsplit(" ", 1)[1] for m in logged] == ["SIGTERM", "SIGKILL"]
        assert pid_in(path) == os.getpid()
    finally:
        os.close(fd)


def test_a_stopped_holder_is_continued_so_that_it_acts_on_sigterm(tmp_path, holders):
    """Issue 9: a SIGSTOPped agent delayed its replacement until SIGKILL."""
    path = str(tmp_path / "agent.lock")
    holder = holders(path)
    os.kill(holder.pid, signal.SIGSTOP)
    logged = []
    start = time.monotonic()
    fd = take_over(path, term_wait=20, kill_wait=5, log=logged.append)
    try:
        assert holder.wait(timeout=5) == -signal.SIGTERM
        assert time.monotonic() - start < 10
        assert [m.rsplit(" ", 1)[1] for m in logged] == ["SIGTERM"]
    finally:
        os.close(fd)


def test_sigkill_comes_sooner_than_it_did(tmp_path):
    """A holder that ignores SIGTERM waits 10 s for SIGKILL by default (30 s before)."""
    import inspect

    defaults = inspect.signature(take_over).parameters
    assert defaults["term_wait"].default <= 10


def test_a_holder_that_cannot_be_signalled_leaves_the_lock_busy(tmp_path, holders):
    path = str(tmp_path / "agent.lock")
    holder = holders(path, "hide-pid")  # holds the lock but its pid is not in the file
    with pytest.raises(LockBusy, match="did not exit"):
        take_over(path, term_wait=0.1, kill_wait=0.1, log=lambda m: None)
    assert holder.poll() is None  # nobody was killed
    holder.kill()
    holder.wait()
    fd = take_over(path, term_wait=1, kill_wait=1, log=lambda m: None)
    os.close(fd)


def test_the_lock_is_released_when_the_descriptor_is_closed(tmp_path):
    path = str(tmp_path / "agent.lock")
    os.close(take_over(path, log=lambda m: None))
    fd = take_over(path, term_wait=0, kill_wait=0, log=lambda m: None)
    os.close(fd)
