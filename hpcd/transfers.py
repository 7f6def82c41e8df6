"""Relaying one file from an agent to the Django process that asked for it.

Django sends ``FetchFile`` on an AMP connection of its own.  hpcd issues a
single-use file token, asks the agent (over its control connection) to open
a ``/file`` websocket with it, and answers ``FetchFile`` with the size and
name once the agent's header arrives; the AMP connection then carries the
raw bytes, and after the last one a trailer: ``TRAILER_OK`` and the checksum
the agent announced (hpc_agent.checksums; CRC-32 padded with zeros, or the
SHA-256 of an older agent), written only once hpcd has checked that the
bytes match it.  A transfer that fails is cut off without a trailer, so
Django can tell a damaged file from a complete one even when every byte
arrived.

Flow control runs end to end the way ``twisted.protocols.portforward`` does
it: the agent's TCP transport is registered as the producer of the Django
connection, so when Django reads slowly hpcd stops reading from the agent,
TCP pushes back, and the agent's file producer pauses.  Memory stays flat
whatever the file size.
"""

import socket

from automat import MethodicalMachine
from twisted.internet import defer, protocol
from twisted.logger import Logger

from djangoapp.protocol import TRAILER_OK, AgentError, HpcdError, Timeout
from hpc_agent import checksums, wire

log = Logger()


#: Bytes a transfer may hold in hpcd before the agent is paused.
RELAY_BUFFER = 4 * 1024 * 1024

#: Bytes hpcd asks for in one read of an agent's file websocket.
SOURCE_READ_SIZE = 1024 * 1024 + 64 * 1024


class Sink(protocol.Protocol):
    """The Django side after the protocol switch: bytes out, nothing in."""

    def __init__(self, transfer):
        self.transfer = transfer

    def connectionMade(self):
        # Twisted pauses the producer (the agent's connection) once 64 KiB
        # wait here: less than one chunk, so the relay would stall on every
        # chunk.  A few chunks of slack let the agent, hpcd and Django work
        # at once; memory stays bounded all the same.
        self.transport.bufferSize = RELAY_BUFFER
        # The kernel's default buffer for a Unix socket (about 200 KiB) makes
        # hpcd and Django take turns; a larger one lets them overlap.
        try:
            self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RELAY_BUFFER)
        except (AttributeError, OSError):
            pass
        self.transfer.sink_connected(self)

    def dataReceived(self, data):
        pass  # Django sends nothing after the switch.

    def connectionLost(self, reason):
        self.transfer.sink_lost()


