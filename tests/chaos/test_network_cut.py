"""A silent network cut between hpcd and an agent loses nothing.

hpcd and the agent run in two network namespaces joined by a veth pair
(10.200.0.1 and .2; INFRA.md), with a blackhole route for that range in the
root namespace so nothing can leave the machine.  Setting the agent's side
of the link down is a cut neither side is told about: only the websocket
pings notice it.
"""

import os

import pytest

from chaos_kit import Namespaces, agent_in_namespace
from djangoapp.models import HpcCluster, HpcJob, JobStatus
from harness import FINAL, Hpcd, agent_pid, job_dir, wait_for, wait_status


@pytest.fixture
def namespaces():
    why = Namespaces.unavailable()
    if why:
        pytest.skip(why)
    with Namespaces() as made:
        yield made


def test_a_silent_cut_is_noticed_and_healed_without_losing_a_state(
        transactional_db, short_tmp, settings, namespaces):
    daemon = Hpcd(short_tmp, prefix=["ip", "netns", "exec", namespaces.a], extra_env={
        "HPC_WEBSOCKET_INTERFACE": "10.200.0.1", "HPC_WEBSOCKET_PORT": "8001",
        "HPC_AGENT_PING_SECONDS": "1", "HPC_AGENT_RESUME_GRACE_SECONDS": "120"})
    settings.HPC_IPC_UNIX_SOCKET = daemon.socket_path
    agent = agent_in_namespace(os.path.join(short_tmp, "agent"), namespaces.b)
    daemon.start()
    try:
        cluster = HpcCluster.objects.create(host_name="localhost", client_path=agent)
        cluster.try_connect()
        wait_for(cluster.is_connected, timeout=30, what="the agent across the veth")
        pid = agent_pid(agent)
        running = HpcJob.objects.create()
        running.submit({"script": "sleep 6; echo done > done.txt"})
        wait_status(running, JobStatus.RUNNING)

        namespaces.cut()
        wait_for(lambda: cluster.is_connected() is None, timeout=20,
                 what="hpcd to notice the cut")
        waiting = HpcJob.objects.create()
        assert waiting.submit({"script": "echo after"}) == JobStatus.PENDING
        wait_for(lambda: os.path.exists(os.path.join(job_dir(cluster, running), "done.txt")),
                 timeout=20, what="the job to end during the cut")
        running.refresh_from_db()
        assert running.status == JobStatus.RUNNING  # its end is in the agent's outbox

        namespaces.heal()
        wait_status(running, FINAL, timeout=60)
        assert running.status == JobStatus.COMPLETED
        wait_status(waiting, FINAL, timeout=30)
        assert waiting.status == JobStatus.COMPLETED
        assert agent_pid(agent) == pid, "the agent was relaunched instead of resuming"
    finally:
        daemon.stop()
        pid = agent_pid(agent)
        if pid:
            os.kill(pid, 9)
