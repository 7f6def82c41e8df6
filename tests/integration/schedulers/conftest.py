"""Fixtures for the scheduler classes against the real Slurm and Grid Engine.

Where the daemons are: HPC_TEST_SLURM / HPC_TEST_SGE (with SGE_ROOT, SGE_CELL)
in the environment, or else var/services/env.sh as written by
``scripts/services.sh start slurm sge``.  Without either the tests skip and
say why.

The classes run as the unprivileged user ``hpcuser``, as an agent does on a
cluster: ``runuser -u hpcuser -- /usr/bin/python3`` with PYTHONPATH at this
checkout (the test's own interpreter lives under /root, which hpcuser cannot
read), in a directory of its own under /tmp.  A small driver program reads
the operations as JSON on stdin and prints their results, with every command
the class ran (its ``run`` is wrapped), so a test can count processes and
check their output.
"""

import json
import pwd
import random
import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from harness import SERVICES_ENV, services_environment

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "tests" / "data" / "schedulers"
USER = "hpcuser"

DRIVER = r'''
import json, sys
from hpc_agent.config import AgentSettings
from hpc_agent.schedulers.base import job_state, submit_job
request = json.load(sys.stdin)
settings = AgentSettings(request["directory"],
                         {"HPC_JOB_WORKING_DIRECTORY": request["directory"] + "/jobs",
                          "HPC_SCHEDULER_CLASS": request["class"]})
base = settings.scheduler_class()  # the seed's names resolve from here on
from scheduler_fakes import counted
Counted = counted(base)
spawned = Counted.spawned

for key, value in request.get("attributes", {}).items():
    setattr(Counted, key, value)
if request.get("hide_live_view"):  # as if the jobs had left squeue/qstat long ago
    setattr(Counted, request["hide_live_view"], classmethod(lambda cls: {}))

def state(s):
    s = job_state(s)
    return s and {"status": s.status.name, "detail": s.detail, "started": s.started}

results = []
for op, *args in request["ops"]:
    del spawned[:]
    try:
        if op == "submit":
            value = Counted(settings, args[0]).submit(args[1])
        elif op == "_submit":  # the agent's entry point
            value = submit_job(Counted(settings, args[0], None), args[1])
        elif op == "status":
            value = state(Counted(settings, args[0], args[1]).status())
        elif op == "cancel":
            value = Counted(settings, args[0], args[1]).cancel()
        elif op == "status_many":
            answer = Counted.status_many(settings, [tuple(job) for job in args[0]])
            value = {str(k): state(v) for k, v in answer.items()}
        else:
            value = {str(k): v for k, v in Counted.find_submitted(settings, args[0]).items()}
        results.append({"value": value, "spawned": list(spawned)})
    except Exception as error:
        results.append({"error": f"{type(error).__name__}: {error}", "spawned": list(spawned)})
json.dump(results, sys.stdout)
'''


class AsUser:
    """One scheduler class, run as hpcuser in its own directory."""

    def __init__(self, class_path, environment, directory):
        self.class_path = class_path
        self.environment = environment
        self.directory = directory
        # Tags must be new on every run: accounting outlives the daemons' job ids.
        self.base = random.randrange(10**6, 10**7) * 100

    def ui(self, n):
        return self.base + n

    def __call__(self, *ops, timeout=120, **request):
        request.update({"class": self.class_path, "directory": self.directory,
                        "ops": list(ops)})
        env = [f"{k}={v}" for k, v in self.environment.items()]
        result = subprocess.run(
            ["runuser", "-u", USER, "--", "env", "-i", *env, "/usr/bin/python3", "-c", DRIVER],
            input=json.dumps(request), capture_output=True, text=True, timeout=timeout,
            cwd=self.directory)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def one(self, op, *args, **request):
        """Run one operation; return (value, spawned), raising on an error."""
        [result] = self((op, *args), **request)
        assert "error" not in result, result["error"]
        return result["value"], result["spawned"]


def as_user(class_path, extra_environment, portal=None):
    """``portal``: install the seed-style portal's scheduler files (tests/seedportal)
    in the directory, which is then the agent directory they expect."""
    try:
        pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"no user {USER}: run scripts/services.sh")
    directory = tempfile.mkdtemp(prefix="hpc-sched-", dir="/tmp")
    if portal:
        from seedportal.cluster import install

        class_path = install(directory, portal)
    for path in [directory, *(str(p) for p in Path(directory).rglob("*"))]:
        shutil.chown(path, USER)
    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
                   "HOME": directory,
                   "PYTHONDONTWRITEBYTECODE": "1", **extra_environment}
    return AsUser(class_path, environment, directory)


