"""The chaos kit: hundreds of short jobs through a real hpcd and a real agent
while faults are injected, then a verdict from what the jobs left behind.

Everything is real and private to one run, in one temporary directory:

* a PostgreSQL cluster of its own (:class:`PrivatePostgres`: initdb as the
  postgres user, listening only on a Unix socket in the directory), which the
  run may stop and restart ``-m immediate``;
* hpcd (tests/harness.py's :class:`~harness.Hpcd`) on a fixed websocket port,
  so that an agent finds it again after a restart;
* a localhost agent, launched by hpcd, with the local scheduler;
* when root and iproute2 allow it, two network namespaces joined by a veth
  pair (:class:`Namespaces`): hpcd in one, the agent in the other, so the
  link between them can be cut.  PostgreSQL and hpcd's Unix socket are
  reached through the file system, which the namespaces share.

Each job appends one line, its id and a fresh nonce, to a ledger outside the
job directories; a job that ran twice leaves two lines.  About 5% of the jobs
are cancelled a moment after their submission.

Faults (:data:`FAULT_KINDS`) come at random moments drawn from a seed, which
is printed so that a run can be replayed: kill -9 of hpcd or of the agent,
SIGSTOP of either for a while, PostgreSQL stopped and restarted ``-m
immediate``, and a network cut.  The submissions pause at the next fault's
moment until the fault before has ended, so every fault hits jobs in flight.
A fault's recovery time runs from its end until a job submitted since it
began completes (or, with no such job, until the cluster is online again).

:func:`verdict` judges a run from the database's rows and the ledger: each
job ran exactly once (a cancelled one at most once), its final state is the
one its ledger allows, none is left unfinished, and its history moves only
forward through the transition table (hpc_agent/status.py).

Run it as ``python tests/chaos_kit.py --help`` (bench/chaos.py is the long
run, tests/chaos/test_chaos.py the short one).  The Django of the process
running a chaos run is set up by :func:`main` on the private PostgreSQL, so
a run is a process of its own.
"""

