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
import socket
import threading
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.selectreactor import SelectReactor

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
