"""The agent's link to hpcd: the machine (hpc_agent.link) and its wire side
(hpc_agent.connection), driven with a Clock and a recording collaborator."""

import pytest
from automat import NoTransition
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from hpc_agent import wire
from hpc_agent.connection import AgentClientProtocol, Link, _http_status
from hpc_agent.link import (DEFAULT_MAX_BACKOFF, FIRST_RETRY_SECONDS, REFUSAL_SECONDS,
                            LinkMachine)

RECONNECT = 600


class IO:
    """Records the machine's decisions."""

    def __init__(self):
        self.events = []

    def greet(self):
        self.events.append("greet")

    def ready(self):
        self.events.append("ready")

    def use_credential(self, token):
        self.events.append(("credential", token))

    def give_up(self, why):
        self.events.append(("give_up", why))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def io():
    return IO()


@pytest.fixture
def link(io, clock):
    machine = LinkMachine(io, clock, RECONNECT)
    machine.start()
    return machine


def gave_up(io):
    return [e[1] for e in io.events if isinstance(e, tuple) and e[0] == "give_up"]


def welcome(link, token="resume-1", grace=15.0):
    link.opened()
    link.welcomed(token, grace)


# -- the first connection ---------------------------------------------------------

def test_a_first_connection_greets_and_becomes_ready_on_welcome(link, io):
    link.opened()
    assert io.events == ["greet"]
    link.welcomed("resume-1", 15.0)
    assert io.events == ["greet", ("credential", "resume-1"), "ready"]


def test_a_launch_token_refused_on_the_very_first_attempt_gives_up_at_once(link, io, clock):
    link.credential_refused(403)
    (why,) = gave_up(io)
    assert "launch token" in why and "403" in why
    assert clock.getDelayedCalls() == []


def test_a_launch_token_that_timed_out_is_tried_again_not_given_up(link, io, clock):
    """Issue 8: hpcd took longer than the handshake timeout; the token is
    spent only by a completed handshake, so the retry works."""
    link.attempt_failed("WebSocket opening handshake timeout")
    link.attempt_failed("WebSocket opening handshake timeout")
    assert gave_up(io) == []
    welcome(link)
    assert "ready" in io.events


def test_nothing_working_for_the_reconnect_time_gives_up(link, io, clock):
    for _ in range(10):
        link.attempt_failed("connection refused")
        clock.advance(RECONNECT / 10 - 1)
    assert gave_up(io) == []
    clock.advance(10)
    (why,) = gave_up(io)
    assert "could not reach hpcd" in why


# -- after a welcome ----------------------------------------------------------------

def test_a_lost_connection_is_retried_with_the_resume_token_and_a_deadline(link, io, clock):
    welcome(link)
    link.lost(1006, "ping timeout")
    clock.advance(RECONNECT - 1)
    assert gave_up(io) == []
    welcome(link, "resume-2")
    clock.advance(RECONNECT * 2)
    assert gave_up(io) == []
    assert [e for e in io.events if isinstance(e, tuple)] == [
        ("credential", "resume-1"), ("credential", "resume-2")]


def test_a_refused_resume_is_tried_again_then_given_up(link, io, clock):
    """Issue 9: a SIGSTOPped hpcd spent the resume token on an abandoned
    handshake; one 403 made the agent exit at once."""
    welcome(link)
    link.lost(1006, "ping timeout")
    link.attempt_failed("handshake timeout")  # hpcd is stopped
    link.credential_refused(403)  # hpcd continued and spent the token
    clock.advance(REFUSAL_SECONDS / 2)
    link.credential_refused(403)
    assert gave_up(io) == []
    clock.advance(REFUSAL_SECONDS / 2)
    (why,) = gave_up(io)
    assert "kept refusing" in why


def test_a_refusal_followed_by_a_welcome_carries_on(link, io, clock):
    welcome(link)
    link.lost(1006, "gone")
    link.credential_refused(403)
    welcome(link, "resume-2")
    clock.advance(REFUSAL_SECONDS * 2)
    assert gave_up(io) == []


def test_a_timeout_after_a_refusal_is_not_counted_as_one(link, io, clock):
    welcome(link)
    link.lost(1006, "gone")
    link.credential_refused(403)
    link.attempt_failed("handshake timeout")  # hpcd stopped again
    clock.advance(REFUSAL_SECONDS * 2)
    assert gave_up(io) == []
    clock.advance(RECONNECT)
    assert len(gave_up(io)) == 1


@pytest.mark.parametrize("code", [wire.CLOSE_SUPERSEDED, wire.CLOSE_SHUTDOWN,
                                  wire.CLOSE_PROTOCOL])
def test_being_dismissed_gives_up_at_once(link, io, code):
    welcome(link)
    link.dismissed(code, "another agent serves this cluster")
    (why,) = gave_up(io)
    assert str(code) in why


def test_events_after_the_end_change_nothing(link, io, clock):
    link.credential_refused(403)
    link.stop()
    link.lost(1000, "closing")
    link.attempt_failed("late")
    clock.advance(RECONNECT * 2)
    assert len(gave_up(io)) == 1


def test_stop_cancels_every_timer(link, clock):
    link.attempt_failed("refused")
    link.stop()
    assert clock.getDelayedCalls() == []


