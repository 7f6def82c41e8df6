"""The websocket protocol in front of AgentSession (hpcd.agents): a token is
checked before the upgrade and spent only by the agent's first frame, and
unauthenticated connections are capped.  Driven over StringTransport with
txaio on a Clock: no network."""

import base64
import os
import struct

import pytest
import txaio
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from txaio.testutil import replace_loop

from hpc_agent import wire
from hpcd import agents

txaio.use_twisted()

CLAIM = {"token_id": 7, "cluster_id": 3, "purpose": "agent"}


class Settings:
    HPC_AGENT_PING_SECONDS = 10.0
    HPC_HANDSHAKE_TIMEOUT_SECONDS = 15.0
    HPC_PREAUTH_MAX_CONNECTIONS = 4
    HPC_PREAUTH_MAX_PER_ADDRESS = 2
    HPC_AGENT_REQUEST_TIMEOUT = 5.0
    HPC_AGENT_RESUME_GRACE_SECONDS = 15.0


class Store:
    def __init__(self):
        self.valid = {"good": CLAIM}
        self.spent = []
        self.claims = []  # Deferreds the test fires

    def check_token(self, secret, purposes):
        return defer.succeed(self.valid.get(secret))

    def claim_token(self, secret, purposes):
        d = defer.Deferred()
        self.claims.append((secret, d))
        return d

    def welcome(self, cluster_id):
        return defer.succeed(("5f0c6f4e-0000-4000-8000-000000000001", (99, "resume-secret")))

    def apply_updates(self, cluster_id, updates):
        return defer.succeed([u["seq"] for u in updates])


class Clusters:
    def __init__(self):
        self.events = []

    def agent_hello(self, session):
        self.events.append("hello")
        return defer.succeed(None)

    def agent_ready(self, session):
        self.events.append("ready")
        return defer.succeed(None)

    def agent_lost(self, session):
        self.events.append("lost")


class Transfers:
    def __init__(self):
        self.frames = []

    def connected(self, source, claim):
        frames = self.frames

        class Handler:
            def message(self, payload, is_binary):
                frames.append((payload, is_binary))

            def lost(self, code, reason):
                frames.append("lost")

        return Handler()


class Daemon:
    def __init__(self, clock):
        self.settings = Settings()
        self.store = Store()
        self.clusters = Clusters()
        self.transfers = Transfers()
        self.reactor = clock


@pytest.fixture
def clock():
    clock = Clock()
    with replace_loop(clock):
        yield clock


@pytest.fixture
def daemon(clock):
    return Daemon(clock)


@pytest.fixture
def factory(daemon):
    return agents.server_factory(daemon, "ws://localhost")


def connect(factory, host="10.0.0.1", port=40000):
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    protocol.makeConnection(transport)
    return protocol, transport


def handshake(path="/agent", token="good"):
    key = base64.b64encode(os.urandom(16)).decode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{auth}\r\n").encode()


def frame(payload, opcode=0x1):
    """A masked client frame, as an agent sends it."""
    mask = os.urandom(4)
    n = len(payload)
    header = bytes([0x80 | opcode])
    if n < 126:
        header += bytes([0x80 | n])
    elif n < 65536:
        header += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        header += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def status(transport):
    head = transport.value().split(b"\r\n", 1)[0]
    return int(head.split()[1]) if head else None


def hello():
    return wire.encode("hello", protocol=wire.PROTOCOL_VERSION, agent_version="1",
                       scheduler="x", hostname="h", nvx=True)


def test_a_valid_token_upgrades_without_being_spent(factory, daemon):
    protocol, transport = connect(factory)
    protocol.dataReceived(handshake())
    assert status(transport) == 101
    assert daemon.store.claims == []  # checked, not spent
    assert protocol.handler is None


def test_an_invalid_token_is_refused_before_the_upgrade(factory, daemon):
    protocol, transport = connect(factory)
    protocol.dataReceived(handshake(token="forged"))
    assert status(transport) == 403
    assert daemon.store.claims == []
    assert factory.limits.refused["invalid, used or expired token"] == 1


def test_the_first_frame_spends_the_token_and_frames_wait_for_it(factory, daemon):
    protocol, transport = connect(factory)
    protocol.dataReceived(handshake())
    transport.clear()
    protocol.dataReceived(frame(hello()))
    assert [s for s, _ in daemon.store.claims] == ["good"]
    assert transport.producerState == "paused"  # the agent is held meanwhile
    assert daemon.clusters.events == []
    daemon.store.claims[0][1].callback(CLAIM)
    assert daemon.clusters.events == ["hello", "ready"]
    assert protocol.handler.ready and protocol.claim == CLAIM
    assert transport.producerState == "producing"
    assert factory.limits.count == 0  # authenticated: no longer counted