@pytest.fixture(scope="module")
def slurm():
    env = services_environment()
    if env.get("HPC_TEST_SLURM") != "1":
        pytest.skip("no test Slurm: set HPC_TEST_SLURM=1 or run scripts/services.sh "
                    f"({SERVICES_ENV})")
    runner = as_user("hpc_agent.schedulers.slurm.Slurm", {})
    runner.accounting = env.get("HPC_TEST_SLURM_ACCOUNTING", "jobcomp")
    yield runner
    shutil.rmtree(runner.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def seed_slurm():
    """The seed-style portal's Slurm class (tests/seedportal/cluster), as hpcuser."""
    env = services_environment()
    if env.get("HPC_TEST_SLURM") != "1":
        pytest.skip("no test Slurm: set HPC_TEST_SLURM=1 or run scripts/services.sh "
                    f"({SERVICES_ENV})")
    runner = as_user(None, {}, portal="slurm")
    yield runner
    shutil.rmtree(runner.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def sge():
    env = services_environment()
    if env.get("HPC_TEST_SGE") != "1":
        pytest.skip(f"no test Grid Engine: set HPC_TEST_SGE=1 or run scripts/services.sh "
                    f"({SERVICES_ENV})")
    runner = as_user("hpc_agent.schedulers.sge.SGE",
                     {k: env[k] for k in ("SGE_ROOT", "SGE_CELL")})
    yield runner
    shutil.rmtree(runner.directory, ignore_errors=True)


# -- the fakes' outputs against the real ones ------------------------------------

#: Column patterns of the '|'-separated outputs the classes parse; the last
#: column (a job name) may itself hold '|'.
COLUMNS = {
    "squeue": [r"\d+", r"\d+|N/A", r"[A-Z_]+", r"\d+", r"\S.*", r"[\dT:-]+|N/A", r".*"],
    "sacct": [r"\d+(_(\d+|\[[^\]]+\]))?", r"[A-Z_]+( by \d+)?", r"\d+:\d+",
              r"[\dT:-]+|Unknown|None", r".*"],
}
#: The qacct keys the SGE class reads, with the shape of their values.
QACCT_VALUES = {"jobname": r"\S+", "jobnumber": r"\d+", "taskid": r"\d+|undefined",
                "failed": r"\d+(\s+:.*)?", "exit_status": r"\d+(\s+\(.*\))?",
                "ru_wallclock": r"[\d.]+s", "category": r".+",
                "start_time": r"\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}|-/-"}


def assert_same_shape(kind, recorded, real):
    """The real output has the shape of the recorded one the unit tests use."""
    assert real.strip(), f"the real {kind} printed nothing to compare"
    if kind in COLUMNS:
        columns = COLUMNS[kind]
        for text in (recorded, real):
            for line in text.splitlines():
                fields = line.split("|", len(columns) - 1)
                assert len(fields) == len(columns), f"{kind}: {line!r}"
                for pattern, field in zip(columns, fields):
                    assert re.fullmatch(pattern, field), f"{kind}: {field!r} in {line!r}"
    elif kind == "qstat":
        shapes = [qstat_shape(text) for text in (recorded, real)]
        assert shapes[1] <= shapes[0], f"qstat -xml: unknown elements {shapes[1] - shapes[0]}"
    elif kind == "qacct":
        keys = [qacct_keys(text) for text in (recorded, real)]
        assert keys[0] == keys[1], f"qacct keys differ: {keys[0] ^ keys[1]}"
        for line in real.splitlines():
            key, _, value = line.partition(" ")
            if key in QACCT_VALUES:
                assert re.fullmatch(QACCT_VALUES[key], value.strip()), line
    else:
        raise AssertionError(f"no shape for {kind}")


def qstat_shape(text):
    """Paths of the elements in qstat -xml output, array-ness and all."""
    root = ElementTree.fromstring(text)
    paths = {root.tag}
    for container in root:
        for job in container:
            assert {"JB_job_number", "JB_name", "state"} <= {e.tag for e in job}
            paths |= {f"{container.tag}/{job.tag}/{e.tag}" for e in job}
    return paths


def qacct_keys(text):
    return {line.split(None, 1)[0] for line in text.splitlines()
            if line.strip() and not line.startswith("=")}


@pytest.fixture
def same_shape():
    """``same_shape(kind, recorded file under tests/data/schedulers, real output)``."""
    def check(kind, name, real):
        assert_same_shape(kind, (DATA / name).read_text(), real)
    return check
