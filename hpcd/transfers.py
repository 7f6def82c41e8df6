"""Relaying one file from an agent to the Django process that asked for it.

Django sends ``FetchFile`` on an AMP connection of its own.  hpcd issues a
single-use file token, asks the agent (over its control connection) to open
a ``/file`` websocket with it, and answers ``FetchFile`` with the size and
name once the agent's header arrives; the AMP connection then carries the
raw bytes.  Flow control runs end to end the way
``twisted.protocols.portforward`` does it: the agent's TCP transport is
registered as the producer of the Django connection, so when Django reads
slowly hpcd stops reading from the agent, TCP pushes back, and the agent's
file producer pauses.  Memory stays flat whatever the file size.
"""

import hashlib

from twisted.internet import defer, protocol
from twisted.logger import Logger

from hpc_agent import wire
from djangoapp.protocol import AgentError, HpcdError, Timeout

log = Logger()


class Sink(protocol.Protocol):
    """The Django side after the protocol switch: bytes out, nothing in."""

    def __init__(self, transfer):
        self.transfer = transfer

    def connectionMade(self):
        self.transfer.sink_ready(self)

    def dataReceived(self, data):
        pass  # Django sends nothing after the switch.

    def connectionLost(self, reason):
        self.transfer.sink_lost()


class Transfer:
    """One file on its way; holds both ends once they are connected."""

    def __init__(self, token_id, reactor, timeout, on_done=None):
        self.token_id = token_id
        self.on_done = on_done  # called once, with the outcome, when it ends
        self.cluster_id = self.job_id = self.path = self.started = None  # for hpc_status
        self.header = defer.Deferred()  # fires with (size, name)
        self.header.addTimeout(timeout, reactor)
        self.source = None  # the agent's /file websocket protocol
        self.sink = None
        self.size = None
        self.received = 0
        self.sha256 = hashlib.sha256()
        self._early = []
        self.finished = False

    # -- the agent's side ------------------------------------------------------

    def message(self, payload, is_binary):
        if is_binary:
            self._data(payload)
            return
        try:
            message = wire.decode(payload, accept={"file_header", "file_end", "file_error"})
        except wire.ProtocolError as e:
            self.fail(f"bad frame from the agent: {e.message}")
            return
        getattr(self, f"_on_{message['type']}")(message)

    def _on_file_header(self, message):
        if self.size is not None:
            self.fail("second header")
            return
        self.size = message["size"]
        # Hold the agent until Django's end is connected.
        self.source.transport.pauseProducing()
        if not self.header.called:
            self.header.callback((message["size"], message["name"]))

    def _data(self, data):
        if self.size is None or self.received + len(data) > self.size:
            self.fail("the agent sent more bytes than announced")
            return
        self.received += len(data)
        self.sha256.update(data)
        if self.sink is None:
            self._early.append(data)
        else:
            self.sink.transport.write(data)

    def _on_file_end(self, message):
        if (message["size"], message["sha256"]) != (self.received, self.sha256.hexdigest()):
            self.fail(f"the file arrived damaged ({self.received} of {message['size']} "
                      "bytes, or a checksum mismatch)")
            return
        self._finish("ok")
        self.source.send_frame(wire.encode("file_done", size=self.received))
        if self.sink is not None:
            self.sink.transport.unregisterProducer()
            self.sink.transport.loseConnection()

    def _on_file_error(self, message):
        self.fail(f"the agent failed to send the file: {message['message']}")

    def source_lost(self):
        if not self.finished:
            self.fail("the agent's transfer connection closed early")

    # -- Django's side ---------------------------------------------------------

    def sink_ready(self, sink):
        self.sink = sink
        for data in self._early:
            sink.transport.write(data)
        self._early = []
        if self.finished:
            sink.transport.loseConnection()
        elif self.source is not None:
            sink.transport.registerProducer(self.source.transport, True)
            self.source.transport.resumeProducing()

    def sink_lost(self):
        if not self.finished:
            self.fail("the Django process stopped reading")

    # -- the end ---------------------------------------------------------------

    def _finish(self, outcome):
        self.finished = True
        if self.on_done is not None:
            self.on_done(self, outcome)

    def fail(self, why):
        if self.finished:
            return
        self._finish("failed")
        log.warn("transfer {id} failed: {why}", id=self.token_id, why=why)
        if not self.header.called:
            self.header.errback(AgentError(why))
        if self.source is not None:
            self.source.sendClose(1000, why[:100])
        if self.sink is not None:
            # Django sees the stream end before the announced size: an error.
            self.sink.transport.abortConnection()


class Transfers:
    """Transfers waiting for or using their /file connection, by token id."""

    def __init__(self, daemon):
        self.daemon = daemon
        self._by_token = {}
        # For hpc_status and /metrics: transfers not finished yet, by token
        # id, and the bytes and outcomes of the finished ones.
        self.active = {}
        self.bytes_done = 0
        self.done = {}

    def _done(self, transfer, outcome):
        self.active.pop(transfer.token_id, None)
        self.bytes_done += transfer.received
        self.done[outcome] = self.done.get(outcome, 0) + 1

    @defer.inlineCallbacks
    def fetch(self, session, job_id, path):
        """Start a transfer; fires with ``(size, name, Sink)`` once the agent's
        header is in.  The caller switches its connection to the Sink."""
        daemon = self.daemon
        token_id, secret = yield daemon.store.issue_token(
            session.cluster_id, "file", int(daemon.settings.HPC_TOKEN_TTL_SECONDS))
        timeout = float(daemon.settings.HPC_AGENT_REQUEST_TIMEOUT)
        transfer = Transfer(token_id, daemon.reactor, timeout, on_done=self._done)
        transfer.cluster_id, transfer.job_id, transfer.path = session.cluster_id, job_id, path
        transfer.started = daemon.reactor.seconds()
        self._by_token[token_id] = self.active[token_id] = transfer
        try:
            yield session.request("fetch_file", job=job_id, path=path, token=secret)
            size, name = yield transfer.header
        except defer.TimeoutError:
            transfer.fail("timed out")
            raise Timeout(f"the agent of cluster {session.cluster_id} did not start sending "
                          f"{path!r} within {timeout:g} s") from None
        except HpcdError:
            transfer.fail("refused")
            raise
        finally:
            # connected() took it already when the agent's connection came.
            self._by_token.pop(token_id, None)
        return size, name, Sink(transfer)

    def connected(self, source, claim):
        """A /file websocket opened with a valid token."""
        transfer = self._by_token.pop(claim["token_id"], None)
        if transfer is None:
            source.sendClose(1000, "no transfer is waiting for this token")
            return _Refused()
        transfer.source = source
        return _SourceHandler(transfer)


class _SourceHandler:
    def __init__(self, transfer):
        self._transfer = transfer

    def message(self, payload, is_binary):
        self._transfer.message(payload, is_binary)

    def lost(self, code, reason):
        self._transfer.source_lost()


class _Refused:
    def message(self, payload, is_binary):
        pass

    def lost(self, code, reason):
        pass
