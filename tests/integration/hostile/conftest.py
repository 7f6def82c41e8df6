"""The hostile-input suite (issue 9): each test feeds hpcd or the agent input
no honest peer sends, and then a normal job must still run through on a real
agent, with hpcd alive and no traceback in its log.

The hand-driven agent and its cluster are the spine security tests' own
fixtures (tests/integration/spine/test_security.py), imported, not copied.
"""

import os

import pytest

from djangoapp.models import HpcJob, JobStatus
from harness import FINAL, wait_status
from integration.spine.test_security import cluster, hello, port, raw_agent  # noqa: F401


@pytest.fixture(autouse=True)
def still_serves(hpcd, local_cluster):
    """After the test: hpcd is alive, a normal job completes, and neither hpcd
    nor the real agent logged a traceback (one per input would flood a log)."""
    yield local_cluster
    assert hpcd.process.poll() is None, "hpcd died"
    job = HpcJob.objects.create(cluster=local_cluster)
    job.submit({"script": "echo still here > ok.txt"})
    wait_status(job, FINAL, timeout=30)
    assert job.status == JobStatus.COMPLETED, job.job_details
    assert "Traceback" not in hpcd.log(), hpcd.log()[-4000:]
    agent_log = _read(os.path.join(local_cluster.client_path, "log", "agent.log"))
    assert agent_log, "no agent log to check"
    assert "Traceback" not in agent_log, agent_log[-4000:]


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""
