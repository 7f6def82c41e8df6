"""A file's relay from the agent to Django (hpcd.transfers.Transfer), driven
with StringTransports and a Clock: the flow-control order first."""

import hashlib
import zlib

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from djangoapp.protocol import TRAILER_OK, AgentError
from hpc_agent import wire
from hpcd.transfers import Sink, Transfer


class Source:
    """The agent's /file websocket, as the transfer sees it."""

    def __init__(self):
        self.transport = StringTransport()
        self.frames = []
        self.closed = []

    def send_frame(self, frame):
        self.frames.append(wire.decode(frame))

    def sendClose(self, code=None, reason=None):
        self.closed.append((code, reason))


@pytest.fixture
def transfer():
    t = Transfer(token_id=1, reactor=Clock(), timeout=30)
    t.source = Source()
    t.headers = []
    t.header.addBoth(t.headers.append)
    return t


def header(size=6, name="out.txt", checksum="crc32"):
    if checksum is None:  # an agent from before the header named its checksum
        return wire.encode("file_header", size=size, name=name)
    return wire.encode("file_header", size=size, name=name, checksum=checksum)


def end(data):
    return wire.encode("file_end", size=len(data), crc32=zlib.crc32(data))


def connect_sink(transfer):
    sink = Sink(transfer)
    sink.makeConnection(StringTransport())
    return sink.transport


def trailer(data):
    return TRAILER_OK + zlib.crc32(data).to_bytes(4, "big") + bytes(28)


def test_the_header_answers_django_and_holds_the_agent_until_django_connects(transfer):
    transfer.message(header(), False)
    assert transfer.headers == [(6, "out.txt")]
    assert transfer.source.transport.producerState == "paused"
    transfer.message(b"abc", True)  # already in flight: kept
    sink = connect_sink(transfer)
    assert sink.value() == b"abc"
    assert sink.producer is transfer.source.transport and sink.streaming
    assert transfer.source.transport.producerState == "producing"
    transfer.message(b"def", True)
    assert sink.value() == b"abcdef"
    transfer.message(end(b"abcdef"), False)
    assert transfer.source.frames == [{"type": "file_done", "size": 6}]
    assert sink.value() == b"abcdef" + trailer(b"abcdef")
    assert sink.producer is None and sink.disconnecting


def test_a_file_complete_before_django_connects_is_delivered_whole(transfer):
    transfer.message(header(3), False)
    transfer.message(b"abc", True)
    transfer.message(end(b"abc"), False)
    assert transfer.source.frames == [{"type": "file_done", "size": 3}]
    transfer.source_lost()  # the agent closes after file_done: fine
    sink = connect_sink(transfer)
    assert sink.value() == b"abc" + trailer(b"abc") and sink.disconnecting


def test_a_checksum_mismatch_after_the_last_byte_cuts_django_off(transfer):
    transfer.message(header(3), False)
    sink = connect_sink(transfer)
    transfer.message(b"abc", True)
    transfer.message(wire.encode("file_end", size=3, crc32=zlib.crc32(b"abd")), False)
    assert sink.value() == b"abc"  # no trailer
    assert sink.disconnected or sink.disconnecting
    assert transfer.source.frames == [] and transfer.source.closed


def test_an_end_without_the_checksum_its_header_named_cuts_django_off(transfer):
    transfer.message(header(3), False)
    sink = connect_sink(transfer)
    transfer.message(b"abc", True)
    transfer.message(wire.encode("file_end", size=3, sha256=hashlib.sha256(b"abc").hexdigest()),
                     False)
    assert sink.value() == b"abc" and (sink.disconnected or sink.disconnecting)


def test_an_older_agents_sha256_is_checked_and_passed_on(transfer):
    transfer.message(header(3, checksum=None), False)
    sink = connect_sink(transfer)
    transfer.message(b"abc", True)
    transfer.message(wire.encode("file_end", size=3, sha256=hashlib.sha256(b"abc").hexdigest()),
                     False)
    assert sink.value() == b"abc" + TRAILER_OK + hashlib.sha256(b"abc").digest()
    assert transfer.source.frames == [{"type": "file_done", "size": 3}]


def test_an_older_agents_sha256_mismatch_cuts_django_off(transfer):
    transfer.message(header(3, checksum=None), False)
    sink = connect_sink(transfer)
    transfer.message(b"abc", True)
    transfer.message(wire.encode("file_end", size=3, sha256="0" * 64), False)
    assert sink.value() == b"abc" and (sink.disconnected or sink.disconnecting)


