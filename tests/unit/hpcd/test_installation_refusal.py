"""hpcd when an agent refuses its installation (issue 9 item 13): the refusal is
the cluster's status, and the agent is not relaunched until someone asks."""

from twisted.internet import defer
from twisted.internet.task import Clock

from hpcd.clusters import ClusterLink, ClusterManager


class RecordingStore:
    def __init__(self):
        self.states = []
        self.launches = 0

    def set_cluster_state(self, cluster_id, online, detail, resume_ttl=None):
        self.states.append((cluster_id, online, detail))
        return defer.succeed(None)

    def prepare_launch(self, cluster_id, ttl):
        self.launches += 1
        return defer.Deferred()  # a launch that never completes


class Settings:
    HPC_AGENT_RESUME_TOKEN_TTL_SECONDS = 3600.0
    HPC_TOKEN_TTL_SECONDS = 60


class Session:
    def __init__(self, refusal):
        self.cluster_id = 3
        self.refusal = refusal


def _online_manager():
    clock, store = Clock(), RecordingStore()
    manager = ClusterManager(clock, store, None, Settings(), lambda: "ws://x")
    link = manager.links[3] = ClusterLink(3, manager, clock, grace=15.0, connect_timeout=60.0,
                                          max_backoff=600.0)
    link.start()
    link.agent_connected()
    return clock, store, manager, link


def test_a_refusal_is_recorded_and_the_agent_is_not_relaunched():
    clock, store, manager, link = _online_manager()
    session = manager.sessions[3] = Session("this agent directory belongs to installation X; "
                                            "use another agent directory")
    manager.agent_lost(session)
    ((cluster_id, online, detail),) = store.states
    assert (cluster_id, online) == (3, False)
    assert "belongs to installation X; use another agent directory" in detail
    assert "Connect now" in detail
    clock.advance(3600)
    assert store.launches == 0
    manager.try_connect(3, False)
    assert store.launches == 1


def test_an_ordinary_loss_is_relaunched_after_the_grace_period():
    clock, store, manager, link = _online_manager()
    session = manager.sessions[3] = Session(None)
    manager.agent_lost(session)
    assert store.states == [(3, False, "agent connection lost")]
    clock.advance(16)
    assert store.launches == 1
