"""Both halves of a portal written for the seed, joined: its Django job class
(tests/seedportal) and its cluster-side Local scheduler with a %-template
(tests/seedportal/cluster), through a live hpcd and a local agent.  The same
portal on the real Slurm is in tests/integration/ssh/test_seed_portal_slurm.py."""

import json
import os

import pytest

from djangoapp.models import HpcCluster, JobStatus as S
from harness import FINAL, Hpcd, job_dir, make_agent_dir, wait_for
from seedportal.cluster import install
from seedportal.models import Job, SentMail


@pytest.fixture
def seed_portal(transactional_db, short_tmp, settings):
    """hpcd with the portal's job class; an agent with the portal's scheduler."""
    settings.HPC_JOB_CLASS = "seedportal.Job"
    daemon = Hpcd(short_tmp, extra_env={"HPC_JOB_CLASS": "seedportal.Job"})
    settings.HPC_IPC_UNIX_SOCKET = daemon.socket_path
    daemon.start()
    agent = os.path.join(short_tmp, "agent")
    make_agent_dir(agent)
    scheduler = install(agent, "local")
    with open(os.path.join(agent, "settings.py"), "a") as f:
        f.write(f"HPC_SCHEDULER_CLASS = {scheduler!r}\n")
    cluster = HpcCluster.objects.create(host_name="localhost", client_path=agent)
    cluster.try_connect()
    wait_for(cluster.is_connected, what=f"the agent: {cluster.status_detail}")
    yield cluster
    daemon.stop()
    from harness import kill_agent
    kill_agent(agent)


def wait_state(job, states, timeout=30.0):
    def reached():
        job.refresh_from_db()
        return job.job_status in states

    wait_for(reached, timeout=timeout, what=f"job {job.pk} to reach {states}")


def test_a_seed_portal_runs_end_to_end_on_its_own_local_scheduler(seed_portal):
    parameters = json.dumps({"mass": 30, "detectors": ["H1", "L1"]})  # the seed's way
    job = Job.objects.create(name="bilby", description="seed-shaped")
    job.submit(parameters)
    wait_state(job, FINAL)
    assert job.job_status == S.COMPLETED, job.job_details
    # The portal's status override spoke for the job; its status property is text.
    assert job.job_details == "portal job finished" and job.status == "Completed"
    # The template ran in the job's directory with the parameters as passed.
    directory = job_dir(seed_portal, job)
    with open(os.path.join(directory, "result.txt")) as f:
        assert f.read() == parameters
    # The file list, read the seed's way, shows the job's files and nothing of
    # the agent's own.
    files = job.fetch_remote_file_list("/", True)
    files.pop_uint()  # the message id
    entries = {}
    for _ in range(files.pop_uint()):
        path, is_dir, size = files.pop_string(), files.pop_bool(), files.pop_ulong()
        entries[path] = (is_dir, size)
    names = set(entries)
    assert entries["/result.txt"] == (False, len(parameters))
    assert "/result.txt" in names and "/parameters.json" in names
    assert not any(n.startswith("/.hpc") for n in names)
    assert b"".join(job.fetch_remote_file("/result.txt").streaming_content) == (
        parameters.encode())
    (mail,) = wait_for(lambda: list(SentMail.objects.filter(job=job)), what="the mail")
    assert mail.subject == "Your job bilby is Completed"
