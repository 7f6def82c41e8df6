"""The fakes the hpcd unit tests use match the classes they stand in for."""

import importlib.util
import os

import pytest

from fakes import mismatches
from hpcd.agents import AgentServerProtocol
from hpcd.clusters import ClusterManager
from hpcd.store import Store


def _load(module):
    path = os.path.join(os.path.dirname(__file__), f"{module}.py")
    spec = importlib.util.spec_from_file_location(f"_fakes_{module}", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


@pytest.mark.parametrize("module, fake, real", [
    ("test_agent_session", "FakeStore", Store),
    ("test_agent_session", "FakeClusters", ClusterManager),
    ("test_agent_session", "FakeProtocol", AgentServerProtocol),
    ("test_cluster_link", "RecordingManager", ClusterManager),
])
def test_fake_matches_the_real_class(module, fake, real):
    assert mismatches(getattr(_load(module), fake), real) == []


def test_the_check_catches_a_drifted_fake():
    class Drifted:
        def apply_updates(self, cluster, batch):  # renamed parameters
            pass

        def store_everything(self):  # no such method
            pass

    assert len(mismatches(Drifted, Store)) == 2
