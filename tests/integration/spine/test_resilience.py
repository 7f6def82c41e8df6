"""Nothing is lost when hpcd, the agent or the connection goes away."""

import os
import signal

import pytest

from djangoapp.models import HpcCluster, HpcJob, JobStatus
from harness import (FINAL, Hpcd, agent_pid, job_dir, kill_agent, listening_socket, wait_for,
                     wait_status)


@pytest.fixture
def restartable(transactional_db, short_tmp, settings):
    """An hpcd handed one listening socket, so a restarted one is where agents expect it."""
    # The grace outlasts the agent's longest reconnect pause (8 s + 1 s jitter) with room.
    env = {"HPC_AGENT_RESUME_GRACE_SECONDS": "20"}
    with listening_socket() as sock:
        daemon = Hpcd(short_tmp, extra_env=env, websocket=sock)
        settings.HPC_IPC_UNIX_SOCKET = daemon.socket_path
        yield daemon
        daemon.stop()


def connected_cluster(agent_dir):
    cluster = HpcCluster.objects.create(host_name="localhost", client_path=agent_dir())
    cluster.try_connect()
    wait_for(cluster.is_connected, what="the agent to connect")
    return cluster


def test_submit_while_hpcd_is_down_waits_and_runs_once(restartable, agent_dir):
    cluster = HpcCluster.objects.create(host_name="localhost", client_path=agent_dir())
    assert cluster.is_connected() is None  # hpcd down: not connected, no exception
    job = HpcJob.objects.create()
    assert job.submit({"script": "echo run >> runs.txt"}) == JobStatus.PENDING
    restartable.start()
    # hpcd first gives a (never launched) agent its grace period, then launches.
    wait_status(job, FINAL, timeout=60)
    assert job.status == JobStatus.COMPLETED
    with open(os.path.join(job_dir(cluster, job), "runs.txt")) as f:
        assert f.read() == "run\n"


def test_is_connected_learns_at_once_that_hpcd_was_killed(restartable, agent_dir):
    """Django keeps hpcd's answer while the sessions stamp reads the same; a
    killed hpcd leaves its stamp file behind, but not its lock."""
    restartable.start()
    cluster = connected_cluster(agent_dir)
    assert cluster.is_connected() and cluster.is_connected()  # the second one kept
    assert os.path.exists(restartable.socket_path + ".stamp")
    restartable.stop(signal.SIGKILL)
    assert os.path.exists(restartable.socket_path + ".stamp")
    assert cluster.is_connected() is None
    restartable.start()
    wait_for(cluster.is_connected, timeout=20, what="the agent back with the new hpcd")
    kill_agent(cluster.client_path)
    wait_for(lambda: cluster.is_connected() is None, timeout=10, what="hpcd to notice")
    restartable.stop()
    assert not os.path.exists(restartable.socket_path + ".stamp")


def test_an_hpcd_restart_needs_no_relaunch_and_loses_no_state(restartable, agent_dir):
    restartable.start()
    cluster = connected_cluster(agent_dir)
    pid = agent_pid(cluster.client_path)
    job = HpcJob.objects.create()
    job.submit({"script": "sleep 2; echo done > out.txt"})
    wait_status(job, JobStatus.RUNNING)
    restartable.stop()
    # The job ends while hpcd is down; its end waits in the agent's outbox.
    wait_for(lambda: os.path.exists(os.path.join(job_dir(cluster, job), "out.txt")),
             timeout=10)
    restartable.start()
    wait_status(job, FINAL, timeout=30)
    assert job.status == JobStatus.COMPLETED
    wait_for(cluster.is_connected, timeout=20)
    assert agent_pid(cluster.client_path) == pid, "the agent was relaunched, not resumed"
    cluster.refresh_from_db()
    assert cluster.online


def test_a_killed_agent_is_relaunched_and_its_jobs_finish(hpcd, agent_dir):
    cluster = connected_cluster(agent_dir)
    pid = agent_pid(cluster.client_path)
    job = HpcJob.objects.create()
    job.submit({"script": "sleep 3"})
    wait_status(job, JobStatus.RUNNING)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: cluster.is_connected() is None, timeout=10, what="hpcd to notice")
    wait_status(job, FINAL, timeout=40)
    assert job.status == JobStatus.COMPLETED
    new_pid = wait_for(lambda: agent_pid(cluster.client_path), timeout=10)
    assert new_pid != pid


def test_a_forced_connect_replaces_the_agent_and_keeps_its_jobs(hpcd, agent_dir):
    cluster = connected_cluster(agent_dir)
    old_pid = agent_pid(cluster.client_path)
    old_token = cluster.is_connected()
    job = HpcJob.objects.create()
    job.submit({"script": "sleep 2; echo run >> runs.txt"})
    wait_status(job, JobStatus.RUNNING)
    cluster.try_connect(force=True)
    wait_for(lambda: (cluster.is_connected() or old_token).pk != old_token.pk, timeout=20,
             what="the new agent's connection")
    assert not os.path.exists(f"/proc/{old_pid}") or agent_pid(cluster.client_path) != old_pid
    wait_status(job, FINAL, timeout=30)
    assert job.status == JobStatus.COMPLETED
    with open(os.path.join(job_dir(cluster, job), "runs.txt")) as f:
        assert f.read() == "run\n"


def test_a_custom_job_class_is_the_one_hpcd_loads(transactional_db, short_tmp, settings,
                                                  agent_dir):
    from testjobs.models import LabeledJob

    settings.HPC_JOB_CLASS = "testjobs.models.LabeledJob"
    daemon = Hpcd(short_tmp, extra_env={"HPC_JOB_CLASS": "testjobs.models.LabeledJob"})
    settings.HPC_IPC_UNIX_SOCKET = daemon.socket_path
    cluster = HpcCluster.objects.create(host_name="localhost", client_path=agent_dir())
    job = LabeledJob.objects.create(label="mine")
    # hpcd is down and nothing is online: the subclass's choose_cluster still picks.
    job.submit({"script": "echo hi"})
    assert job.cluster_id == cluster.pk
    daemon.start()
    try:
        wait_status(job, FINAL, timeout=30)
        assert job.status == JobStatus.COMPLETED
        # hpcd called the subclass's hook for each state the agent reported.
        wait_for(lambda: LabeledJob.objects.get(pk=job.pk).label.endswith(">COMPLETED"))
        assert LabeledJob.objects.get(pk=job.pk).label == "mine>SUBMITTED>RUNNING>COMPLETED"
    finally:
        daemon.stop()


def test_send_message_uses_the_tokens_live_connection(hpcd, agent_dir):
    from djangoapp.ipc import HpcdError

    cluster = connected_cluster(agent_dir)
    token = cluster.is_connected()
    token.send_message({"type": "ack", "seqs": []})
    with pytest.raises(HpcdError, match="not a valid wire message"):
        token.send_message({"type": "ack", "seqs": "all"})
    old = type(token).objects.issue(cluster.pk, "agent", 60)[0]
    with pytest.raises(HpcdError, match="no live connection"):
        old.send_message({"type": "ack", "seqs": []})