def test_an_end_before_any_header_fails_the_fetch(transfer):
    transfer.message(end(b""), False)
    assert transfer.headers[0].check(AgentError)


def test_more_bytes_than_announced_fail_the_transfer(transfer):
    transfer.message(header(2), False)
    sink = connect_sink(transfer)
    transfer.message(b"abc", True)
    assert sink.value() == b"" and transfer.source.closed


@pytest.mark.parametrize("bad", [header(size=-5), header(size=2 ** 60), header(name=""),
                                 header(name="../x"), header(name="a\0b"),
                                 header(checksum="md5")])
def test_an_impossible_header_fails_the_fetch(transfer, bad):
    transfer.message(bad, False)
    (failure,) = transfer.headers
    assert failure.check(AgentError)
    assert transfer.source.closed


def test_bytes_before_the_header_fail_the_fetch(transfer):
    transfer.message(b"abc", True)
    assert transfer.headers[0].check(AgentError)


def test_the_agent_leaving_mid_file_cuts_django_off(transfer):
    transfer.message(header(), False)
    sink = connect_sink(transfer)
    transfer.message(b"abc", True)
    transfer.source_lost()
    assert sink.value() == b"abc" and (sink.disconnected or sink.disconnecting)


def test_django_leaving_mid_file_closes_the_agents_connection(transfer):
    transfer.message(header(), False)
    connect_sink(transfer)
    transfer.sink_lost()
    assert transfer.source.closed


def test_a_sink_arriving_after_a_failure_is_cut_off_at_once(transfer):
    transfer.message(header(), False)
    transfer.fail("timed out")
    sink = connect_sink(transfer)
    assert sink.value() == b"" and (sink.disconnected or sink.disconnecting)


@pytest.mark.parametrize("offset,length,fields", [
    (0, None, {"size": 7, "total_size": 6}),  # more than the whole file
    (4, None, {"size": 3, "total_size": 6}),  # past the end of the file
    (0, 10, {"size": 11}),  # more than the range asked for
    (0, None, {"size": 3, "total_size": -1}),
    (0, None, {"size": 3, "mtime": -2.0 ** 60}),
])
def test_a_header_that_contradicts_itself_or_the_range_fails_the_fetch(offset, length,
                                                                        fields):
    """Django's Content-Length and Content-Range come from the header: a lying
    agent must not produce impossible ones (issue 9, item 9)."""
    t = Transfer(token_id=1, reactor=Clock(), timeout=30, offset=offset, length=length)
    t.source, headers = Source(), []
    t.header.addBoth(headers.append)
    t.message(wire.encode("file_header", name="out.txt", **fields), False)
    (failure,) = headers
    assert failure.check(AgentError) and "announced" in failure.getErrorMessage()
    assert t.source.closed


def test_a_header_consistent_with_the_range_is_taken():
    t = Transfer(token_id=1, reactor=Clock(), timeout=30, offset=2, length=4)
    t.source, headers = Source(), []
    t.header.addBoth(headers.append)
    t.message(wire.encode("file_header", name="out.txt", size=4, total_size=6,
                          mtime=1.7e9), False)
    assert headers == [(4, "out.txt")]
    assert (t.total_size, t.mtime) == (6, 1.7e9)


def test_a_fetch_the_agent_refuses_leaves_no_unhandled_error_behind():
    """Each refused fetch (a FIFO, a path outside) logged a critical
    "Unhandled error in Deferred" with a traceback when the transfer's header
    Deferred was collected."""
    import gc

    from twisted.internet import defer
    from twisted.logger import globalLogPublisher

    from djangoapp.protocol import PathRefused
    from hpcd.transfers import Transfers

    class Daemon:
        reactor = Clock()

        class settings:
            HPC_TOKEN_TTL_SECONDS = 60
            HPC_AGENT_REQUEST_TIMEOUT = 30

        class store:
            @staticmethod
            def issue_token(cluster_id, purpose, ttl):
                return defer.succeed((5, "secret"))

    class Session:
        cluster_id = 1

        def request(self, mtype, **fields):
            return defer.fail(PathRefused("not a regular file"))

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        results = []
        Transfers(Daemon()).fetch(Session(), 3, "pipe").addBoth(results.append)
        assert results[0].check(PathRefused)
        del results
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e for e in events if "log_failure" in e] == []
