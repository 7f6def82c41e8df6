"""Helpers for tests that launch agents over SSH (fixtures are in conftest.py)."""

import os

from djangoapp.models import HpcCluster, HpcJob, JobStatus
from harness import FINAL, wait_for, wait_status


def read_key(ssh_server, name):
    with open(os.path.join(ssh_server["keys"], name)) as f:
        return f.read()


def host_keys(ssh_server):
    with open(ssh_server["host_keys"]) as f:
        return f.read()


def make_cluster(ssh_server, client_path, **credentials):
    return HpcCluster.objects.create(
        host_name=ssh_server["host"], port=ssh_server["port"], username=ssh_server["user"],
        host_key=host_keys(ssh_server), client_path=client_path, **credentials)


def connect_and_run_a_job(cluster):
    cluster.try_connect()

    def online():
        cluster.refresh_from_db()
        return cluster.is_connected()

    try:
        wait_for(online, timeout=60, what="the agent to connect over SSH")
    except AssertionError:
        raise AssertionError(f"not connected: {cluster.status_detail}") from None
    job = HpcJob.objects.create()
    job.submit({"script": "id -un > who.txt"})
    wait_status(job, FINAL, timeout=60)
    assert job.status == JobStatus.COMPLETED, job.job_details
    who = b"".join(job.fetch_remote_file("who.txt").streaming_content).decode().strip()
    return who
