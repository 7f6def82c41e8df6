"""When hpcd launches a cluster's agent: the ClusterLink machine (hpcd.clusters),
driven with a recording manager and a Clock."""

import pytest
from twisted.internet.task import Clock

from hpcd import clusters
from hpcd.clusters import ClusterLink

GRACE, CONNECT_TIMEOUT, MAX_BACKOFF = 15.0, 60.0, 600.0


class RecordingManager:
    def __init__(self, clock):
        self.clock = clock
        self.events = []

    def launch(self, link):
        self.events.append(("launch", self.clock.seconds()))

    def report(self, link, detail):
        self.events.append(("report", self.clock.seconds(), detail))

    FAKE_ONLY = ("launches", "reports")

    def launches(self):
        return [e[1] for e in self.events if e[0] == "launch"]

    def reports(self):
        return [e for e in self.events if e[0] == "report"]


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def manager(clock):
    return RecordingManager(clock)


@pytest.fixture
def link(clock, manager):
    return ClusterLink(3, manager, clock, grace=GRACE, connect_timeout=CONNECT_TIMEOUT,
                       max_backoff=MAX_BACKOFF)


def timer_delay(link, clock):
    """Seconds until the link's pending timer fires (the only delayed call)."""
    (call,) = clock.getDelayedCalls()
    return call.getTime() - clock.seconds()


def fail_launch(link, clock, how):
    """Bring a launching link to a failure: the command fails, or the agent never connects."""
    if how == "command":
        link.launch_failed("ssh: connection refused")
    else:
        link.launch_succeeded()
        clock.advance(CONNECT_TIMEOUT)


def test_start_waits_the_grace_period_then_launches(link, clock, manager):
    link.start()
    clock.advance(GRACE - 0.1)
    assert manager.events == []
    clock.advance(0.1)
    assert manager.events == [("launch", GRACE)]


def test_an_agent_coming_back_during_the_grace_period_is_not_relaunched(link, clock, manager):
    link.start()
    clock.advance(5)
    link.agent_connected()
    clock.advance(1000)
    assert manager.events == [] and clock.getDelayedCalls() == []


def test_a_launched_agent_that_never_connects_is_reported_and_retried(link, clock, manager):
    link.start()
    clock.advance(GRACE)
    link.launch_succeeded()
    clock.advance(CONNECT_TIMEOUT - 0.1)
    assert manager.reports() == []
    clock.advance(0.1)
    (report,) = manager.reports()
    assert "did not connect within 60 s" in report[2] and "attempt 1" in report[2]
    delay = timer_delay(link, clock)
    assert 2 * 0.8 <= delay <= 2 * 1.2
    clock.advance(delay)
    assert manager.launches() == [GRACE, GRACE + CONNECT_TIMEOUT + delay]


@pytest.mark.parametrize("how", ["command", "timeout"])
def test_backoff_grows_exponentially_within_the_jitter_and_is_capped(link, clock, how):
    link.relaunch_requested()
    delays = []
    for _ in range(12):
        fail_launch(link, clock, how)
        delays.append(timer_delay(link, clock))
        clock.advance(delays[-1])  # the next launch
    assert link.failures == 12
    for n, delay in enumerate(delays, 1):
        base = min(MAX_BACKOFF, 2.0 * 2 ** (n - 1))
        assert 0.8 * base <= delay <= 1.2 * base, (n, delay)
    assert delays[6] > delays[1] * 8  # it grows (2 s vs 64 s nominal)
    assert max(delays) <= 1.2 * MAX_BACKOFF


def test_failure_reports_name_the_reason_and_the_attempt(link, clock, manager):
    link.relaunch_requested()
    link.launch_failed("ssh: connection refused")
    (report,) = manager.reports()
    assert report[2].startswith("ssh: connection refused; retrying in ")
    assert report[2].endswith("(attempt 1)")


