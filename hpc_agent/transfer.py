"""Sending one file to hpcd over a transfer websocket of its own.

Bulk data stays off the control connection: a paused reader stops reading
pongs, and a throttled transfer would otherwise trip the control
connection's ping timeout.  The bytes are pushed by an ``IPushProducer``
registered on the TCP transport, so the agent reads the file only as fast as
hpcd (and the Django process behind it) consumes it, and memory stays flat
whatever the size.  The sender closes only after hpcd confirms it has every
byte: Autobahn drops still-buffered data when a close handshake times out.
"""

import hashlib

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from hpc_agent import wire
from hpc_agent.connection import client_endpoint

log = Logger()


@implementer(IPushProducer)
class FileProducer:
    """Reads a file in chunks and sends each as one binary message."""

    def __init__(self, protocol, handle, chunk_size):
        self._protocol = protocol
        self._handle = handle
        self._chunk_size = chunk_size
        self._paused = False
        self._done = False
        self.sha256 = hashlib.sha256()
        self.sent = 0

    def resumeProducing(self):
        self._paused = False
        # The transport calls pauseProducing from inside sendMessage when its
        # buffer is full, which ends this loop until it drains.
        while not self._paused and not self._done:
            chunk = self._handle.read(self._chunk_size)
            if not chunk:
                self._done = True
                self._protocol.producer_finished()
                return
            self.sha256.update(chunk)
            self.sent += len(chunk)
            self._protocol.sendMessage(chunk, isBinary=True)

    def pauseProducing(self):
        self._paused = True

    def stopProducing(self):
        self._done = True


class FileSenderProtocol(WebSocketClientProtocol):
    def onOpen(self):
        # Twisted pauses a producer once 64 KiB wait in the transport, less
        # than one chunk: the agent would stop after every chunk.
        self.transport.bufferSize = 4 * max(self.factory.transfer.chunk_size, 2**20)
        t = self.factory.transfer
        self.sendMessage(wire.encode("file_header", size=t.size, name=t.name), isBinary=False)
        self.producer = FileProducer(self, t.handle, t.chunk_size)
        self.transport.registerProducer(self.producer, True)
        self.producer.resumeProducing()

    def producer_finished(self):
        self.transport.unregisterProducer()
        t = self.factory.transfer
        if self.producer.sent != t.size:
            message = f"file changed while being sent ({self.producer.sent} of {t.size} bytes)"
            self.sendMessage(wire.encode("file_error", message=message), isBinary=False)
            t.fail(message)
            return
        self.sendMessage(wire.encode("file_end", size=self.producer.sent,
                                     sha256=self.producer.sha256.hexdigest()), isBinary=False)

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
        self.factory.transfer.fail(f"connection closed ({code} {reason})")


class Transfer:
    """One file on its way to hpcd; ``done`` fires when hpcd has it all."""

    def __init__(self, handle, name, size, chunk_size):
        self.handle = handle
        self.name = name
        self.size = size
        self.chunk_size = chunk_size
        self.done = defer.Deferred()

    def succeed(self):
        if not self.done.called:
            self.handle.close()
            self.done.callback(self.size)

    def fail(self, why):
        if not self.done.called:
            self.handle.close()
            log.warn("file transfer of {name} failed: {why}", name=self.name, why=why)
            self.done.errback(RuntimeError(why))


def send_file(reactor, url, token, handle, name, size, chunk_size, ca_file=None):
    """Open ``url/file`` with ``token`` and send ``handle``; returns a Deferred."""
    base = url.rstrip("/")
    transfer = Transfer(handle, name, size, chunk_size)
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
