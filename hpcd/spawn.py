"""Start ``twistd hpcd`` as a child process and wait until it is ready.

hpcd says ``READY=1`` on ``$NOTIFY_SOCKET`` once both listeners are bound
and its services started (systemd's ``Type=notify``); the test harness, the
benches and the demo wait for that line the way systemd does, instead of
polling for the socket.  Only the standard library: no reactor, no Django.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time


class NotReady(Exception):
    """hpcd exited, or did not say READY=1 in time; it has been stopped."""


def twistd():
    """The twistd next to this interpreter (the one hpcd is installed in)."""
    return os.path.join(os.path.dirname(sys.executable), "twistd")


def start(argv, env=None, timeout=30.0, notify_dir=None, **popen_kwargs):
    """Popen ``argv`` (a twistd hpcd command line) with ``$NOTIFY_SOCKET``
    set, and return the process once it has sent ``READY=1``.

    Raises NotReady (after killing the process) when it exits first or
    ``timeout`` seconds pass.  ``popen_kwargs`` go to ``subprocess.Popen``.
    """
    # A datagram socket's path must fit in sun_path (108 bytes): a short directory.
    directory = tempfile.mkdtemp(prefix="hpcd-notify-", dir=notify_dir)
    notify_path = os.path.join(directory, "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        notify.bind(notify_path)
        env = dict(os.environ if env is None else env, NOTIFY_SOCKET=notify_path)
        process = subprocess.Popen(argv, env=env, **popen_kwargs)
        deadline = time.monotonic() + timeout
        while True:
            # Short waits, so that an hpcd that exits at once is seen at once.
            notify.settimeout(0.2)
            try:
                message = notify.recv(64)
            except socket.timeout:
                message = None
            if message == b"READY=1":
                return process
            if process.poll() is not None:
                raise NotReady(f"hpcd exited with status {process.returncode} before it was "
                               "ready")
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise NotReady(f"hpcd did not say READY=1 within {timeout:g} s")
    finally:
        notify.close()
        try:
            os.unlink(notify_path)
        except FileNotFoundError:
            pass
        os.rmdir(directory)