def test_no_pause_exceeds_the_maximum_backoff(link, clock, monkeypatch):
    monkeypatch.setattr(clusters.random, "uniform", lambda a, b: b)  # the worst jitter
    link.relaunch_requested()
    link.failures = 20
    link.launch_failed("down")
    assert timer_delay(link, clock) <= MAX_BACKOFF


def test_backoff_keeps_working_after_very_many_failures(link, clock, manager):
    link.relaunch_requested()
    link.failures = 1100
    link.launch_failed("down")
    assert timer_delay(link, clock) <= 1.2 * MAX_BACKOFF


def test_a_connection_resets_the_failure_count(link, clock, manager):
    link.relaunch_requested()
    for _ in range(4):
        link.launch_failed("down")
        clock.advance(timer_delay(link, clock))
    assert link.failures == 4
    link.launch_succeeded()
    link.agent_connected()
    assert link.failures == 0 and clock.getDelayedCalls() == []
    link.agent_lost()
    clock.advance(GRACE)
    link.launch_failed("down again")
    assert manager.reports()[-1][2].endswith("(attempt 1)")
    assert 1.6 <= timer_delay(link, clock) <= 2.4


def test_a_lost_agent_gets_the_grace_period_then_a_launch(link, clock, manager):
    link.agent_connected()
    link.agent_lost()
    clock.advance(GRACE - 1)
    assert manager.launches() == []
    clock.advance(1)
    assert manager.launches() == [GRACE]


def test_an_agent_connecting_before_its_launch_command_returns_is_online(link, clock, manager):
    link.relaunch_requested()
    link.agent_connected()
    link.launch_succeeded()  # late: changes nothing
    clock.advance(10 * CONNECT_TIMEOUT)
    assert manager.reports() == [] and len(manager.launches()) == 1


def test_connect_requested_while_online_does_nothing(link, clock, manager):
    link.agent_connected()
    link.connect_requested()
    clock.advance(1000)
    assert manager.events == []


def test_relaunch_requested_while_online_launches(link, clock, manager):
    link.agent_connected()
    link.relaunch_requested()
    assert manager.launches() == [0]


def test_connect_requested_skips_the_grace_period_and_the_backoff(link, clock, manager):
    link.start()
    link.connect_requested()
    assert manager.launches() == [0]
    link.launch_failed("down")
    clock.advance(1)
    link.connect_requested()
    assert manager.launches() == [0, 1]
    assert clock.getDelayedCalls() == []  # the backoff timer was cancelled


def test_repeated_requests_while_launching_launch_only_once(link, clock, manager):
    link.connect_requested()
    link.connect_requested()
    link.relaunch_requested()
    link.launch_succeeded()
    link.connect_requested()
    assert manager.launches() == [0]


def test_stop_cancels_every_timer(link, clock, manager):
    for begin in (link.start, lambda: (link.relaunch_requested(), link.launch_failed("x")),
                  lambda: (link.relaunch_requested(), link.launch_succeeded())):
        begin()
        assert clock.getDelayedCalls() != []
        link.stop()
        assert clock.getDelayedCalls() == []
    clock.advance(10_000)
    assert len(manager.launches()) == 2


@pytest.mark.parametrize("late", ["launch_succeeded", "launch_failed", "agent_lost"])
def test_late_events_after_stop_are_ignored_without_raising(link, clock, manager, late):
    link.relaunch_requested()
    link.stop()
    args = ("too late",) if late == "launch_failed" else ()
    getattr(link, late)(*args)
    clock.advance(10_000)
    assert manager.launches() == [0] and manager.reports() == []
    link.start()  # and it can start again
    clock.advance(GRACE)
    assert manager.launches() == [0, 10_000 + GRACE]


@pytest.mark.parametrize("late", ["launch_succeeded", "launch_failed"])
def test_late_launch_results_in_other_states_change_nothing(link, clock, manager, late):
    args = ("x",) if late == "launch_failed" else ()
    link.start()  # waiting
    getattr(link, late)(*args)
    assert manager.reports() == []
    clock.advance(GRACE)
    assert manager.launches() == [GRACE]