def test_an_unexpected_event_raises_no_transition(link):
    with pytest.raises(NoTransition):
        link.welcomed("token", None)  # before any connection opened


# -- backoff ------------------------------------------------------------------------

def test_retries_back_off_exponentially_up_to_the_cap(link):
    delays = []
    for _ in range(8):
        link.attempt_failed("refused")
        delays.append(link.retry_delay())
    assert delays[:4] == [FIRST_RETRY_SECONDS * 2 ** i for i in range(4)]
    assert max(delays) == DEFAULT_MAX_BACKOFF


def test_the_backoff_cap_is_a_third_of_hpcds_grace_period(link):
    """Issue 12: the cap used to be hard-coded, with a comment saying it must
    stay below hpcd's HPC_AGENT_RESUME_GRACE_SECONDS."""
    welcome(link, grace=60.0)
    link.lost(1006, "gone")
    for _ in range(10):
        link.attempt_failed("refused")
    assert link.retry_delay() == 20.0
    welcome(link, grace=3.0)
    assert link.failures == 0
    link.lost(1006, "gone")
    for _ in range(10):
        link.attempt_failed("refused")
    assert link.retry_delay() == 1.0


def test_a_welcome_without_a_grace_period_keeps_the_default_cap(link):
    welcome(link, grace=None)
    link.lost(1006, "gone")
    for _ in range(10):
        link.attempt_failed("refused")
    assert link.retry_delay() == DEFAULT_MAX_BACKOFF


def test_handshake_failures_count_for_the_backoff(link):
    """ClientService counts a TCP connection whose handshake then fails as a
    success; the machine counts it as a failure."""
    for _ in range(4):
        link.attempt_failed("WebSocket opening handshake timeout")
    assert link.retry_delay() == FIRST_RETRY_SECONDS * 8


# -- the wire side ------------------------------------------------------------------

class Core:
    def __init__(self):
        self.events = []
        self.on_welcome = None

    def connected(self, send):
        self.events.append("connected")

    def ready(self):
        self.events.append("ready")

    def lost(self):
        self.events.append("lost")


@pytest.fixture
def reactor():
    return MemoryReactorClock()


def make_link(clock, **kwargs):
    core = Core()
    gave = []
    link = Link(clock, core, "ws://127.0.0.1:1", "launch-token", RECONNECT, None, gave.append,
                **kwargs)
    link.machine.start()
    return link, core, gave


def attempt(link, status_line=None):
    protocol = AgentClientProtocol()
    protocol.factory = link.factory
    if status_line is not None:
        protocol.refused_status = _http_status(status_line)
    return protocol


def test_the_handshake_timeout_is_a_setting_and_the_launch_token_is_presented(reactor):
    link, _, _ = make_link(reactor, handshake_timeout=15)
    assert link.factory.openHandshakeTimeout == 15
    assert link.factory.headers == {"Authorization": "Bearer launch-token"}


def test_a_403_status_line_is_a_refusal_and_a_timeout_is_not(reactor):
    link, core, gave = make_link(reactor)
    link.closed(attempt(link), 1006, "WebSocket opening handshake timeout")
    assert gave == []
    link.closed(attempt(link, "HTTP/1.1 403 Forbidden"), 1006, "upgrade failed")
    assert gave == [] and link.machine.failures == 2  # retried, for a while
    reactor.advance(REFUSAL_SECONDS)
    assert len(gave) == 1


def test_a_welcome_rotates_the_credential_and_a_close_code_dismisses(reactor):
    link, core, gave = make_link(reactor)
    protocol = attempt(link)
    link.opened(protocol)
    assert core.events == ["connected"]
    core.on_welcome("resume-1", 30.0)
    assert core.events == ["connected", "ready"]
    assert link.factory.headers == {"Authorization": "Bearer resume-1"}
    link.closed(protocol, wire.CLOSE_SUPERSEDED, "superseded")
    assert core.events[-1] == "lost" and len(gave) == 1


def test_the_agent_refusing_an_installation_closes_with_4005_and_exits(reactor):
    link, core, gave = make_link(reactor)
    protocol = attempt(link)
    closes = []
    protocol.sendClose = lambda code, reason: closes.append((code, reason))
    link.opened(protocol)
    core.on_refuse(wire.CLOSE_INSTALLATION, "this agent directory belongs to installation " +
                   "x" * 200)
    ((code, reason),) = closes
    assert code == 4005 and len(reason.encode()) <= 123
    # However the close ends (hpcd's echo may not arrive), the agent exits.
    link.closed(protocol, 1006, "connection lost")
    assert len(gave) == 1 and "belongs to installation" in gave[0]


def test_the_first_attempts_refusal_exits_promptly(reactor):
    link, core, gave = make_link(reactor)
    link.closed(attempt(link, "HTTP/1.1 401 Unauthorized"), 1006, "upgrade failed")
    assert len(gave) == 1 and "launch token" in gave[0]


@pytest.mark.parametrize("line,status", [("HTTP/1.1 403 Forbidden", 403),
                                         ("HTTP/1.1 401", 401), ("garbage", None), (None, None)])
def test_the_status_comes_from_the_parsed_status_line(line, status):
    assert _http_status(line) == status
