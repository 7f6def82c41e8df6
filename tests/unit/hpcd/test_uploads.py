"""A file's relay from Django to the agent (hpcd.uploads), driven with
StringTransports: the stream's framing, flow control, the checks at the end."""

import hashlib
import json
import struct

import pytest
from twisted.internet.testing import StringTransport

from djangoapp.protocol import UPLOAD_CHUNK_HEADER
from hpc_agent import wire
from hpcd.uploads import ChunkReader, DjangoSource, Upload

HEADER = struct.Struct(UPLOAD_CHUNK_HEADER)


def stream(*chunks):
    data = b"".join(HEADER.pack(len(c)) + c for c in chunks)
    return data + HEADER.pack(0) + hashlib.sha256(b"".join(chunks)).digest()


class Source:
    """The agent's /file websocket, as the upload sees it."""

    def __init__(self):
        self.transport = StringTransport()
        self.frames = []
        self.binary = []
        self.closed = []

    def send_frame(self, frame):
        self.frames.append(wire.decode(frame))

    def sendMessage(self, data, isBinary):
        assert isBinary
        self.binary.append(data)

    def sendClose(self, code=None, reason=None):
        self.closed.append((code, reason))


@pytest.fixture
def upload():
    outcomes = []
    u = Upload(token_id=1, max_size=1000, on_done=lambda t, outcome: outcomes.append(outcome))
    u.outcomes = outcomes
    u.source = Source()
    u.readies = []
    u.ready.addBoth(u.readies.append)
    return u


def connect_django(upload):
    source = DjangoSource(upload)
    source.makeConnection(StringTransport())
    return source


def answer(django):
    return json.loads(django.transport.value())


def test_the_reader_passes_pieces_on_as_they_come_and_ends_with_the_checksum():
    events = []
    reader = ChunkReader(lambda d: events.append(("data", d)),
                         lambda size, sha: events.append(("end", size, sha)), events.append)
    data = stream(b"hello", b"world!")
    for i in range(len(data)):  # one byte at a time: every boundary split
        reader.feed(data[i:i + 1])
    assert b"".join(e[1] for e in events if e[0] == "data") == b"helloworld!"
    assert events[-1] == ("end", 11, hashlib.sha256(b"helloworld!").hexdigest())


def test_the_reader_refuses_bytes_after_the_end():
    errors = []
    reader = ChunkReader(lambda d: None, lambda *a: None, errors.append)
    reader.feed(stream(b"x") + b"more")
    assert errors == ["bytes after the end of the upload"]


def test_an_upload_flows_once_the_agent_is_ready_and_ends_when_it_is_in_place(upload):
    upload.message(wire.encode("upload_ready"), False)
    assert upload.readies == [None]
    django = connect_django(upload)
    # Django's connection pauses whenever the agent's is full.
    assert upload.source.transport.producer is django.transport
    django.dataReceived(stream(b"abc", b"def"))
    assert b"".join(upload.source.binary) == b"abcdef"
    sha = hashlib.sha256(b"abcdef").hexdigest()
    assert upload.source.frames == [{"type": "upload_end", "size": 6, "sha256": sha}]
    assert upload.source.transport.producer is None
    assert django.transport.value() == b""  # not before the agent says it is in place
    upload.message(wire.encode("upload_done", size=6, sha256=sha, mtime=1.5), False)
    assert answer(django) == {"ok": True, "size": 6, "sha256": sha, "mtime": 1.5}
    assert django.transport.disconnecting
    assert upload.outcomes == ["ok"]


def test_the_agent_refusing_to_write_reaches_django_with_its_reason(upload):
    upload.message(wire.encode("upload_ready"), False)
    django = connect_django(upload)
    django.dataReceived(stream(b"abc")[:10])
    upload.message(wire.encode("file_error", message="No space left on device"), False)
    reply = answer(django)
    assert reply["ok"] is False and "No space left" in reply["message"]
    assert upload.source.closed and upload.outcomes == ["failed"]


def test_more_than_the_limit_is_too_large(upload):
    upload.message(wire.encode("upload_ready"), False)
    django = connect_django(upload)
    django.dataReceived(stream(b"x" * 1001))
    assert answer(django)["error"] == "TOO_LARGE"
    assert len(b"".join(upload.source.binary)) <= 1000
    assert upload.source.closed


def test_a_checksum_that_does_not_match_what_arrived_puts_nothing_in_place(upload):
    upload.message(wire.encode("upload_ready"), False)
    django = connect_django(upload)
    django.dataReceived(HEADER.pack(3) + b"abc" + HEADER.pack(0) + b"\0" * 32)
    assert answer(django)["ok"] is False
    assert upload.source.frames == []  # no upload_end: the agent drops its file
    assert upload.source.closed


def test_django_going_away_midway_closes_the_agents_connection(upload):
    upload.message(wire.encode("upload_ready"), False)
    django = connect_django(upload)
    django.dataReceived(stream(b"abc")[:6])
    django.connectionLost(None)
    assert upload.source.closed and upload.outcomes == ["failed"]


def test_the_agent_going_away_before_it_is_ready_fails_the_request(upload):
    upload.source_lost()
    assert upload.readies[0].check(Exception)
    assert upload.outcomes == ["failed"]