def test_a_token_spent_meanwhile_by_another_connection_closes_this_one(factory, daemon):
    protocol, transport = connect(factory)
    protocol.dataReceived(handshake())
    protocol.dataReceived(frame(hello()))
    transport.clear()
    daemon.store.claims[0][1].callback(None)
    assert protocol.handler is None
    # A close frame with code 4004.
    data = transport.value()
    assert data[0] == 0x88 and struct.unpack("!H", data[2:4])[0] == agents.CLOSE_TOKEN_SPENT


def test_a_handshake_abandoned_before_any_frame_never_spends_the_token(factory, daemon):
    protocol, transport = connect(factory)
    protocol.dataReceived(handshake())
    protocol.connectionLost(Failure(ConnectionDone("the agent gave up")))
    assert daemon.store.claims == []
    assert factory.limits.count == 0


def test_a_transfer_spends_its_token_with_its_header_and_then_streams(factory, daemon):
    daemon.store.valid["file-token"] = dict(CLAIM, purpose="file")
    protocol, transport = connect(factory)
    protocol.dataReceived(handshake(path="/file", token="file-token"))
    header = wire.encode("file_header", size=3, name="x")
    protocol.dataReceived(frame(header) + frame(b"abc", opcode=0x2))
    assert daemon.transfers.frames == []
    daemon.store.claims[0][1].callback(dict(CLAIM, purpose="file"))
    assert daemon.transfers.frames == [(header, False), (b"abc", True)]


def test_unauthenticated_connections_are_capped_per_address_and_in_all(factory):
    held = [connect(factory, host="10.0.0.1", port=p) for p in (1, 2)]
    _, refused = connect(factory, host="10.0.0.1", port=3)
    assert refused.disconnecting and factory.limits.count == 2
    held += [connect(factory, host=f"10.0.0.{i}") for i in (2, 3)]
    _, refused = connect(factory, host="10.0.0.9")
    assert refused.disconnecting and factory.limits.count == 4
    assert all(not t.disconnecting for _, t in held)
    held[0][0].connectionLost(Failure(ConnectionDone("gone")))
    assert factory.limits.count == 3
    _, admitted = connect(factory, host="10.0.0.9")
    assert not admitted.disconnecting


def test_an_endless_handshake_header_is_cut_off(factory):
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET /agent HTTP/1.1\r\n")
    for _ in range(40):
        if transport.disconnecting:
            break
        protocol.dataReceived(b"X-Padding: " + b"a" * 1000 + b"\r\n")
    assert transport.disconnecting and len(protocol.data) <= agents.MAX_HANDSHAKE_BYTES
    assert factory.limits.refused["handshake over 16 KiB"] == 1


def test_each_refusal_is_a_counted_log_event(factory):
    """One event per refused connection, with its reason: /metrics counts them
    and hpcd's log observer (hpcd.logs) keeps a flood to a few lines."""
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for _ in range(3):
            connect(factory, host="10.0.0.1")
    finally:
        globalLogPublisher.removeObserver(events.append)
    refusals = [e["reason"] for e in events if e.get("hpc_event") == "connection_refused"]
    assert refusals == ["too many unauthenticated connections from one address"]
    assert factory.limits.refused == {refusals[0]: 1}


def test_a_connection_lost_during_the_token_check_never_opens(factory, daemon, clock):
    """The agent leaves (or its handshake times out) while the token is being
    checked.  Autobahn would complete the handshake on the dead connection
    when the check answers, and its ping timeout, 40 s later, then failed
    inside txaio's timer bucket ("Error(s) processing call_later bucket",
    logged as critical by the reactor)."""
    pending = defer.Deferred()
    daemon.store.check_token = lambda secret, purposes: pending
    protocol, transport = connect(factory)
    protocol.dataReceived(handshake())
    protocol.connectionLost(Failure(ConnectionDone("the agent gave up")))
    # A closed TCP transport ignores this; StringTransport raises.
    transport.unregisterProducer = lambda: None
    pending.callback(CLAIM)
    assert protocol.state == protocol.STATE_CLOSED
    ping = Settings.HPC_AGENT_PING_SECONDS
    for _ in range(6):
        clock.advance(ping)  # raised RuntimeError from the bucket before the fix
    assert factory.limits.count == 0