class Transfer:
    """One file on its way, an Automat machine.

    The agent's header comes first and answers Django's ``FetchFile``; bytes
    that arrive before Django's end is connected are held (the agent is
    paused meanwhile), then the agent's transport becomes the producer of
    Django's.  The end marker is checked against what arrived; only then is
    the trailer written.  The machine does no I/O of its own: it writes to
    the transports of the two ends it is given.
    """

    _machine = MethodicalMachine()

    def __init__(self, token_id, reactor, timeout, on_done=None, offset=0, length=None):
        self.token_id = token_id
        self.offset, self.length = offset or 0, length  # the range asked for
        self.on_done = on_done  # called once, with the outcome, when it ends
        self.cluster_id = self.job_id = self.path = self.started = None  # for hpc_status
        self.header = defer.Deferred()  # fires with (size, name)
        self.header.addTimeout(timeout, reactor)
        self.source = None  # the agent's /file websocket protocol
        self.sink = None
        self.size = None
        self.total_size = self.mtime = None  # the whole file's, from the header
        self.received = 0
        self.checksum = None  # of the kind the header names
        self._early = []

    # -- states ------------------------------------------------------------------

    @_machine.state(initial=True)
    def announcing(self):
        "Waiting for the agent's header."

    @_machine.state()
    def holding(self):
        "Header in; Django's end not connected yet: bytes are held."

    @_machine.state()
    def relaying(self):
        "Both ends connected: bytes flow with flow control."

    @_machine.state()
    def complete_held(self):
        "Every byte arrived and checked before Django's end connected."

    @_machine.state()
    def done(self):
        "Django has every byte and the trailer."

    @_machine.state()
    def failed(self):
        "Cut off; Django sees no trailer."

    # -- inputs ------------------------------------------------------------------

    @_machine.input()
    def header_received(self, size, name):
        "The agent's file_header, checked."

    @_machine.input()
    def data_received(self, data):
        "Bytes from the agent, within the announced size."

    @_machine.input()
    def end_received(self):
        "The agent's file_end, matching what arrived."

    @_machine.input()
    def broke(self, why):
        "Something went wrong: bad input, an early close, a timeout."

    @_machine.input()
    def sink_connected(self, sink):
        "Django's end switched to the byte stream."

    @_machine.input()
    def sink_lost(self):
        "Django's end closed."

    @_machine.input()
    def source_lost(self):
        "The agent's transfer connection closed."

    # -- outputs -----------------------------------------------------------------

    @_machine.output()
    def _announce(self, size, name):
        self.size = size
        # Hold the agent until Django's end is connected.
        self.source.transport.pauseProducing()
        if not self.header.called:
            self.header.callback((size, name))

    @_machine.output()
    def _hold(self, data):
        self._early.append(data)

    @_machine.output()
    def _write(self, data):
        self.sink.transport.write(data)

    @_machine.output()
    def _attach(self, sink):
        self.sink = sink
        early, self._early = self._early, []
        for data in early:
            sink.transport.write(data)

    @_machine.output()
    def _start_flow(self, sink):
        sink.transport.registerProducer(self.source.transport, True)
        self.source.transport.resumeProducing()

    @_machine.output()
    def _confirm(self):
        self.source.send_frame(wire.encode("file_done", size=self.received))
        self._ended("ok")

    def _ended(self, outcome):
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(self, outcome)

    @_machine.output()
    def _stop_flow(self):
        self.sink.transport.unregisterProducer()

    @_machine.output()
    def _finish(self):
        self._write_trailer()

    @_machine.output()
    def _finish_late(self, sink):
        self._write_trailer()

    def _write_trailer(self):
        self.sink.transport.write(TRAILER_OK + self.checksum.raw().ljust(32, b"\0"))
        self.sink.transport.loseConnection()

    @_machine.output()
    def _refuse_sink(self, sink):
        sink.transport.abortConnection()

    @_machine.output()
    def _cut_off_because(self, why):
        self._abort(why)

    @_machine.output()
    def _source_gone(self):
        self._abort("the agent's transfer connection closed early")

    @_machine.output()
    def _sink_gone(self):
        self._abort("the Django process stopped reading")

    def _abort(self, why):
        self._ended("failed")
        log.warn("transfer {id} failed: {why}", id=self.token_id, why=why)
        if not self.header.called:
            self.header.errback(AgentError(why))
        if self.source is not None:
            self.source.sendClose(1000, why[:100])
        if self.sink is not None:
            # Django sees the stream end without a trailer: an error.
            self.sink.transport.abortConnection()

    # -- transitions -------------------------------------------------------------

    announcing.upon(header_received, enter=holding, outputs=[_announce])
    announcing.upon(broke, enter=failed, outputs=[_cut_off_because])
    announcing.upon(source_lost, enter=failed, outputs=[_source_gone])

    holding.upon(data_received, enter=holding, outputs=[_hold])
    holding.upon(sink_connected, enter=relaying, outputs=[_attach, _start_flow])
    holding.upon(end_received, enter=complete_held, outputs=[_confirm])
    holding.upon(broke, enter=failed, outputs=[_cut_off_because])
    holding.upon(source_lost, enter=failed, outputs=[_source_gone])
    holding.upon(sink_lost, enter=failed, outputs=[_sink_gone])

    relaying.upon(data_received, enter=relaying, outputs=[_write])
    relaying.upon(end_received, enter=done, outputs=[_confirm, _stop_flow, _finish])
    relaying.upon(broke, enter=failed, outputs=[_cut_off_because])
    relaying.upon(source_lost, enter=failed, outputs=[_source_gone])
    relaying.upon(sink_lost, enter=failed, outputs=[_sink_gone])

    complete_held.upon(sink_connected, enter=done, outputs=[_attach, _finish_late])
    # The agent closes once it has file_done: nothing is lost.
    complete_held.upon(source_lost, enter=complete_held, outputs=[])
    complete_held.upon(sink_lost, enter=failed, outputs=[])
    complete_held.upon(broke, enter=failed, outputs=[])

    for _state in (done, failed):
        _state.upon(source_lost, enter=_state, outputs=[])
        _state.upon(sink_lost, enter=_state, outputs=[])
        _state.upon(broke, enter=_state, outputs=[])
        _state.upon(data_received, enter=_state, outputs=[])
        _state.upon(end_received, enter=_state, outputs=[])
        _state.upon(header_received, enter=_state, outputs=[])
    # Django's end may still switch over after a failure it has not seen.
    failed.upon(sink_connected, enter=failed, outputs=[_refuse_sink])
    del _state

    # -- the agent's frames, checked before they become inputs -------------------

    def message(self, payload, is_binary):
        if is_binary:
            if self.size is None or self.received + len(payload) > self.size:
                self.broke("the agent sent more bytes than announced")
                return
            self.received += len(payload)
            self.checksum.update(payload)
            self.data_received(payload)
            return
        try:
            message = wire.decode(payload, accept={"file_header", "file_end", "file_error"})
        except wire.ProtocolError as e:
            self.broke(f"bad frame from the agent: {e.message}")
            return
        kind = message["type"]
        if kind == "file_header":
            problem = _header_problem(message, self.size, self.offset, self.length)
            if problem:
                self.broke(problem)
            else:
                self.checksum = checksums.new(message.get("checksum", checksums.LEGACY))
                self.total_size = message.get("total_size")
                self.mtime = message.get("mtime")
                self.header_received(message["size"], message["name"])
        elif kind == "file_end":
            if self.checksum is None:
                self.broke("the agent ended a file it never announced")
            elif (message["size"], message.get(self.checksum.name)) != (
                    self.received, self.checksum.digest()):
                self.broke(f"the file arrived damaged ({self.received} of {message['size']} "
                           "bytes, or a checksum mismatch)")
            else:
                self.end_received()
        else:
            self.broke(f"the agent failed to send the file: {message['message']}")

    def fail(self, why):
        self.broke(why)


