"""What hpcd does with websocket input no agent sends: broken frames, wrong
and replayed tokens, floods of unauthenticated connections, and fuzzed
control frames (issue 9, items 5 and 11, and the attack review's frames)."""

import json
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from djangoapp.models import WebsocketToken
from harness import RawWebsocket, wait_for
from hpc_agent import wire
from integration.spine.test_security import hello, raw_agent


def masked(first_byte, payload, mask=True, length=None):
    """One client frame, any first byte (FIN, RSV, opcode), any claimed length."""
    n = len(payload) if length is None else length
    if n < 126:
        head = bytes([first_byte, (0x80 if mask else 0) | n])
    elif n < 65536:
        head = bytes([first_byte, (0x80 if mask else 0) | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first_byte, (0x80 if mask else 0) | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def closed_by_hpcd(ws):
    """True once hpcd closes the connection (a close frame or EOF); a socket
    timeout (hpcd kept it open) is False."""
    try:
        while True:
            opcode, _ = ws.recv()
            if opcode == 0x8:
                return True
    except socket.timeout:
        return False
    except (ConnectionError, OSError):
        return True


BROKEN_FRAMES = {
    "reserved bits set": masked(0x80 | 0x40 | 0x1, b"{}"),
    "an unknown opcode": masked(0x80 | 0x3, b"x"),
    "a ping over 125 bytes": masked(0x80 | 0x9, b"p" * 200),
    "a fragmented ping": masked(0x9, b"p"),
    "an unmasked client frame": masked(0x80 | 0x1, b"{}", mask=False),
    "a continuation with nothing to continue": masked(0x80 | 0x0, b"x"),
    "a length of 2**62": masked(0x80 | 0x2, b"", length=2 ** 62),
    "a frame over the frame limit": masked(0x80 | 0x1, b"", length=wire.MAX_CONTROL_MESSAGE + 1),
}


def test_broken_frames_close_only_their_connection(hpcd, port, cluster):
    for what, frame in BROKEN_FRAMES.items():
        ws = raw_agent(port, cluster)
        ws.sock.sendall(frame)
        assert closed_by_hpcd(ws), what
        ws.close()


def test_wrong_replayed_and_garbage_tokens_are_refused(hpcd, port, cluster):
    _, agent_secret = WebsocketToken.objects.issue(cluster.pk, "agent", 60)
    assert RawWebsocket(port, "/file", f"Bearer {agent_secret}").status == 403
    for garbage in ("Bearer \x01\x02", "Bearer " + "é" * 30, "bearer  ", "Bearer a b c",
                    "Bearer " + "x" * 20000):
        try:
            status = RawWebsocket(port, "/agent", garbage).status
        except (ConnectionError, OSError):
            status = None  # cut off (an over-long handshake)
        assert status in (None, 400, 401, 403), (garbage[:20], status)
    # A resume token opens one connection, once.
    ws = RawWebsocket(port, "/agent", f"Bearer {agent_secret}")
    ws.send(hello())
    welcome = json.loads(ws.recv()[1])
    resume = welcome["resume_token"]
    ws.close()
    again = RawWebsocket(port, "/agent", f"Bearer {resume}")
    assert again.status == 101
    again.send(hello())
    assert json.loads(again.recv()[1])["type"] == "welcome"
    again.close()
    assert RawWebsocket(port, "/agent", f"Bearer {resume}").status == 403  # replayed
    assert RawWebsocket(port, "/agent", f"Bearer {agent_secret}").status == 403


def test_a_small_flood_of_idle_and_endless_connections_is_capped(hpcd, port):
    """More idle connections from one address than HPC_PREAUTH_MAX_PER_ADDRESS
    (64): the excess is closed at once; endless handshake headers are cut
    off; the refusals are counted, not logged one line each."""
    from djangoapp.conf import hpc_settings

    per_address, excess = int(hpc_settings.HPC_PREAUTH_MAX_PER_ADDRESS), 40
    held = []
    try:
        for _ in range(per_address + excess):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            held.append(s)
        closed = []
        for s in held[per_address:]:
            try:
                closed.append(s.recv(1) == b"")
            except (ConnectionError, OSError):
                closed.append(True)
        assert all(closed), closed
        endless = held[0]
        endless.sendall(b"GET /agent HTTP/1.1\r\n")
        with pytest.raises((ConnectionError, OSError)):
            for _ in range(100):
                endless.sendall(b"X-Padding: " + b"a" * 1000 + b"\r\n")
            if endless.recv(1) == b"":
                raise ConnectionError("closed")
    finally:
        for s in held:
            s.close()
    def logged():
        return [line for line in hpcd.log().splitlines()
                if "refused an agent connection" in line or "more like this" in line]

    # 41 refusals: a few lines a second (HPC_LOG_WARNINGS_PER_SECOND, 5) and
    # a count of the rest, not a line each.
    wait_for(lambda: any("more like this" in line for line in logged()),
             what="the count of suppressed refusals")
    assert len(logged()) < excess // 2, logged()
    # Freed: a new connection is admitted.
    wait_for(lambda: RawWebsocket(port, "/agent").status == 401, what="a slot to free")


# -- fuzzing ------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8)
FIELDS = ["id", "seq", "job", "status", "detail", "at", "scheduler_id", "ok", "result",
          "error", "message", "code", "size", "name", "protocol", "seqs", "sha256",
          "agent_version", "scheduler", "hostname", "nvx", "files", "next"]
TYPES = sorted(wire.FROM_AGENT | wire.FROM_HPCD | {"", "launch_missiles"})
CONTROL_FRAMES = st.one_of(
    st.builds(lambda kind, fields: ("text", json.dumps({"type": kind, **fields})),
              st.sampled_from(TYPES), st.dictionaries(st.sampled_from(FIELDS), JSON,
                                                      max_size=7)),
    st.builds(lambda data: ("text", data), st.text(max_size=300)),
    st.builds(lambda data: ("binary", data), st.binary(max_size=300)),
    st.builds(lambda data: ("raw text", data), st.binary(max_size=300)),
)


def test_fuzzed_control_frames_never_hurt_hpcd(hpcd, port, cluster):
    """Each frame goes over an authenticated agent connection; a ping then
    shows whether hpcd still serves it (else a new one is opened)."""
    state = {"ws": raw_agent(port, cluster), "reopened": 0}

    def alive(ws):
        try:
            ws.send(b"still?", opcode=0x9)
            while True:
                opcode, payload = ws.recv()
                if opcode == 0xA:
                    return True
                if opcode == 0x8:
                    return False
        except (ConnectionError, OSError):
            return False

    @settings(max_examples=80, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(CONTROL_FRAMES)
    def send(frame):
        kind, data = frame
        ws = state["ws"]
        try:
            # "raw text": bytes that may not be UTF-8 (the RFC has hpcd fail
            # the connection for that).
            ws.send(data, opcode=0x2 if kind == "binary" else 0x1)
        except (ConnectionError, OSError):
            pass  # closed meanwhile (a frame hpcd answers by closing)
        if not alive(ws):
            ws.close()
            state["ws"] = raw_agent(port, cluster)
            state["reopened"] += 1

    send()
    state["ws"].close()
    assert hpcd.process.poll() is None
