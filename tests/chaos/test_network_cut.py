"""A silent network cut between hpcd and an agent loses nothing.

hpcd and the agent run in two network namespaces joined by a veth pair
(10.200.0.1 and .2; INFRA.md), with a blackhole route for that range in the
root namespace so nothing can leave the machine.  Setting the agent's side
of the link down is a cut neither side is told about: only the websocket
pings notice it.
"""

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from djangoapp.models import HpcCluster, HpcJob, JobStatus
from harness import FINAL, Hpcd, agent_pid, job_dir, make_agent_dir, wait_for, wait_status

SUBNET = "10.200.0.0/24"


def ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@pytest.fixture
def namespaces():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    suffix = uuid.uuid4().hex[:6]
    a, b, va, vb = f"hpcA{suffix}", f"hpcB{suffix}", f"vA{suffix}", f"vB{suffix}"
    added_route = ip("route", "add", "blackhole", SUBNET, check=False).returncode == 0
    try:
        ip("netns", "add", a)
        ip("netns", "add", b)
        ip("link", "add", va, "type", "veth", "peer", "name", vb)
        ip("link", "set", va, "netns", a)
        ip("link", "set", vb, "netns", b)
        ip("-n", a, "addr", "add", "10.200.0.1/24", "dev", va)
        ip("-n", b, "addr", "add", "10.200.0.2/24", "dev", vb)
        for ns, dev in ((a, va), (b, vb)):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "up")
        yield {"a": a, "b": b, "vb": vb}
    finally:
        ip("netns", "del", a, check=False)
        ip("netns", "del", b, check=False)
        if added_route:
            ip("route", "del", "blackhole", SUBNET, check=False)


def agent_in_namespace(path, namespace):
    """An agent directory whose venv/bin/python runs this Python inside ``namespace``."""
    make_agent_dir(path, HPC_PING_SECONDS=1, HPC_RECONNECT_SECONDS=120)
    os.unlink(os.path.join(path, "venv"))
    os.makedirs(os.path.join(path, "venv", "bin"))
    wrapper = os.path.join(path, "venv", "bin", "python")
    with open(wrapper, "w") as f:
        f.write(f"#!/bin/sh\nexec ip netns exec {namespace} {sys.executable} \"$@\"\n")
    os.chmod(wrapper, 0o755)
    return path


def test_a_silent_cut_is_noticed_and_healed_without_losing_a_state(
        transactional_db, short_tmp, settings, namespaces):
    daemon = Hpcd(short_tmp, prefix=["ip", "netns", "exec", namespaces["a"]], extra_env={
        "HPC_WEBSOCKET_INTERFACE": "10.200.0.1", "HPC_WEBSOCKET_PORT": "8001",
        "HPC_AGENT_PING_SECONDS": "1", "HPC_AGENT_RESUME_GRACE_SECONDS": "120"})
    settings.HPC_IPC_UNIX_SOCKET = daemon.socket_path
    agent = agent_in_namespace(os.path.join(short_tmp, "agent"), namespaces["b"])
    daemon.start()
    try:
        cluster = HpcCluster.objects.create(host_name="localhost", client_path=agent)
        cluster.try_connect()
        wait_for(cluster.is_connected, timeout=30, what="the agent across the veth")
        pid = agent_pid(agent)
        running = HpcJob.objects.create()
        running.submit({"script": "sleep 6; echo done > done.txt"})
        wait_status(running, JobStatus.RUNNING)

        ip("-n", namespaces["b"], "link", "set", namespaces["vb"], "down")
        wait_for(lambda: cluster.is_connected() is None, timeout=20,
                 what="hpcd to notice the cut")
        waiting = HpcJob.objects.create()
        assert waiting.submit({"script": "echo after"}) == JobStatus.PENDING
        wait_for(lambda: os.path.exists(os.path.join(job_dir(cluster, running), "done.txt")),
                 timeout=20, what="the job to end during the cut")
        running.refresh_from_db()
        assert running.status == JobStatus.RUNNING  # its end is in the agent's outbox

        ip("-n", namespaces["b"], "link", "set", namespaces["vb"], "up")
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
