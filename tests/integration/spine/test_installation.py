"""An agent directory serves one installation (issue 9 item 13), with the real
hpcd and real agents."""

import os

from djangoapp.models import HpcCluster, HpcInstallation, HpcJob, JobStatus
from harness import FINAL, agent_pid, wait_for, wait_status
from hpc_agent.state import AgentState

OTHER = "0b5e6c3a-9d1f-4c7e-8a2b-5f4e3d2c1b0a"


def bound_installation(path):
    state = AgentState(os.path.join(path, "state.sqlite3"))
    try:
        return state.get_meta(state.INSTALLATION)
    finally:
        state.close()


def test_an_agent_directory_of_another_installation_refuses_it_clearly(hpcd, agent_dir):
    path = agent_dir("theirs")
    state = AgentState(os.path.join(path, "state.sqlite3"))
    state.set_meta(state.INSTALLATION, OTHER)  # another installation's agent ran here
    state.close()
    cluster = HpcCluster.objects.create(host_name="localhost", client_path=path)
    cluster.try_connect()

    def refused():
        cluster.refresh_from_db()
        return OTHER in cluster.status_detail

    wait_for(refused, what="the refusal in the cluster's status")
    assert (f"this agent directory belongs to installation {OTHER}; use another agent "
            "directory") in cluster.status_detail
    assert not cluster.online and cluster.is_connected() is None
    wait_for(lambda: agent_pid(path) is None, what="the refusing agent to exit")
    assert bound_installation(path) == OTHER
    assert "refused to serve this installation" in hpcd.log()

    # A directory of this installation's own works as before, and is bound to it.
    ours = HpcCluster.objects.create(host_name="localhost", client_path=agent_dir("ours"))
    ours.try_connect()
    wait_for(ours.is_connected, what="the agent to connect")
    job = HpcJob.objects.create(cluster=ours)
    job.submit({"script": "echo hi"})
    wait_status(job, FINAL)
    assert job.status == JobStatus.COMPLETED, job.job_details
    assert bound_installation(ours.client_path) == str(HpcInstallation.current().installation_id)
