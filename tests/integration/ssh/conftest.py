"""Fixtures for tests against the loopback OpenSSH server.

Where the server is: the HPC_TEST_SSH_* environment variables, or else
the env.sh scripts/services.sh writes. Without either, or
when nothing listens there, the tests skip and say why.

The reactor: a private reactor instance (never the global one) runs in a
background thread for the whole session, and ``reactor_thread.call(f, ...)``
runs ``f`` in that thread and waits for its Deferred. This needs no new
dependency (pytest-twisted is not installed), keeps the tests plain pytest
functions (unlike trial), and cannot clash with another suite that installs
or runs the global reactor; hpcd.ssh takes its reactor as an argument anyway.
"""

import concurrent.futures
import os
import pwd
import shutil
import socket
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.selectreactor import SelectReactor

from djangoapp import agent_wheel
from harness import SERVICES_ENV, services_environment
from hpcd.ssh import SSHTarget

NAMES = ("HOST", "PORT", "USER", "PASSWORD", "KEYS", "HOST_KEYS")


def _ssh_settings() -> dict | None:
    environment = services_environment()
    if not all(f"HPC_TEST_SSH_{name}" in environment for name in NAMES):
        return None
    return {name.lower(): environment[f"HPC_TEST_SSH_{name}"] for name in NAMES}


@pytest.fixture(scope="session")
def ssh_server():
    """host, port, user, password, keys (dir), host_keys (file) of the sshd."""
    found = _ssh_settings()
    if found is None:
        pytest.skip(f"no test sshd: set HPC_TEST_SSH_* or run scripts/services.sh ({SERVICES_ENV})")
    found["port"] = int(found["port"])
    try:
        socket.create_connection((found["host"], found["port"]), timeout=3).close()
    except OSError as error:
        pytest.skip(f"test sshd {found['host']}:{found['port']} not reachable: {error}")
    return found


class ReactorThread:
    """A private reactor running in a background thread."""

    def __init__(self):
        # SelectReactor: portable, and nothing here needs many sockets.
        self.reactor = SelectReactor()
        self._thread = threading.Thread(
            target=self.reactor.run,
            kwargs={"installSignalHandlers": False},
            name="test-reactor",
            daemon=True,
        )
        self._thread.start()

    def submit(self, function, *args, **kwargs) -> concurrent.futures.Future:
        """Start ``function(*args, **kwargs)`` in the reactor thread."""
        future = concurrent.futures.Future()

        def start():
            result = defer.maybeDeferred(function, *args, **kwargs)
            result.addCallbacks(future.set_result, lambda f: future.set_exception(f.value))

        self.reactor.callFromThread(start)
        return future

    def call(self, function, *args, **kwargs):
        """Run ``function`` in the reactor thread; its result or exception."""
        return self.submit(function, *args, **kwargs).result(timeout=120)

    def stop(self):
        self.reactor.callFromThread(self.reactor.stop)
        self._thread.join(timeout=30)


@pytest.fixture(scope="session")
def reactor_thread():
    running = ReactorThread()
    yield running
    running.stop()


@pytest.fixture
def make_target(ssh_server):
    """SSHTarget for the test sshd with every host key pinned; override freely."""

    def make(**overrides):
        values = dict(
            cluster_name="loopback",
            host=ssh_server["host"],
            port=ssh_server["port"],
            username=ssh_server["user"],
            host_keys=Path(ssh_server["host_keys"]).read_text(),
        )
        values.update(overrides)
        return SSHTarget(**values)

    return make


@pytest.fixture
def user_key(ssh_server):
    """The text of a private key from the test key directory, by file name."""
    return lambda name: (Path(ssh_server["keys"]) / name).read_text()


def as_user(user, *argv, timeout=900):
    return subprocess.run(["runuser", "-u", user, "--", *argv], check=True,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def remote_home(ssh_server):
    if os.geteuid() != 0:
        pytest.skip("preparing the test user's agent needs root")
    return pwd.getpwnam(ssh_server["user"]).pw_dir


@pytest.fixture(scope="session")
def shared_venv(ssh_server, remote_home, tmp_path_factory):
    """A venv owned by the test user with this agent installed (from the wheel)."""
    user = ssh_server["user"]
    venv = os.path.join(remote_home, ".hpc-test-venv")
    if not os.path.exists(os.path.join(venv, "bin", "python")):
        as_user(user, "/usr/bin/python3", "-m", "venv", venv)
    name, data = agent_wheel.build()
    wheel = os.path.join(remote_home, name)
    with open(wheel, "wb") as f:
        f.write(data)
    shutil.chown(wheel, user)
    as_user(user, f"{venv}/bin/python", "-m", "pip", "install", "--quiet",
            "--disable-pip-version-check", "--force-reinstall", "--no-deps", wheel)
    as_user(user, f"{venv}/bin/python", "-m", "pip", "install", "--quiet",
            "--disable-pip-version-check", wheel)
    return venv


@pytest.fixture
def remote_agent_dir(ssh_server, remote_home, shared_venv):
    """A fresh agent directory in the test user's home, its venv the shared one."""
    user = ssh_server["user"]
    path = os.path.join(remote_home, f"agent-{uuid.uuid4().hex[:8]}")
    as_user(user, "mkdir", path)
    as_user(user, "ln", "-s", shared_venv, os.path.join(path, "venv"))
    as_user(user, f"{shared_venv}/bin/python", "-m", "hpc_agent", "init", path)
    with open(os.path.join(path, "settings.py"), "a") as f:
        f.write("\nHPC_RECONNECT_SECONDS = 30\n")
    yield path
    subprocess.run(["pkill", "-KILL", "-u", user, "-f", f"{path}"], check=False)
    lock = os.path.join(path, "agent.lock")
    if os.path.exists(lock):
        pid = open(lock).read().strip()
        if pid.isdigit():
            subprocess.run(["kill", "-9", pid], check=False)
    shutil.rmtree(path, ignore_errors=True)
