"""Sending one file to hpcd over a transfer websocket of its own.

Bulk data stays off the control connection: a paused reader stops reading
pongs, and a throttled transfer would otherwise trip the control
connection's ping timeout.  The bytes are pushed by an ``IPushProducer``
registered on the TCP transport, so the agent reads the file only as fast as
hpcd (and the Django process behind it) consumes it, and memory stays flat
whatever the size.  Reads happen on the file workers (a read on a hung file
system must not freeze the event loop), one chunk ahead of the sending.  The
sender closes only after hpcd confirms it has every byte: Autobahn drops
still-buffered data when a close handshake times out.
"""

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from hpc_agent import checksums, wire
from hpc_agent.connection import client_endpoint

log = Logger()


class FileSource:
    """What a transfer sends: ``size`` bytes of an open file, read with
    ``read(n) -> Deferred[bytes]``; ``close()`` when done."""

    def __init__(self, name, size, total_size, mtime, read, close):
        self.name = name
        self.size = size
        self.total_size = total_size
        self.mtime = mtime
        self.read = read
        self.close = close


@implementer(IPushProducer)
class FileProducer:
    """Reads ``source`` in chunks and sends each as one binary message."""

    def __init__(self, protocol, source, chunk_size):
        self._protocol = protocol
        self._source = source
        self._chunk_size = chunk_size
        self._remaining = source.size
        self._paused = False
        self._reading = False
        self._pumping = False
        self._done = False
        #: The end marker's check (hpc_agent.checksums; the header names it).
        self.checksum = checksums.new(checksums.DEFAULT)
        self.sent = 0

    def resumeProducing(self):
        self._paused = False
        self._pump()

    def pauseProducing(self):
        self._paused = True

    def stopProducing(self):
        self._done = True

    def _pump(self):
        # A loop rather than recursion: reads that complete at once (a test's
        # synchronous reader) must not nest one call per chunk.
        if self._pumping:
            return
        self._pumping = True
        try:
            while not (self._paused or self._reading or self._done):
                if self._remaining == 0:
                    self._done = True
                    self._protocol.producer_finished()
                    return
                self._reading = True
                d = self._source.read(min(self._chunk_size, self._remaining))
                d.addCallbacks(self._chunk, self._failed)
                d.addErrback(lambda f: log.failure("sending a file chunk failed", f))
        finally:
            self._pumping = False

    def _chunk(self, chunk):
        self._reading = False
        if self._done:
            return
        if not chunk:
            self._done = True
            self._protocol.producer_failed(
                f"the file shrank while being sent ({self.sent} of {self._source.size} bytes)")
            return
        self.checksum.update(chunk)
        self.sent += len(chunk)
        self._remaining -= len(chunk)
        # The transport calls pauseProducing from inside sendMessage when its
        # buffer is full, which ends the pump until it drains.
        self._protocol.sendMessage(chunk, isBinary=True)
        self._pump()

    def _failed(self, failure):
        self._reading = False
        if not self._done:
            self._done = True
            self._protocol.producer_failed(f"reading the file failed: "
                                           f"{failure.getErrorMessage()}")


class FileSenderProtocol(WebSocketClientProtocol):
    producer = None

    def onOpen(self):
        # Twisted pauses a producer once 64 KiB wait in the transport, less
        # than one chunk: the agent would stop after every chunk.
        self.transport.bufferSize = 4 * max(self.factory.transfer.chunk_size, 2**20)
        t = self.factory.transfer
        source = t.source
        self.producer = FileProducer(self, source, t.chunk_size)
        self.sendMessage(wire.encode("file_header", size=source.size, name=source.name,
                                     total_size=source.total_size, mtime=source.mtime,
                                     checksum=self.producer.checksum.name), isBinary=False)
        self.transport.registerProducer(self.producer, True)
        self.producer.resumeProducing()

    def producer_finished(self):
        self.transport.unregisterProducer()
        checksum = self.producer.checksum
        self.sendMessage(wire.encode("file_end", size=self.producer.sent,
                                     **{checksum.name: checksum.digest()}), isBinary=False)

    def producer_failed(self, why):
        self.transport.unregisterProducer()
        self.sendMessage(wire.encode("file_error", message=why), isBinary=False)
        self.factory.transfer.fail(why)
        self.sendClose(1000)

    def onMessage(self, payload, isBinary):
        try:
            message = wire.decode(payload, accept={"file_done"}) if not isBinary else None
        except wire.ProtocolError as e:
            message = None
            log.warn("bad frame on a transfer: {error}", error=e.message)
        if message is not None:
            self.factory.transfer.succeed()
            self.sendClose(1000)

    def onClose(self, wasClean, code, reason):
        if self.producer is not None:
            self.producer.stopProducing()
        self.factory.transfer.fail(f"connection closed ({code} {reason})")


class Transfer:
    """One file on its way to hpcd; ``done`` fires when hpcd has it all, and
    fails with the reason otherwise.  The source is closed either way."""

    def __init__(self, source, chunk_size):
        self.source = source
        self.chunk_size = chunk_size
        self.done = defer.Deferred()

    def succeed(self):
        if not self.done.called:
            self.source.close()
            self.done.callback(self.source.size)

    def fail(self, why):
        if not self.done.called:
            self.source.close()
            self.done.errback(TransferFailed(f"file transfer of {self.source.name} failed: "
                                             f"{why}"))


class TransferFailed(Exception):
    """The file did not reach hpcd whole."""


def send_file(reactor, url, token, source, chunk_size, ca_file=None):
    """Open ``url/file`` with ``token`` and send ``source``; returns a Deferred."""
    base = url.rstrip("/")
    transfer = Transfer(source, chunk_size)
    factory = WebSocketClientFactory(f"{base}/file",
                                     headers={"Authorization": f"Bearer {token}"})
    factory.protocol = FileSenderProtocol
    factory.transfer = transfer
    # No permessage-deflate (costs more than it saves on bulk data), no
    # autoPing (a paused receiver would not answer in time), and no masking:
    # it guards browsers against poisoned proxy caches, and cost the agent a
    # fifth of its time on bulk data (hpcd accepts unmasked frames on /file).
    factory.setProtocolOptions(autoPingInterval=0, maskClientFrames=False,
                               maxFramePayloadSize=chunk_size + 1024,
                               maxMessagePayloadSize=chunk_size + 1024)
    d = client_endpoint(reactor, base, ca_file).connect(factory)
    d.addErrback(lambda f: transfer.fail(f"cannot connect: {f.getErrorMessage()}"))
    return transfer.done