#: The largest size a file header may announce (2**53: exact as a JSON number).
MAX_FILE_SIZE = 2 ** 53


def _header_problem(message, size_so_far, offset=0, length=None):
    """Why a file_header cannot be true, or None: its sizes must agree with
    each other and with the range asked for (Django's Content-Length and
    Content-Range come from them), its name be a plain name, its mtime a
    number of seconds."""
    if size_so_far is not None:
        return "second header"
    size = message["size"]
    if not 0 <= size <= MAX_FILE_SIZE:
        return f"the agent announced an impossible size ({size})"
    if length is not None and size > length:
        return f"the agent announced {size} bytes for a range of {length}"
    total = message.get("total_size")
    if total is not None and not (0 <= total <= MAX_FILE_SIZE and offset + size <= total):
        return (f"the agent announced {size} bytes from offset {offset} of a file of "
                f"{total} bytes")
    mtime = message.get("mtime")
    if mtime is not None and not (isinstance(mtime, (int, float))
                                  and -MAX_FILE_SIZE < mtime < MAX_FILE_SIZE):
        return f"the agent announced an impossible mtime ({str(mtime)[:32]})"
    name = message["name"]
    if not name or "/" in name or "\0" in name or len(name) > 4096:
        return f"the agent announced an impossible file name ({name[:64]!r})"
    if message.get("checksum", checksums.LEGACY) not in checksums.KINDS:
        return f"the agent announced an unknown checksum ({message['checksum'][:32]!r})"
    return None


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
    def fetch(self, session, job_id, path, extra_params=None, offset=None, length=None):
        """Start a transfer; fires with ``(size, name, Sink)`` once the agent's
        header is in.  The caller switches its connection to the Sink.
        ``offset``/``length``: a range of the file (the agent seeks)."""
        daemon = self.daemon
        token_id, secret = yield daemon.store.issue_token(
            session.cluster_id, "file", int(daemon.settings.HPC_TOKEN_TTL_SECONDS))
        timeout = float(daemon.settings.HPC_AGENT_REQUEST_TIMEOUT)
        transfer = Transfer(token_id, daemon.reactor, timeout, on_done=self._done,
                            offset=offset, length=length)
        transfer.cluster_id, transfer.job_id, transfer.path = session.cluster_id, job_id, path
        transfer.started = daemon.reactor.seconds()
        self._by_token[token_id] = self.active[token_id] = transfer
        try:
            fields = {} if extra_params is None else {"extra_params": extra_params}
            if offset:
                fields["offset"] = offset
            if length is not None:
                fields["length"] = length
            yield session.request("fetch_file", job=job_id, path=path, token=secret, **fields)
            size, name = yield transfer.header
        except defer.TimeoutError:
            transfer.fail("timed out")
            raise Timeout(f"the agent of cluster {session.cluster_id} did not start sending "
                          f"{path!r} within {timeout:g} s") from None
        except HpcdError:
            # The agent refused before any header: nothing waits on it, so
            # its failure is consumed here, not left to the garbage collector
            # ("Unhandled error in Deferred", with a traceback, per refusal).
            transfer.header.addErrback(lambda _: None)
            transfer.fail("refused")
            raise
        finally:
            # connected() took it already when the agent's connection came.
            self._by_token.pop(token_id, None)
        return size, name, Sink(transfer)

    def upload(self, session, job_id, path):
        """Start receiving a file for a job (:mod:`hpcd.uploads`); fires with
        the protocol Django's connection switches to, once the agent is ready."""
        from hpcd.uploads import start_upload

        return start_upload(self, session, job_id, path)

    def connected(self, source, claim):
        """A /file websocket opened with a valid token."""
        transfer = self._by_token.pop(claim["token_id"], None)
        if transfer is None:
            source.sendClose(1000, "no transfer is waiting for this token")
            return _Refused()
        transfer.source = source
        # Twisted reads a connection 64 KiB at a time (its bufferSize), and
        # Autobahn joins the reads of a frame by concatenation: a 1 MiB
        # chunk cost 16 reads and ~8 MiB of copying.  Reads as large as a
        # chunk make it one or two.
        source.transport.bufferSize = SOURCE_READ_SIZE
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
