"""Fixtures shared by the whole suite: the real daemon and real agents."""

import os
import tempfile

import pytest

from harness import Hpcd, kill_agent, make_agent_dir


@pytest.fixture
def short_tmp():
    """A short temporary directory: Unix socket paths must stay under 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="hpc-") as path:
        yield path


@pytest.fixture
def hpcd(transactional_db, short_tmp, settings):
    """A running hpcd on the test database; Django in the test talks to it."""
    daemon = Hpcd(short_tmp)
    settings.HPC_IPC_UNIX_SOCKET = daemon.socket_path
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture
def agent_dir(short_tmp):
    """A localhost agent directory; its agent and jobs are killed afterwards."""
    made = []

    def make(name="agent", **settings):
        path = make_agent_dir(os.path.join(short_tmp, name), **settings)
        made.append(path)
        return path

    yield make
    for path in made:
        kill_agent(path)


@pytest.fixture
def local_cluster(hpcd, agent_dir):
    """A connected localhost cluster."""
    from djangoapp.models import HpcCluster
    from harness import wait_for

    cluster = HpcCluster.objects.create(host_name="localhost", client_path=agent_dir())
    cluster.try_connect()
    wait_for(cluster.is_connected, what="the agent to connect")
    return cluster
