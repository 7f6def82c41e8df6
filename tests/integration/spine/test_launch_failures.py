"""A local agent that cannot start says why on its cluster, and is retried."""

import os

from djangoapp.models import HpcCluster
from harness import wait_for


def failure_detail(cluster):
    def detail():
        cluster.refresh_from_db()
        return "retrying in" in cluster.status_detail and cluster.status_detail

    return wait_for(detail, timeout=20, what="the launch to fail")


def test_a_missing_agent_directory_is_reported(hpcd):
    cluster = HpcCluster.objects.create(host_name="localhost", client_path="/nonexistent/agent")
    cluster.try_connect()
    assert "/nonexistent/agent does not exist" in failure_detail(cluster)


def test_broken_agent_settings_are_reported_with_the_agents_own_words(hpcd, agent_dir):
    path = agent_dir()
    with open(os.path.join(path, "settings.py"), "a") as f:
        f.write("HPC_SCHEDULER_CLASS = 'no.such.Scheduler'\n")
    cluster = HpcCluster.objects.create(host_name="localhost", client_path=path)
    cluster.try_connect()
    detail = failure_detail(cluster)
    assert "exited at once (exit status 2)" in detail
    assert "No module named 'no'" in detail
    assert cluster.is_connected() is None
    # Fixed by the admin: the next retry (or a try_connect) connects.
    with open(os.path.join(path, "settings.py"), "a") as f:
        f.write("HPC_SCHEDULER_CLASS = 'hpc_agent.schedulers.local.Local'\n")
    cluster.try_connect()
    wait_for(cluster.is_connected, timeout=20, what="the agent after the fix")
