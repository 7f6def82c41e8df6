"""The whole chain on real schedulers: Django -> hpcd -> SSH -> agent (as the
unprivileged test user) -> Slurm or Grid Engine -> states back in the database.

Each scheduler's cases share one test so their waits overlap: a job that
completes, one that fails with its exit code, a cancelled one, one over its
walltime, an array with a failing element, a submit interrupted by killing
the agent right after the scheduler accepted it (reconciled, not run
twice), and a job that finished while no agent was running.
"""

import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from djangoapp.models import HpcJob, JobStatus
from harness import FINAL, services_environment, wait_for, wait_status
from sshtools import make_cluster, read_key

CRASHY = '''\
"""A site scheduler that kills its agent right after the scheduler took a job."""
import os
import signal

from {module} import {name}


class CrashAfterSubmit({name}):
    def submit(self, parameters):
        job_id = super().submit(parameters)
        marker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash-next-submit")
        if os.path.exists(marker):
            os.unlink(marker)
            os.kill(os.getpid(), signal.SIGKILL)
        return job_id
'''

SCHEDULERS = {
    "slurm": ("hpc_agent.schedulers.slurm", "Slurm", "HPC_TEST_SLURM", 60),
    "sge": ("hpc_agent.schedulers.sge", "SGE", "HPC_TEST_SGE", 5),
}


def sge_environment():
    return {**os.environ, **{k: v for k, v in services_environment().items()
                             if k.startswith("SGE_")}}


def jobs_named(kind, tag):
    """How many jobs the scheduler knows by this name (live and accounting)."""
    if kind == "slurm":
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-a", "--format=JobID",
                              f"--name={tag}", "--starttime=now-1hour"],
                             capture_output=True, text=True, check=True).stdout
        return len(out.split())
    out = subprocess.run(["qacct", "-j", tag], capture_output=True, text=True,
                         env=sge_environment()).stdout
    return sum(1 for line in out.splitlines() if line.startswith("jobnumber"))


@pytest.fixture
def no_leftovers(ssh_server):
    """A failed test must not leave sleeping jobs holding the scheduler's slots."""
    yield
    user = ssh_server["user"]
    subprocess.run(["scancel", "-u", user], capture_output=True)
    subprocess.run(["qdel", "-u", user], capture_output=True, env=sge_environment())


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_jobs_on_a_real_scheduler_through_the_whole_chain(hpcd, ssh_server, remote_agent_dir,
                                                          no_leftovers, kind):
    module, name, flag, walltime = SCHEDULERS[kind]
    environment = services_environment()
    if not environment.get(flag):
        pytest.skip(f"no {kind}: {flag} is not set (scripts/services.sh start {kind})")
    agent = remote_agent_dir
    owner = os.stat(agent).st_uid
    with open(os.path.join(agent, "crashy.py"), "w") as f:
        f.write(CRASHY.format(module=module, name=name))
    # A prefix of this run's own: job ids repeat across test databases.
    prefix = f"t{uuid.uuid4().hex[:8]}"
    with open(os.path.join(agent, "settings.py"), "a") as f:
        f.write('\nHPC_SCHEDULER_CLASS = "crashy.CrashAfterSubmit"\n'
                f"HPC_JOB_TAG_PREFIX = {prefix!r}\n"
                "import os\n"
                f'os.environ.setdefault("SGE_ROOT", {environment.get("SGE_ROOT", "")!r})\n'
                f'os.environ.setdefault("SGE_CELL", {environment.get("SGE_CELL", "")!r})\n')
    cluster = make_cluster(ssh_server, agent, key=read_key(ssh_server, "id_ed25519"))
    cluster.try_connect()
    wait_for(cluster.is_connected, timeout=60, what=f"the agent: {cluster.status_detail}")

    def submit(parameters):
        job = HpcJob.objects.create()
        job.submit(parameters)
        return job

    over_time = submit({"script": "sleep 600", "walltime_seconds": walltime})
    completes = submit({"script": "echo hi > out.txt"})
    fails = submit({"script": "exit 3"})
    cancelled = submit({"script": "sleep 600"})
    index = "$SLURM_ARRAY_TASK_ID" if kind == "slurm" else "$SGE_TASK_ID"
    array = submit({"script": f'[ "{index}" != 2 ]', "array": "1-3"})

    wait_status(completes, FINAL, timeout=90)
    assert completes.status == JobStatus.COMPLETED, completes.job_details
    assert b"".join(completes.fetch_remote_file("out.txt").streaming_content) == b"hi\n"
    wait_status(fails, FINAL, timeout=90)
    assert (fails.status, fails.job_details) == (JobStatus.ERROR, "exit code 3")
    wait_status(cancelled, JobStatus.RUNNING, timeout=90)
    cancelled.cancel()
    wait_status(cancelled, FINAL, timeout=120)
    assert cancelled.status == JobStatus.CANCELLED, cancelled.job_details
    wait_status(array, FINAL, timeout=120)
    assert array.status == JobStatus.ERROR
    assert "2 COMPLETED, 1 FAILED" in array.job_details

    # The agent dies right after the scheduler accepted a job: the next agent
    # finds it by its tag instead of submitting it again.
    marker = os.path.join(agent, "crash-next-submit")
    open(marker, "w").close()
    os.chown(marker, owner, -1)
    crashed = submit({"script": "sleep 2"})
    wait_for(lambda: not os.path.exists(marker), timeout=60, what="the crash")
    wait_status(crashed, FINAL, timeout=120)
    assert crashed.status == JobStatus.COMPLETED, crashed.job_details
    assert any(c.new_status == JobStatus.SUBMITTED for c in crashed.history())
    wait_for(lambda: jobs_named(kind, f"{prefix}-{crashed.pk}") >= 1, timeout=30)
    assert jobs_named(kind, f"{prefix}-{crashed.pk}") == 1, "submitted twice"

    # A job ends while no agent runs (the relaunch fails until it has ended).
    unwatched = submit({"script": "sleep 3; echo done > done.txt"})
    wait_status(unwatched, JobStatus.RUNNING, timeout=90)
    venv = os.path.join(agent, "venv")
    shutil.move(venv, venv + ".away")
    with open(os.path.join(agent, "agent.lock")) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    done = os.path.join(agent, "jobs", str(unwatched.pk), "done.txt")
    wait_for(lambda: os.path.exists(done), timeout=60, what="the job to end unwatched")
    time.sleep(2)
    unwatched.refresh_from_db()
    assert unwatched.status == JobStatus.RUNNING  # nobody has told the database yet
    shutil.move(venv + ".away", venv)
    wait_status(unwatched, FINAL, timeout=120)
    assert unwatched.status == JobStatus.COMPLETED, unwatched.job_details

    wait_status(over_time, FINAL, timeout=240)
    assert over_time.status == JobStatus.WALL_TIME_EXCEEDED, over_time.job_details
