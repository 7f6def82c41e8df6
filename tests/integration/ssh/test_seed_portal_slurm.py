"""A portal written for the seed, both halves (tests/seedportal), on the real
Slurm: Django -> hpcd -> SSH -> agent as the unprivileged test user -> the
portal's own Slurm subclass with its %-template -> states back through the
portal's job class and its pre_save receiver."""

import json
import os
import subprocess
import uuid

import pytest

from djangoapp.models import JobStatus as S
from harness import FINAL, Hpcd, services_environment, wait_for
from seedportal.cluster import install
from seedportal.models import Job, SentMail
from sshtools import make_cluster, read_key


@pytest.fixture
def portal_hpcd(transactional_db, short_tmp, settings):
    settings.HPC_JOB_CLASS = "seedportal.Job"
    daemon = Hpcd(short_tmp, extra_env={"HPC_JOB_CLASS": "seedportal.Job"})
    settings.HPC_IPC_UNIX_SOCKET = daemon.socket_path
    daemon.start()
    yield daemon
    daemon.stop()


def wait_state(job, states, timeout):
    def reached():
        job.refresh_from_db()
        return job.job_status in states

    wait_for(reached, timeout=timeout, what=f"job {job.pk} to reach {states}")


def test_a_seed_portal_runs_on_the_real_slurm(portal_hpcd, ssh_server, remote_agent_dir):
    if not services_environment().get("HPC_TEST_SLURM"):
        pytest.skip("no Slurm: HPC_TEST_SLURM is not set (scripts/services.sh start slurm)")
    agent = remote_agent_dir
    owner = os.stat(agent).st_uid
    scheduler = install(agent, "slurm")
    subprocess.run(["chown", "-R", str(owner), os.path.join(agent, "settings")], check=True)
    prefix = f"p{uuid.uuid4().hex[:8]}"  # job ids repeat across test databases
    with open(os.path.join(agent, "settings.py"), "a") as f:
        f.write(f"\nHPC_SCHEDULER_CLASS = {scheduler!r}\nHPC_JOB_TAG_PREFIX = {prefix!r}\n")
    cluster = make_cluster(ssh_server, agent, key=read_key(ssh_server, "id_ed25519"))
    cluster.try_connect()
    wait_for(cluster.is_connected, timeout=60, what=f"the agent: {cluster.status_detail}")
    try:
        parameters = json.dumps({"mass": 30})
        job = Job.objects.create(name="on slurm")
        job.submit(parameters)
        wait_state(job, FINAL, timeout=120)
        assert job.job_status == S.COMPLETED, job.job_details
        assert job.job_details == "portal job finished"
        assert b"".join(job.fetch_remote_file("/result.txt").streaming_content) == (
            parameters.encode())
        # The template's #SBATCH lines applied, and this project's tag won the name.
        listing = [entry["path"] for entry in job.fetch_remote_file_list("/", True)]
        (out,) = [p for p in listing if p.startswith("slurm-") and p.endswith(".out")]
        text = b"".join(job.fetch_remote_file(out).streaming_content).decode()
        assert f"job name: {prefix}-{job.pk}" in text
        # --time=01:02:07, which Slurm rounds up to whole minutes.
        assert "memory per cpu: 64" in text and "time limit: 1:03:00" in text
        (mail,) = wait_for(lambda: list(SentMail.objects.filter(job=job)), what="the mail")
        assert mail.subject == "Your job on slurm is Completed"
    finally:
        # Only this test's jobs: other tests may share the test user's queue.
        listed = subprocess.run(["squeue", "-h", "-u", ssh_server["user"], "-o", "%i %j"],
                                capture_output=True, text=True).stdout.split("\n")
        mine = [line.split()[0] for line in listed if f" {prefix}-" in line]
        if mine:
            subprocess.run(["scancel", *mine], capture_output=True)
