"""Sending a file: the producer's reads and flow control (hpc_agent.transfer)."""

import zlib

import pytest
from twisted.internet import defer

from hpc_agent.transfer import FileProducer, FileSource, Transfer, TransferFailed


class Reader:
    """A file's bytes, read at once (``held=False``) or when the test says."""

    def __init__(self, data, held=False):
        self.data = data
        self.position = 0
        self.held = [] if held else None
        self.closed = False

    def read(self, n):
        chunk = self.data[self.position:self.position + n]
        self.position += len(chunk)
        if self.held is not None:
            d = defer.Deferred()
            self.held.append((d, chunk))
            return d
        return defer.succeed(chunk)

    def release(self):
        d, chunk = self.held.pop(0)
        d.callback(chunk)

    def close(self):
        self.closed = True


class Protocol:
    """Records what the producer sends; pauses it after ``window`` messages."""

    def __init__(self, window=None):
        self.messages = []
        self.finished = False
        self.failed = None
        self.window = window
        self.producer = None

    def sendMessage(self, data, isBinary):
        self.messages.append(data)
        if self.window is not None and len(self.messages) % self.window == 0:
            self.producer.pauseProducing()

    def producer_finished(self):
        self.finished = True

    def producer_failed(self, why):
        self.failed = why


def produce(data, size=None, chunk_size=4, held=False, window=None):
    reader = Reader(data, held)
    source = FileSource("f", len(data) if size is None else size, len(data), 0.0, reader.read,
                        reader.close)
    protocol = Protocol(window)
    producer = protocol.producer = FileProducer(protocol, source, chunk_size)
    return reader, protocol, producer


def test_the_bytes_go_in_chunks_and_the_end_carries_size_and_checksum():
    data = b"0123456789"
    _, protocol, producer = produce(data)
    producer.resumeProducing()
    assert protocol.messages == [b"0123", b"4567", b"89"] and protocol.finished
    assert (producer.sent, producer.checksum.name, producer.checksum.digest()) == \
        (10, "crc32", zlib.crc32(data))


def test_only_the_announced_size_is_sent_even_if_the_file_grew():
    _, protocol, producer = produce(b"0123456789", size=6)
    producer.resumeProducing()
    assert b"".join(protocol.messages) == b"012345" and protocol.finished


def test_a_file_that_shrank_fails_the_transfer():
    _, protocol, producer = produce(b"01234", size=8)
    producer.resumeProducing()
    assert "shrank" in protocol.failed and not protocol.finished


def test_a_failed_read_fails_the_transfer():
    reader, protocol, producer = produce(b"0123456789", held=True)
    producer.resumeProducing()
    d, _ = reader.held.pop(0)
    d.errback(OSError(5, "Input/output error"))
    assert "reading the file failed" in protocol.failed


def test_a_paused_producer_reads_nothing_more_until_resumed():
    reader, protocol, producer = produce(b"x" * 40, window=2)
    producer.resumeProducing()
    assert len(protocol.messages) == 2 and reader.position == 8
    producer.resumeProducing()
    assert len(protocol.messages) == 4
    while not protocol.finished:
        producer.resumeProducing()
    assert b"".join(protocol.messages) == b"x" * 40


def test_one_read_at_a_time_and_the_next_only_after_the_last_was_sent():
    reader, protocol, producer = produce(b"abcdefgh", held=True)
    producer.resumeProducing()
    producer.resumeProducing()
    assert len(reader.held) == 1
    reader.release()
    assert protocol.messages == [b"abcd"] and len(reader.held) == 1
    reader.release()
    assert protocol.finished


def test_many_reads_that_complete_at_once_do_not_nest():
    _, protocol, producer = produce(b"z" * 5000, chunk_size=1)
    producer.resumeProducing()  # 5000 chunks: would exceed the recursion limit if nested
    assert protocol.finished and len(protocol.messages) == 5000


def test_a_transfer_closes_its_source_and_reports_how_it_ended():
    reader = Reader(b"abc")
    source = FileSource("f", 3, 3, 0.0, reader.read, reader.close)
    transfer = Transfer(source, 4)
    transfer.fail("the connection closed")
    assert reader.closed
    with pytest.raises(TransferFailed, match="the connection closed"):
        transfer.done.result.raiseException()
    transfer.done.addErrback(lambda f: None)
    transfer.succeed()  # too late: nothing changes
