"""One agent per agent directory.

The agent holds an exclusive ``flock`` on ``agent.lock`` for its whole life
and writes its pid into the file.  A newly launched agent asks the holder to
stop (SIGTERM, with a SIGCONT: a stopped process does not act on SIGTERM
until it continues; then SIGKILL), waits for the lock, and takes over the
state the old one left in the directory.  The lock is the kernel's, so it is
released however the holder dies.
"""

import fcntl
import os
import signal
import time


class LockBusy(Exception):
    """Another agent holds the directory and would not give it up."""


def _try_lock(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _is_agent(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"hpc_agent" in f.read()
    except OSError:
        return False


def holder(path):
    """The pid of the agent holding the lock at ``path``, or None if it is free."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        # A shared lock is refused only while an agent holds its exclusive one.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(path)
    finally:
        os.close(fd)
    return None


def take_over(path, term_wait=10.0, kill_wait=10.0, log=print):
    """Hold the lock at ``path``; returns the open file descriptor.

    Keep the descriptor open for as long as the lock should be held.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    if not _try_lock(fd):
        pid = _holder(path)
        if pid and not _is_agent(pid):
            # A stale pid (a `status` check holds the lock for an instant):
            # never signal a process that is not an agent.
            pid = None
        for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, kill_wait)):
            if pid:
                log(f"agent pid {pid} holds {path}: sending {sig.name}")
                try:
                    os.kill(pid, sig)
                    if sig == signal.SIGTERM:
                        # A SIGSTOPped agent acts on SIGTERM only once it
                        # continues (SIGKILL needs no help).
                        os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if _try_lock(fd):
                    break
                time.sleep(0.05)
            else:
                continue
            break
        else:
            os.close(fd)
            raise LockBusy(f"another agent (pid {pid}) holds {path} and did not exit")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
