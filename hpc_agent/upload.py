"""Receiving one file from hpcd over a transfer websocket of its own.

The mirror of :mod:`hpc_agent.transfer`: the agent opens ``/file`` with the
upload's single-use token, says ``upload_ready``, and hpcd sends the bytes
as binary messages and then ``upload_end`` (size, SHA-256).  Writes happen on
the file workers, one at a time and in order; while more than
:data:`WINDOW` bytes wait to be written the agent stops reading its socket,
so TCP pushes back on hpcd, which stops reading from the Django process:
memory stays flat whatever the size.  The bytes go to a temporary file
(:class:`hpc_agent.files.Upload`) that is renamed over the final name only
when size and checksum match; anything else removes it.
"""

from collections import deque

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.logger import Logger

from hpc_agent import wire
from hpc_agent.connection import client_endpoint
from hpc_agent.transfer import TransferFailed

log = Logger()

#: Bytes received and not yet written before the agent stops reading.
WINDOW = 4 * wire.MAX_UPLOAD_MESSAGE


class UploadSink:
    """Where an upload's bytes go: ``write(data)``, ``commit(size, sha256)``
    (-> ``{"size", "sha256", "mtime"}``) and ``abort()``, each returning a
    Deferred (file work happens on the file workers)."""

    def __init__(self, path, write, commit, abort):
        self.path = path
        self.write = write
        self.commit = commit
        self.abort = abort


class Receiver:
    """One upload's logic, apart from its socket: writes in order, one in
    flight, pausing the connection (``pause()``/``resume()``) while too much
    waits; ``done`` fires with the commit's result, or fails."""

    def __init__(self, sink, window=WINDOW):
        self.sink = sink
        self.window = window
        self.done = defer.Deferred()
        self.connection = None  # pause(), resume(), send(frame), close()
        self._queue = deque()
        self._queued = 0
        self._busy = False
        self._paused = False
        self._end = None

    def data(self, payload):
        if self.done.called or self._end is not None:
            if not self.done.called:
                self.fail("bytes arrived after upload_end")
            return
        self._queue.append(payload)
        self._queued += len(payload)
        if self._queued > self.window and not self._paused:
            self._paused = True
            self.connection.pause()
        self._next()

    def end(self, size, sha256):
        if not self.done.called and self._end is None:
            self._end = (size, sha256)
            self._next()

    def _next(self):
        if self._busy or self.done.called:
            return
        if self._queue:
            chunk = self._queue.popleft()
            self._busy = True
            self.sink.write(chunk).addCallbacks(self._written, self._failed,
                                                callbackArgs=(len(chunk),))
        elif self._end is not None:
            self._busy = True
            self.sink.commit(*self._end).addCallbacks(self._committed, self._failed)

    def _written(self, _, n):
        self._busy = False
        self._queued -= n
        if self._paused and self._queued <= self.window // 2:
            self._paused = False
            self.connection.resume()
        self._next()

    def _committed(self, result):
        self._busy = False
        if self.done.called:
            return
        self.connection.send(wire.encode("upload_done", **result))
        self.done.callback(result)

    def _failed(self, failure):
        self._busy = False
        self.fail(failure.getErrorMessage())

    def fail(self, why):
        """Give up: the temporary file goes, hpcd is told why."""
        if self.done.called:
            return
        self._queue.clear()
        self.sink.abort().addErrback(
            lambda f: log.warn("removing the partial upload {path} failed: {why}",
                               path=self.sink.path, why=f.getErrorMessage()))
        self.done.errback(TransferFailed(f"the upload of {self.sink.path} failed: {why}"))
        if self.connection is not None:
            self.connection.send(wire.encode("file_error", message=why[:1000]))
            self.connection.close()

    def lost(self, reason):
        self.connection = None  # nothing more can be sent
        self.fail(f"the connection closed ({reason})")


class UploadReceiverProtocol(WebSocketClientProtocol):
    """Thin: frames to the :class:`Receiver`."""

    def onOpen(self):
        receiver = self.factory.receiver
        receiver.connection = self
        self.sendMessage(wire.encode("upload_ready"), isBinary=False)

    # The Receiver's view of the connection.
    def pause(self):
        self.transport.pauseProducing()

    def resume(self):
        self.transport.resumeProducing()

    def send(self, frame):
        self.sendMessage(frame, isBinary=False)

    def close(self):
        self.sendClose(1000)

    def onMessage(self, payload, isBinary):
        receiver = self.factory.receiver
        if isBinary:
            receiver.data(payload)
            return
        try:
            message = wire.decode(payload, accept=wire.TRANSFER_FROM_HPCD - {"file_done"})
        except wire.ProtocolError as e:
            receiver.fail(f"bad frame from hpcd: {e.message}")
            return
        receiver.end(message["size"], message["sha256"])

    def onClose(self, wasClean, code, reason):
        self.factory.receiver.lost(f"{code} {reason}")


def receive_file(reactor, url, token, sink, ca_file=None):
    """Open ``url/file`` with ``token`` and receive into ``sink``; returns a
    Deferred firing with ``{"size", "sha256", "mtime"}`` once it is in place."""
    base = url.rstrip("/")
    receiver = Receiver(sink)
    factory = WebSocketClientFactory(f"{base}/file",
                                     headers={"Authorization": f"Bearer {token}"})
    factory.protocol = UploadReceiverProtocol
    factory.receiver = receiver
    # As for sending: no deflate, no pings (the agent pauses reading), and
    # no message larger than hpcd may send.
    factory.setProtocolOptions(autoPingInterval=0, maskClientFrames=False,
                               maxFramePayloadSize=wire.MAX_UPLOAD_MESSAGE + 1024,
                               maxMessagePayloadSize=wire.MAX_UPLOAD_MESSAGE + 1024)
    d = client_endpoint(reactor, base, ca_file).connect(factory)
    d.addErrback(lambda f: receiver.fail(f"cannot connect: {f.getErrorMessage()}"))
    return receiver.done
