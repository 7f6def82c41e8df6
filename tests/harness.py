"""Starting the real daemon and real agents for integration tests.

hpcd runs as ``twistd --nodaemon hpcd`` in a subprocess against the very
database the test uses (pytest-django's test database, passed by name), on
a websocket port the kernel picks and a Unix socket in the test's temporary
directory; readiness is its ``READY=1`` on a notification socket, as under
systemd.  Agents are launched by that hpcd from agent directories whose
``venv`` is the Python environment running the tests.
"""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

from hpc_agent.status import JobStatus
from hpcd import spawn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def wait_for(predicate, timeout=20.0, interval=0.05, what="condition"):
    """Poll ``predicate`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def database_environment():
    """Environment telling a subprocess to use the test's own database."""
    from django.db import connection

    name = connection.settings_dict["NAME"]
    return {"HPC_TEST_DB": os.environ.get("HPC_TEST_DB", "sqlite"),
            "HPC_TEST_DB_NAME": str(name)}


class Hpcd:
    """A real hpcd process."""

    def __init__(self, workdir, extra_env=None, prefix=(), args=(), websocket=None):
        self.prefix = list(prefix)  # e.g. ["ip", "netns", "exec", "A"]
        # A listening socket (listening_socket()) handed to every start the
        # way systemd's socket activation does: a restarted hpcd is on the
        # same port, with no window in which another test can take it.
        self.websocket = websocket
        self.args = list(args)  # after "hpcd", e.g. ["--log-format", "json"]
        self.workdir = str(workdir)
        self.socket_path = os.path.join(self.workdir, "hpcd.sock")
        self.log_path = os.path.join(self.workdir, "hpcd.log")
        self.extra_env = extra_env or {}
        self.process = None

    def environment(self):
        env = dict(os.environ)
        env.update(database_environment())
        env.update({
            "DJANGO_SETTINGS_MODULE": "testsettings",
            "PYTHONPATH": os.pathsep.join([TESTS, REPO]),
            "HPC_IPC_UNIX_SOCKET": self.socket_path,
            "HPC_WEBSOCKET_PORT": "0",
        })
        if self.websocket is not None:
            env.update({"HPC_WEBSOCKET_ENDPOINT": "systemd:domain=INET:name=websocket",
                        "LISTEN_FDS": "1", "LISTEN_FDNAMES": "websocket"})
        env.update(self.extra_env)
        return env

    @property
    def port(self):
        """The websocket's port, when hpcd was given its socket."""
        return self.websocket.getsockname()[1]

    def start(self, timeout=30.0):
        env = self.environment()
        command = [spawn.twistd(), "--nodaemon", "--pidfile=", f"--logfile={self.log_path}",
                   "hpcd", *self.args]
        passed, preexec = (), None
        if self.websocket is not None:
            # systemd's protocol: the sockets from fd 3 on, LISTEN_PID naming
            # the process meant (the shell's pid, which exec keeps).
            command = ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *command]
            fd = self.websocket.fileno()
            passed = (3,)
            preexec = lambda: os.dup2(fd, 3)  # noqa: E731
        try:
            self.process = spawn.start(
                [*self.prefix, *command], env=env, timeout=timeout, cwd=self.workdir,
                stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(self.workdir, "hpcd.stderr"), "ab"),
                pass_fds=passed, preexec_fn=preexec)
        except spawn.NotReady as e:
            self.process = None
            raise AssertionError(f"{e}; log:\n{self.log()}") from None
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log(self):
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""


def make_agent_dir(path, **settings):
    """An agent directory whose venv is this Python environment."""
    path = str(path)
    os.makedirs(path, exist_ok=True)
    os.symlink(sys.prefix, os.path.join(path, "venv"))
    values = {"HPC_JOB_WORKING_DIRECTORY": os.path.join(path, "jobs"),
              "HPC_RECONNECT_SECONDS": 60, **settings}
    with open(os.path.join(path, "settings.py"), "w") as f:
        for name, value in values.items():
            f.write(f"{name} = {value!r}\n")
    return path