import argparse
import collections
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
for _path in (REPO, TESTS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from hpc_agent.status import ALLOWED_FROM, JobStatus, can_transition  # noqa: E402

FINAL = frozenset({JobStatus.COMPLETED, JobStatus.ERROR, JobStatus.CANCELLED,
                   JobStatus.WALL_TIME_EXCEEDED, JobStatus.OUT_OF_MEMORY, JobStatus.DELETED})

#: Every kind of fault, in the order a short run injects them.
FAULT_KINDS = ("hpcd_kill", "agent_kill", "hpcd_stop", "agent_stop", "postgres_restart",
               "network_cut")

#: The counts a verdict reports, each of them 0 in a clean run.
PROBLEMS = ("lost", "ran_twice", "wrong_final", "stuck", "backwards", "stray")


def log(message):
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- network namespaces ---------------------------------------------------------------------

SUBNET = "10.200.0.0/24"
HPCD_ADDRESS = "10.200.0.1"


def ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


class Namespaces:
    """Two network namespaces, ``a`` (hpcd's, 10.200.0.1) and ``b`` (the
    agent's, 10.200.0.2), joined by a veth pair; a blackhole route for the
    range in the root namespace keeps anything from leaving the machine.

    :meth:`cut` sets the agent's side of the link down: neither side is told,
    only the websocket pings notice.  :meth:`heal` sets it up again.
    """

    @staticmethod
    def unavailable():
        """Why namespaces cannot be made here, or None."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        if shutil.which("ip") is None:
            return "network namespaces need iproute2 (ip)"
        return None

    def __init__(self):
        suffix = uuid.uuid4().hex[:6]
        self.a, self.b = f"hpcA{suffix}", f"hpcB{suffix}"
        self.va, self.vb = f"vA{suffix}", f"vB{suffix}"
        self._added_route = False

    def create(self):
        self._added_route = ip("route", "add", "blackhole", SUBNET, check=False).returncode == 0
        try:
            ip("netns", "add", self.a)
            ip("netns", "add", self.b)
            ip("link", "add", self.va, "type", "veth", "peer", "name", self.vb)
            ip("link", "set", self.va, "netns", self.a)
            ip("link", "set", self.vb, "netns", self.b)
            ip("-n", self.a, "addr", "add", f"{HPCD_ADDRESS}/24", "dev", self.va)
            ip("-n", self.b, "addr", "add", "10.200.0.2/24", "dev", self.vb)
            for ns, dev in ((self.a, self.va), (self.b, self.vb)):
                ip("-n", ns, "link", "set", "lo", "up")
                ip("-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self):
        ip("netns", "del", self.a, check=False)
        ip("netns", "del", self.b, check=False)
        if self._added_route:
            ip("route", "del", "blackhole", SUBNET, check=False)
            self._added_route = False

    def __enter__(self):
        return self.create()

    def __exit__(self, *exc):
        self.destroy()

    def prefix(self, namespace):
        """The command prefix that runs a program inside ``namespace``."""
        return ["ip", "netns", "exec", namespace]

    def cut(self):
        ip("-n", self.b, "link", "set", self.vb, "down")

    def heal(self):
        ip("-n", self.b, "link", "set", self.vb, "up")


def agent_in_namespace(path, namespace, **settings):
    """An agent directory whose venv/bin/python runs this Python inside ``namespace``."""
    from harness import make_agent_dir

    make_agent_dir(path, **{"HPC_PING_SECONDS": 1, "HPC_RECONNECT_SECONDS": 120, **settings})
    os.unlink(os.path.join(path, "venv"))
    os.makedirs(os.path.join(path, "venv", "bin"))
    wrapper = os.path.join(path, "venv", "bin", "python")
    with open(wrapper, "w") as f:
        f.write(f"#!/bin/sh\nexec ip netns exec {namespace} {sys.executable} \"$@\"\n")
    os.chmod(wrapper, 0o755)
    return path


# -- a private PostgreSQL -------------------------------------------------------------------

def _pg_program(name):
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if candidates:
        return candidates[-1]
    raise RuntimeError(f"PostgreSQL's {name} is not installed")


class PrivatePostgres:
    """A PostgreSQL cluster of its own in ``workdir``, listening only on a
    Unix socket there (port ``port`` names the socket).  Run as the postgres
    user when this process is root (initdb refuses root)."""

    def __init__(self, workdir, port=None):
        from harness import free_port

        self.workdir = os.path.join(workdir, "pg")
        self.data = os.path.join(self.workdir, "data")
        self.port = port or free_port()
        self.user = "postgres"
        os.makedirs(self.workdir)
        if os.geteuid() == 0:
            import pwd

            entry = pwd.getpwnam("postgres")
            os.chown(self.workdir, entry.pw_uid, entry.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        else:
            self._as = []

    def _run(self, name, *args):
        return subprocess.run([*self._as, _pg_program(name), *args], check=True,
                              capture_output=True, text=True, timeout=120)

    def init(self):
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", self.user, "-E", "UTF8",
                  "--no-sync")
        return self

    def start(self):
        # fsync off: a crash of PostgreSQL's processes loses nothing that was
        # committed (the kernel keeps the writes); only the machine's would.
        options = (f"-c listen_addresses='' -c unix_socket_directories={self.workdir} "
                   f"-p {self.port} -c fsync=off -c max_connections=200")
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.workdir, "log"), "-w",
                  "-t", "60", "-o", options, "start")
        return self

    def stop(self, mode="immediate"):
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def running(self):
        return os.path.exists(os.path.join(self.data, "postmaster.pid"))

    def create_database(self, name):
        self._run("createdb", "-h", self.workdir, "-p", str(self.port), "-U", self.user, name)

    def environment(self, name):
        """The variables that point tests/testsettings.py at database ``name`` here."""
        return {"HPC_TEST_DB": "postgres", "HPC_TEST_PG_HOST": self.workdir,
                "HPC_TEST_PG_PORT": str(self.port), "HPC_TEST_PG_USER": self.user,
                "HPC_TEST_DB_NAME": name}

    def connect(self, name, timeout=3):
        import psycopg

        return psycopg.connect(host=self.workdir, port=self.port, user=self.user,
                               dbname=name, connect_timeout=timeout, autocommit=True)


# -- the verdict ----------------------------------------------------------------------------

def read_ledger(path):
    """``{job id: [nonce, ...]}`` from the ledger's lines; unreadable lines under None."""
    found = collections.defaultdict(list)
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            found[int(parts[0])].append(parts[1])
        elif line.strip():
            found[None].append(line)
    return dict(found)


def verdict(jobs, history, ledger, cancel_requested=None):
    """Judge a run.

    ``jobs``: ``{job id: state}`` of every submitted job; ``history``:
    ``{job id: [(old, new), ...]}`` oldest first; ``ledger``: ``{job id:
    [nonce, ...]}`` (:func:`read_ledger`); ``cancel_requested``: ids the run
    asked to cancel (None: those whose history has a CANCELLING or CANCELLED).

    Returns ``{"jobs": n, problem: count, ..., "problems": {problem: [(job
    id, why), ...]}}`` for each of :data:`PROBLEMS`:

    * ``lost``: a job not cancelled that never ran, or a COMPLETED job that
      never ran;
    * ``ran_twice``: more than one ledger line;
    * ``wrong_final``: a final state its ledger does not allow (anything but
      COMPLETED for a job not cancelled, anything but COMPLETED or CANCELLED
      for a cancelled one);
    * ``stuck``: not in a final state;
    * ``backwards``: a history that does not start from DRAFT, skips, makes a
      move the transition table forbids, or does not end in the job's state;
    * ``stray``: ledger lines of no submitted job, or unreadable ones.
    """
    problems = {name: [] for name in PROBLEMS}
    for job_id, state in sorted(jobs.items()):
        state = JobStatus(state)
        moves = history.get(job_id, [])
        runs = len(ledger.get(job_id, ()))
        if cancel_requested is not None:
            cancelled = job_id in cancel_requested
        else:
            cancelled = any(new in (JobStatus.CANCELLING, JobStatus.CANCELLED) for _, new in moves)
        if runs > 1:
            problems["ran_twice"].append((job_id, f"ran {runs} times"))
        if runs == 0 and (not cancelled or state == JobStatus.COMPLETED):
            problems["lost"].append((job_id, f"never ran; {state.name}"))
        if state not in FINAL:
            problems["stuck"].append((job_id, f"left {state.name}"))
        else:
            allowed = {JobStatus.COMPLETED, JobStatus.CANCELLED} if cancelled else {
                JobStatus.COMPLETED}
            if state not in allowed:
                problems["wrong_final"].append((job_id, f"ended {state.name}"))
        why = _backwards(moves, state)
        if why:
            problems["backwards"].append((job_id, why))
    for job_id, nonces in sorted(ledger.items(), key=lambda item: (item[0] is None, item[0])):
        if job_id is None or job_id not in jobs:
            problems["stray"].append((job_id, f"{len(nonces)} ledger line(s) of no job"))
    result = {"jobs": len(jobs)}
    result.update((name, len(found)) for name, found in problems.items())
    result["problems"] = problems
    return result


def _backwards(moves, state):
    """Why a history is not a forward walk from DRAFT to ``state``, or None."""
    previous = JobStatus.DRAFT
    for old, new in moves:
        try:
            old, new = JobStatus(old), JobStatus(new)
        except ValueError:
            return f"unknown state in {old} -> {new}"
        if old != previous:
            return f"{new.name} from {old.name}, but the job was {previous.name}"
        if new not in ALLOWED_FROM or not can_transition(old, new):
            return f"{old.name} -> {new.name} is not allowed"
        previous = new
    if previous != state:
        return f"the history ends {previous.name} but the job is {state.name}"
    return None


def database_rows(connection, job_ids=None):
    """``(jobs, history)`` for :func:`verdict` from a psycopg connection;
    ``job_ids``: only these jobs (None: every job that left DRAFT)."""
    jobs = dict(connection.execute(
        "SELECT id, job_status FROM djangoapp_hpcjob WHERE job_status <> %s",
        [int(JobStatus.DRAFT)]).fetchall())
    if job_ids is not None:
        jobs = {job_id: state for job_id, state in jobs.items() if job_id in job_ids}
        missing = set(job_ids) - set(jobs)
        jobs.update(dict(connection.execute(
            "SELECT id, job_status FROM djangoapp_hpcjob WHERE id = ANY(%s)",
            [sorted(missing)]).fetchall()))
    history = collections.defaultdict(list)
    for job_id, old, new in connection.execute(
            "SELECT job_id, old_status, new_status FROM djangoapp_hpcjobstatuschange "
            "ORDER BY job_id, id"):
        if job_id in jobs:
            history[job_id].append((old, new))
    return jobs, dict(history)


def report_lines(result, recovery=None):
    """``name: value unit`` lines of a verdict and of recovery times
    (``{kind: [seconds or None, ...]}``)."""
    lines = [f"jobs: {result['jobs']} jobs"]
    lines += [f"{name}: {result[name]} jobs" for name in PROBLEMS]
    for kind, times in sorted((recovery or {}).items()):
        done = [t for t in times if t is not None]
        if done:
            lines.append(f"recovery_{kind}_max: {max(done):.2f} s")
            lines.append(f"recovery_{kind}_mean: {sum(done) / len(done):.2f} s")
        if len(done) < len(times):
            lines.append(f"recovery_{kind}_timed_out: {len(times) - len(done)} faults")
    return lines


# -- a run ----------------------------------------------------------------------------------

class Fault:
    def __init__(self, kind, after_job, delay, hold):
        self.kind, self.after_job, self.delay, self.hold = kind, after_job, delay, hold
        self.recovery = None

    def __repr__(self):
        return (f"{self.kind} after job #{self.after_job} (+{self.delay:.1f} s), "
                f"held {self.hold:.1f} s")


def plan(seed, jobs, faults, kinds, hold):
    """The faults of a run, from ``seed``: each kind of ``kinds`` in turn (so
    every kind comes at least once when ``faults >= len(kinds)``), at random
    job counts, with a random extra delay and a hold drawn from ``hold``
    (``(low, high)`` seconds: how long a process is stopped, the network cut
    or PostgreSQL down; a killed process is started again after at most 2 s)."""
    rng = random.Random(f"plan-{seed}")
    kinds = list(kinds)
    chosen = [kinds[i % len(kinds)] for i in range(faults)]
    rng.shuffle(chosen)
    moments = sorted(rng.sample(range(1, max(jobs, faults + 1)), faults))
    made = []
    for kind, moment in zip(chosen, moments):
        held = rng.uniform(*hold)
        if kind in ("hpcd_kill", "agent_kill"):
            held = min(held, 2.0)
        made.append(Fault(kind, moment, rng.uniform(0, 1), held))
    return made


class ChaosRun:
    """One run; Django must already be set up on ``postgres`` (see :func:`main`)."""

    def __init__(self, workdir, postgres, database, namespaces, jobs, faults, seed, rate,
                 cancel_fraction=0.05, drain_seconds=300.0, recovery_seconds=180.0):
        self.workdir = workdir
        self.postgres = postgres
        self.database = database
        self.namespaces = namespaces
        self.jobs = jobs
        self.faults = faults
        self.seed = seed
        self.rate = rate
        self.cancel_fraction = cancel_fraction
        self.drain_seconds = drain_seconds
        self.recovery_seconds = recovery_seconds
        self.ledger = os.path.join(workdir, "ledger")
        self.agent = os.path.join(workdir, "agent")
        self.daemon = None
        self.cluster = None
        self.submitted = []
        self.cancel_requested = set()
        self._faults_done = 0
        self._submit_finished = False
        self._condition = threading.Condition()
        self._error = None

    # -- set-up and tear-down ---------------------------------------------

    def start(self):
        from djangoapp.models import HpcCluster
        from harness import Hpcd, free_port, make_agent_dir, wait_for

        open(self.ledger, "a").close()
        env = {"HPC_WEBSOCKET_PORT": str(free_port()), "HPC_AGENT_PING_SECONDS": "1",
               "HPC_AGENT_RESUME_GRACE_SECONDS": "10", "HPC_DISPATCH_SCAN_SECONDS": "5"}
        prefix = ()
        if self.namespaces is not None:
            env["HPC_WEBSOCKET_INTERFACE"] = HPCD_ADDRESS
            prefix = self.namespaces.prefix(self.namespaces.a)
            agent_in_namespace(self.agent, self.namespaces.b)
        else:
            env["HPC_WEBSOCKET_INTERFACE"] = "127.0.0.1"
            make_agent_dir(self.agent, HPC_PING_SECONDS=1, HPC_RECONNECT_SECONDS=120)
        self.daemon = Hpcd(self.workdir, extra_env=env, prefix=prefix).start()
        self.cluster = HpcCluster.objects.create(host_name="localhost", client_path=self.agent)
        self.cluster.try_connect()
        wait_for(self.cluster.is_connected, timeout=60, what="the agent to connect")
        log(f"hpcd and the agent are up ({'namespaces' if self.namespaces else 'loopback'})")

    def stop(self):
        from harness import agent_pid, kill_agent

        if self.daemon is not None and self.daemon.process is not None:
            _signal(self.daemon.process.pid, signal.SIGCONT)  # a stopped one acts on SIGTERM
            self.daemon.stop()
        pid = agent_pid(self.agent)
        if pid:
            _signal(pid, signal.SIGCONT)
        kill_agent(self.agent)

    # -- the run ------------------------------------------------------------

    def run(self):
        faults = threading.Thread(target=self._guard, args=(self._inject_all,), daemon=True)
        faults.start()
        self._guard(self._submit_all)
        faults.join()
        if self._error:
            raise self._error
        self._drain()

    def _guard(self, function):
        try:
            function()
        except BaseException as e:
            log(f"{function.__name__} failed: {e!r}")
            with self._condition:
                self._error = self._error or e
                self._faults_done = len(self.faults)
                self._condition.notify_all()
            raise

    def _submit_all(self):
        from django.db import close_old_connections, connection

        rng = random.Random(f"jobs-{self.seed}")
        # Exactly the fraction asked for (at least one), so a short run cancels too.
        count = min(self.jobs, max(1, round(self.jobs * self.cancel_fraction)))
        to_cancel = set(rng.sample(range(self.jobs), count)) if self.cancel_fraction else set()
        began = time.monotonic()
        cancels = []
        for i in range(self.jobs):
            with self._condition:
                # At the moment of the fault after next, wait for the
                # current one to end: every fault meets jobs in flight.
                while (self._faults_done + 1 < len(self.faults)
                       and i >= self.faults[self._faults_done + 1].after_job
                       and self._error is None):
                    self._condition.wait(1)
                if self._error is not None:
                    return
            pause = began + i / self.rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                began -= pause  # a stall is not made up for with a burst
            job_id = self._submit_one(rng.choice(("0", "0.1", "0.3", "0.6", "1")))
            with self._condition:
                self.submitted.append(job_id)
                self._condition.notify_all()
            if i in to_cancel:
                cancels.append((time.monotonic() + rng.uniform(0, 1.5), job_id))
            cancels = self._cancel_due(cancels)
        self._submit_finished = True
        while cancels:
            time.sleep(0.1)
            cancels = self._cancel_due(cancels)
        close_old_connections()
        connection.close()

    def _submit_one(self, sleep):
        from djangoapp.models import HpcJob, JobStateError

        job = _retry(lambda: HpcJob.objects.create(cluster=self.cluster), "create a job")
        script = (f"read -r n < /proc/sys/kernel/random/uuid\n"
                  f"echo \"{job.pk} $n\" >> {self.ledger}\n"
                  f"sleep {sleep}\n")

        def submit():
            fresh = HpcJob.objects.get(pk=job.pk)
            try:
                fresh.submit({"script": script})
            except JobStateError:
                pass  # an earlier try went through after all
        _retry(submit, f"submit job {job.pk}")
        return job.pk

    def _cancel_due(self, cancels):
        from djangoapp.models import HpcJob, JobStateError

        now = time.monotonic()
        for due, job_id in [c for c in cancels if c[0] <= now]:
            self.cancel_requested.add(job_id)

            def cancel():
                try:
                    HpcJob.objects.get(pk=job_id).cancel()
                except JobStateError:
                    pass  # it ended first
            _retry(cancel, f"cancel job {job_id}")
        return [c for c in cancels if c[0] > now]

    def _inject_all(self):
        for index, fault in enumerate(self.faults):
            with self._condition:
                while len(self.submitted) < fault.after_job and self._error is None:
                    self._condition.wait(1)
                if self._error is not None:
                    return
            time.sleep(fault.delay)
            log(f"fault {index + 1}/{len(self.faults)}: {fault}")
            began = time.time()
            healed = self._inject(fault)
            with self._condition:
                # Submissions go on while the recovery is measured.
                self._faults_done = index + 1
                self._condition.notify_all()
            fault.recovery = self._recovery(began, healed)
            took = "no" if fault.recovery is None else f"{fault.recovery:.2f} s"
            log(f"  recovered: {took}")

    def _inject(self, fault):
        """Inject ``fault``, hold it, end it; returns when it ended (time.time())."""
        kind = fault.kind
        if kind == "hpcd_kill":
            process = self.daemon.process
            process.kill()
            process.wait()
            self.daemon.process = None
            time.sleep(fault.hold)
            self.daemon.start(timeout=120)
        elif kind == "agent_kill":
            _signal(self._agent_pid(), signal.SIGKILL)
        elif kind in ("hpcd_stop", "agent_stop"):
            pid = self.daemon.process.pid if kind == "hpcd_stop" else self._agent_pid()
            _signal(pid, signal.SIGSTOP)
            try:
                time.sleep(fault.hold)
            finally:
                _signal(pid, signal.SIGCONT)
        elif kind == "postgres_restart":
            self.postgres.stop("immediate")
            time.sleep(fault.hold)
            self.postgres.start()
        elif kind == "network_cut":
            self.namespaces.cut()
            try:
                time.sleep(fault.hold)
            finally:
                self.namespaces.heal()
        else:
            raise ValueError(f"unknown fault kind {kind!r}")
        return time.time()

    def _agent_pid(self):
        from harness import agent_pid, wait_for

        return wait_for(lambda: agent_pid(self.agent), timeout=120, interval=0.2,
                        what="an agent to be running")

    def _recovery(self, began, healed):
        """Seconds from ``healed`` until a job submitted since the fault
        ``began`` completes (it went all the way through hpcd, the agent and
        back), or, when no job comes after the fault, until the cluster is
        online again; None: not within recovery_seconds."""
        deadline = time.monotonic() + self.recovery_seconds
        while time.monotonic() < deadline:
            try:
                with self.postgres.connect(self.database) as connection:
                    ended, later = connection.execute(
                        "SELECT min(c.time) FILTER (WHERE c.new_status = %s), count(*) "
                        "FROM djangoapp_hpcjob j LEFT JOIN djangoapp_hpcjobstatuschange c "
                        "ON c.job_id = j.id AND c.time >= to_timestamp(%s) "
                        "WHERE j.job_pending_time >= to_timestamp(%s)",
                        [int(JobStatus.COMPLETED), healed, began]).fetchone()
                    if ended is not None:
                        return max(0.0, ended.timestamp() - healed)
                    if not later and self._submit_finished:
                        online, = connection.execute(
                            "SELECT online FROM djangoapp_hpccluster WHERE id = %s",
                            [self.cluster.pk]).fetchone()
                        if online and self.cluster.is_connected():
                            return time.time() - healed
            except Exception:  # noqa: BLE001 - the database may still be coming back
                pass
            time.sleep(0.2)
        return None

    def _drain(self):
        final = [int(s) for s in FINAL]
        deadline = time.monotonic() + self.drain_seconds
        left = None
        while time.monotonic() < deadline:
            try:
                with self.postgres.connect(self.database) as connection:
                    left, = connection.execute(
                        "SELECT count(*) FROM djangoapp_hpcjob WHERE id = ANY(%s) "
                        "AND NOT job_status = ANY(%s)", [self.submitted, final]).fetchone()
            except Exception:  # noqa: BLE001
                left = None
            if left == 0:
                return
            time.sleep(0.5)
        log(f"{left} job(s) still unfinished after {self.drain_seconds:.0f} s")

    def judge(self):
        with self.postgres.connect(self.database) as connection:
            jobs, history = database_rows(connection, set(self.submitted))
        return verdict(jobs, history, read_ledger(self.ledger), self.cancel_requested)

    def recovery(self):
        found = collections.defaultdict(list)
        for fault in self.faults:
            found[fault.kind].append(fault.recovery)
        return dict(found)


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _retry(function, what, timeout=300.0):
    """Call ``function`` until the database lets it through."""
    from django.db import Error, connection

    deadline = time.monotonic() + timeout
    failures = 0
    while True:
        try:
            result = function()
        except Error as e:
            connection.close()
            if time.monotonic() > deadline:
                raise
            if not failures:
                log(f"{what}: {type(e).__name__}; trying again every 0.5 s")
            failures += 1
            time.sleep(0.5)
        else:
            if failures:
                log(f"{what}: done after {failures} failure(s)")
            return result


# -- the command ----------------------------------------------------------------------------

def parser(jobs=60, faults=None, hold=(2.0, 4.0), rate=3.0, drain=120.0):
    p = argparse.ArgumentParser(description="A chaos run: jobs, faults, a verdict.")
    p.add_argument("--jobs", type=int, default=jobs)
    p.add_argument("--faults", type=int, default=faults,
                   help="how many faults (default: one of each kind)")
    p.add_argument("--kinds", default=",".join(FAULT_KINDS),
                   help="the fault kinds, comma-separated (default: all)")
    p.add_argument("--hold", default=f"{hold[0]:g}-{hold[1]:g}",
                   help="seconds a stop or cut lasts, LOW-HIGH")
    p.add_argument("--rate", type=float, default=rate, help="jobs submitted per second")
    p.add_argument("--cancel-fraction", type=float, default=0.05)
    p.add_argument("--drain", type=float, default=drain,
                   help="seconds to wait after the last fault for every job to end")
    p.add_argument("--seed", type=int, default=None, help="replay the run of this seed")
    p.add_argument("--no-namespaces", action="store_true",
                   help="run on loopback (no network cuts) even where namespaces work")
    p.add_argument("--json", help="also write the verdict and figures to this file")
    p.add_argument("--keep", action="store_true", help="keep the run's directory")
    return p


def main(argv=None, **defaults):
    args = parser(**defaults).parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**9)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(FAULT_KINDS)
    if unknown:
        raise SystemExit(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    why_not = None if not args.no_namespaces else "--no-namespaces"
    why_not = why_not or Namespaces.unavailable()
    if why_not and "network_cut" in kinds:
        kinds.remove("network_cut")
        log(f"no network cuts: {why_not}")
    low, high = (float(x) for x in args.hold.split("-"))
    faults = plan(seed, args.jobs, args.faults if args.faults is not None else len(kinds),
                  kinds, (low, high))
    print(f"seed: {seed} (replay: --seed {seed})", flush=True)
    # SIGTERM (a test's timeout) still stops everything the run started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = tempfile.mkdtemp(prefix="hpc-chaos-")
    os.chmod(workdir, 0o755)  # the postgres user reaches its directory inside
    namespaces = Namespaces().create() if not why_not else None
    postgres = run = None
    clean = False
    try:
        postgres = PrivatePostgres(workdir).init().start()
        postgres.create_database("chaos")
        os.environ.update(postgres.environment("chaos"))
        os.environ["DJANGO_SETTINGS_MODULE"] = "testsettings"
        os.environ["HPC_IPC_UNIX_SOCKET"] = os.path.join(workdir, "hpcd.sock")
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        run = ChaosRun(workdir, postgres, "chaos", namespaces, args.jobs, faults, seed,
                       args.rate, args.cancel_fraction, drain_seconds=args.drain)
        started = time.monotonic()
        run.start()
        run.run()
        elapsed = time.monotonic() - started
        result = run.judge()
        recovery = run.recovery()
        for line in report_lines(result, recovery):
            print(line)
        print(f"cancel_requested: {len(run.cancel_requested)} jobs")
        print(f"faults: {len(faults)} faults")
        print(f"duration: {elapsed:.1f} s")
        for name in PROBLEMS:
            for job_id, why in result["problems"][name][:20]:
                print(f"  {name}: job {job_id}: {why}")
        clean = not any(result[name] for name in PROBLEMS)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"seed": seed, "clean": clean, "duration": elapsed,
                           "recovery": recovery, "workdir": workdir,
                           "faults": [repr(f) for f in faults],
                           **{k: v for k, v in result.items()}}, f, indent=1, default=str)
    finally:
        if run is not None:
            run.stop()
        if postgres is not None and postgres.running():
            try:
                postgres.stop("immediate")
            except subprocess.CalledProcessError:
                pass
        if namespaces is not None:
            namespaces.destroy()
        if args.keep or not clean:
            print(f"kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"verdict: {'clean' if clean else 'NOT CLEAN'} (seed {seed})")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