def agent_pid(path):
    try:
        with open(os.path.join(path, "agent.lock")) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid and _alive(pid) else None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_agent(path):
    """Stop the agent of a directory and every job runner it left."""
    pid = agent_pid(path)
    if pid:
        os.kill(pid, signal.SIGKILL)
    # Runner records: in the control directory, or in the job's directory
    # (agents before the control directory, whose runners kept the pgid there).
    for runner_file in (glob.glob(os.path.join(path, "control", "*", "runner.json"))
                        + glob.glob(os.path.join(path, "jobs", "*", ".hpc", "runner.json"))):
        try:
            with open(runner_file) as f:
                info = json.load(f)
            pgid = info.get("pgid")
        except (OSError, ValueError, AttributeError):
            continue
        try:
            with open(os.path.join(os.path.dirname(runner_file), "pgid")) as f:
                pgid = pgid or int(f.read())
        except (OSError, ValueError):
            pass
        for kill, target in ((os.killpg, pgid), (os.kill, info.get("pid"))):
            try:
                if isinstance(target, int) and target > 1:
                    kill(target, signal.SIGKILL)
            except OSError:
                pass


def websocket_port(daemon):
    """The port hpcd bound for agents (the tests ask the kernel for any)."""
    import re

    match = wait_for(lambda: re.search(r"agents at ws://[^:]+:(\d+)", daemon.log()),
                     what="hpcd's listening line")
    return int(match.group(1))


class RawWebsocket:
    """A deliberately minimal websocket client, to send what no real agent would."""

    def __init__(self, port, path, token=None, timeout=10.0):
        import base64

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        auth = f"Authorization: {token}\r\n" if token is not None else ""
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{auth}\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            head += chunk
        self.status = int(head.split(b" ", 2)[1]) if head else None
        self._buffer = head.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in head else b""

    def send(self, payload, opcode=0x1):
        import struct

        if isinstance(payload, str):
            payload = payload.encode()
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _read(self, n):
        while len(self._buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def recv(self):
        """``(opcode, payload)`` of the next frame (pings are answered)."""
        import struct

        while True:
            b1, b2 = self._read(2)
            n = b2 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._read(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read(8))
            payload = self._read(n)
            opcode = b1 & 0x0F
            if opcode == 0x9:
                self.send(payload, opcode=0xA)
                continue
            return opcode, payload

    def close(self):
        self.sock.close()


def listening_socket(host="127.0.0.1"):
    """A TCP socket listening on a port the kernel chose, for Hpcd(websocket=...)."""
    s = socket.socket()
    s.bind((host, 0))
    s.listen(128)
    return s


def free_port():
    """A port free now, for servers that cannot be handed a socket (PostgreSQL,
    Django's runserver); hpcd gets listening_socket() or port 0 instead."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



FINAL = {JobStatus.COMPLETED, JobStatus.ERROR, JobStatus.CANCELLED,
         JobStatus.WALL_TIME_EXCEEDED, JobStatus.OUT_OF_MEMORY, JobStatus.DELETED}


def wait_status(job, statuses, timeout=20.0):
    """Wait until the job (re-read from the database) is in one of ``statuses``."""
    statuses = {statuses} if isinstance(statuses, JobStatus) else set(statuses)

    def reached():
        job.refresh_from_db()
        # job_status, not status: a portal's job class may define its own.
        return job.job_status in statuses

    wait_for(reached, timeout=timeout, what=f"job {job.pk} to reach {statuses}")
    return job


def job_dir(cluster, job):
    return os.path.join(cluster.client_path, "jobs", str(job.pk))


#: Where scripts/services.sh describes the services it started.
SERVICES_ENV = os.path.join(
    os.environ.get("HPC_SERVICES_DIR", "/var/tmp/hpc-job-controller/services"), "env.sh")


def services_environment():
    """The test services' variables: the environment's, else services' env.sh."""
    import subprocess as _subprocess

    if not os.path.exists(SERVICES_ENV):
        return dict(os.environ)
    # env.sh is shell: let the shell read it.
    dumped = _subprocess.run(["bash", "-c", f'set -a; . "{SERVICES_ENV}"; env -0'],
                             check=True, capture_output=True).stdout.decode()
    found = dict(item.split("=", 1) for item in dumped.split("\0") if "=" in item)
    return {**found, **os.environ}


def run_bench(script, arguments, tmp_path, timeout=240):
    """Run bench/<script> as its own process on the test's database kind
    (SQLite in tmp_path, or a PostgreSQL database of its own, which the
    bench creates afresh and drops); returns what it printed."""
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env["HPC_TEST_SQLITE"] = str(tmp_path / "bench.sqlite3")
    if env.get("HPC_TEST_DB") == "postgres":
        env["HPC_TEST_DB_NAME"] = env.get("HPC_TEST_DB_NAME", "test_hpc") + "_bench"
    else:
        env.pop("HPC_TEST_DB_NAME", None)
    done = subprocess.run([sys.executable, os.path.join(REPO, "bench", script), *arguments],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
