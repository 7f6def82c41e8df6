"""Relaying one file from the Django process that sends it to an agent.

The mirror of :mod:`hpcd.transfers`.  Django sends ``UploadFile`` on an AMP
connection of its own; hpcd issues a single-use file token and asks the
agent (``upload_file``) to check the path, open a temporary file beside it
and open a ``/file`` websocket with the token.  Once the agent says
``upload_ready`` the command is answered and Django's connection switches
to the byte stream (:data:`djangoapp.protocol.UPLOAD_CHUNK_HEADER`): chunks,
then an end with the SHA-256.  hpcd forwards the bytes as binary messages,
checks the end against what it counted, and sends ``upload_end``; the agent
renames the file into place only if its own count agrees, and says
``upload_done``.  hpcd then answers Django with one line of JSON.

Flow control the other way round from a download: Django's connection is
registered as the producer of the agent's websocket transport, so when the
agent stops reading (its writes lag behind) hpcd stops reading from Django,
and Django's ``sendall`` waits.
"""

import hashlib
import json
import struct

from automat import MethodicalMachine
from twisted.internet import defer, protocol
from twisted.logger import Logger

from djangoapp.protocol import UPLOAD_CHUNK_HEADER, HpcdError, Timeout, TooLarge
from hpc_agent import wire

log = Logger()

_HEADER = struct.Struct(UPLOAD_CHUNK_HEADER)
#: A chunk larger than this from Django is refused (it sends 1 MiB ones).
MAX_CHUNK = 64 * 1024 * 1024


class ChunkReader:
    """Parses Django's stream: ``on_data(bytes)`` for each piece (at most
    ``wire.MAX_UPLOAD_MESSAGE``, passed on as it arrives, never gathered),
    ``on_end(size, sha256 hex)``, ``on_error(why)``."""

    def __init__(self, on_data, on_end, on_error):
        self._on_data = on_data
        self._on_end = on_end
        self._on_error = on_error
        self._buffer = b""
        self._remaining = None  # bytes left in the current chunk; None: a header next
        self._size = 0
        self._ended = False
        self._failed = False

    def feed(self, data):
        while data and not self._failed:
            if self._ended:
                self._buffer += data
                data = b""
                if len(self._buffer) > 32:
                    return self._error("bytes after the end of the upload")
                if len(self._buffer) == 32:
                    self._on_end(self._size, self._buffer.hex())
            elif self._remaining is None:
                need = _HEADER.size - len(self._buffer)
                self._buffer += data[:need]
                data = data[need:]
                if len(self._buffer) == _HEADER.size:
                    (length,) = _HEADER.unpack(self._buffer)
                    self._buffer = b""
                    if length > MAX_CHUNK:
                        return self._error(f"a chunk of {length} bytes is too large")
                    if length == 0:
                        self._ended = True
                    else:
                        self._remaining = length
            else:
                piece = data[:min(self._remaining, wire.MAX_UPLOAD_MESSAGE)]
                data = data[len(piece):]
                self._remaining -= len(piece)
                self._size += len(piece)
                if self._remaining == 0:
                    self._remaining = None
                self._on_data(piece)

    def _error(self, why):
        self._failed = True
        self._on_error(why)


class DjangoSource(protocol.Protocol):
    """The Django side after the protocol switch: chunks in, one line out."""

    def __init__(self, upload):
        self.upload = upload
        self.reader = ChunkReader(upload.data_from_django, upload.django_ended, upload.fail)

    def connectionMade(self):
        # Read in large pieces: Twisted reads bufferSize bytes at a time.
        self.transport.bufferSize = wire.MAX_UPLOAD_MESSAGE
        self.upload.django_connected(self)

    def dataReceived(self, data):
        self.reader.feed(data)

    def connectionLost(self, reason):
        self.upload.django_lost()


class Upload:
    """One file on its way to an agent, an Automat machine with no I/O of
    its own: it writes to the two ends it is given."""

    _machine = MethodicalMachine()

    def __init__(self, token_id, max_size, on_done=None):
        self.token_id = token_id
        self.max_size = max_size
        self.on_done = on_done
        self.cluster_id = self.job_id = self.path = self.started = None  # for hpc_status
        self.ready = defer.Deferred()  # fires when the agent is ready to write
        self.source = None  # the agent's /file websocket protocol
        self.sink = None  # Django's connection (named as in a download, for Transfers)
        self.size = None  # unknown until the end
        self.received = 0
        self.sha256 = hashlib.sha256()
        self._flowing = False  # Django's connection is the agent's producer

    # -- states ------------------------------------------------------------------

    @_machine.state(initial=True)
    def requesting(self):
        "The agent was asked; waiting for upload_ready on its connection."

    @_machine.state()
    def ready_to_relay(self):
        "The agent is ready; Django's end is switching over."

    @_machine.state()
    def relaying(self):
        "Bytes flow from Django to the agent."

    @_machine.state()
    def finishing(self):
        "Everything sent and checked; waiting for the agent's upload_done."

    @_machine.state()
    def done(self):
        "The file is in place; Django has been told."

    @_machine.state()
    def failed(self):
        "Cut off; the agent removed its temporary file, Django was told why."

    # -- inputs ------------------------------------------------------------------

    @_machine.input()
    def agent_ready(self):
        "The agent's upload_ready."

    @_machine.input()
    def django_connected(self, sink):
        "Django's end switched to the byte stream."

    @_machine.input()
    def data_received(self, data):
        "Bytes from Django, within the limit."

    @_machine.input()
    def end_received(self, size, sha256):
        "Django's end, matching what arrived."

    @_machine.input()
    def agent_done(self, result):
        "The agent's upload_done, matching what was sent."

    @_machine.input()
    def broke(self, why, code):
        "Something went wrong (``code``: the error Django sees): bad input, a file_error."

    @_machine.input()
    def source_lost(self):
        "The agent's transfer connection closed."

    @_machine.input()
    def django_lost(self):
        "Django's end closed."

    # -- outputs -----------------------------------------------------------------

    @_machine.output()
    def _announce(self):
        if not self.ready.called:
            self.ready.callback(None)

    @_machine.output()
    def _attach(self, sink):
        self.sink = sink
        # Django's connection pauses while the agent's is full.
        self.source.transport.registerProducer(sink.transport, True)
        self._flowing = True

    @_machine.output()
    def _forward(self, data):
        self.source.sendMessage(data, isBinary=True)

    @_machine.output()
    def _send_end(self, size, sha256):
        self._stop_flow()
        self.size = size
        self.source.send_frame(wire.encode("upload_end", size=size, sha256=sha256))

    @_machine.output()
    def _report(self, result):
        self._answer({"ok": True, "size": result["size"], "sha256": result["sha256"],
                      "mtime": result["mtime"]})
        self.source.sendClose(1000)
        self._ended("ok")

    @_machine.output()
    def _abort(self, why, code):
        self._fail(why, code)

    @_machine.output()
    def _source_gone(self):
        self._fail("the agent's transfer connection closed early")

    @_machine.output()
    def _django_gone(self):
        self._fail("the Django process closed its connection before the end")

    def _fail(self, why, code=b"AGENT_ERROR"):
        self._ended("failed")
        log.warn("upload {id} failed: {why}", id=self.token_id, why=why)
        if not self.ready.called:
            self.ready.errback(HpcdError(why))
        if self.source is not None:
            self._stop_flow()
            self.source.sendClose(1000, why[:100])
        if self.sink is not None:
            self._answer({"ok": False, "error": code.decode("ascii"), "message": why})

    def _stop_flow(self):
        if self._flowing:
            self._flowing = False
            self.source.transport.unregisterProducer()

    def _answer(self, answer):
        self.sink.transport.write(json.dumps(answer).encode() + b"\n")
        self.sink.transport.loseConnection()

    def _ended(self, outcome):
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(self, outcome)

    # -- transitions -------------------------------------------------------------

    requesting.upon(agent_ready, enter=ready_to_relay, outputs=[_announce])
    ready_to_relay.upon(django_connected, enter=relaying, outputs=[_attach])
    relaying.upon(data_received, enter=relaying, outputs=[_forward])
    relaying.upon(end_received, enter=finishing, outputs=[_send_end])
    finishing.upon(agent_done, enter=done, outputs=[_report])

    for _state in (requesting, ready_to_relay, relaying, finishing):
        _state.upon(broke, enter=failed, outputs=[_abort])
        _state.upon(source_lost, enter=failed, outputs=[_source_gone])
    for _state in (relaying, finishing):
        _state.upon(django_lost, enter=failed, outputs=[_django_gone])
    # Frames out of turn are errors; checked in message() before they get here.
    for _state in (done, failed):
        for _input in (broke, source_lost, django_lost, agent_ready, data_received,
                       end_received, agent_done):
            _state.upon(_input, enter=_state, outputs=[])
    failed.upon(django_connected, enter=failed, outputs=[])
    del _state, _input

    # -- events from the two ends, checked before they become inputs -------------

    def data_from_django(self, data):
        self.received += len(data)
        if self.max_size is not None and self.received > self.max_size:
            self.fail(f"the upload is larger than HPC_UPLOAD_MAX_BYTES ({self.max_size} "
                      "bytes)", b"TOO_LARGE")
            return
        self.sha256.update(data)
        self.data_received(data)

    def django_ended(self, size, sha256):
        if (size, sha256) != (self.received, self.sha256.hexdigest()):
            self.fail(f"the upload arrived damaged from Django ({self.received} of {size} "
                       "bytes, or a checksum mismatch)")
        else:
            self.end_received(size, sha256)

    def message(self, payload, is_binary):
        """A frame from the agent's /file connection."""
        if is_binary:
            self.fail("the agent sent bytes on an upload")
            return
        try:
            message = wire.decode(payload, accept={"upload_ready", "upload_done",
                                                   "file_error"})
        except wire.ProtocolError as e:
            self.fail(f"bad frame from the agent: {e.message}")
            return
        kind = message["type"]
        if kind == "upload_ready":
            self.agent_ready()
        elif kind == "upload_done":
            if (message["size"], message["sha256"]) != (self.size, self.sha256.hexdigest()):
                self.fail("the agent wrote something else than was sent")
            else:
                self.agent_done(message)
        else:
            self.fail(f"the agent could not write the file: {message['message']}")

    def fail(self, why, code=b"AGENT_ERROR"):
        self.broke(why, code)


@defer.inlineCallbacks
def start_upload(transfers, session, job_id, path):
    """Ask the agent for an upload and wait until it is ready; returns the
    protocol Django's connection switches to."""
    daemon = transfers.daemon
    settings = daemon.settings
    token_id, secret = yield daemon.store.issue_token(
        session.cluster_id, "file", int(settings.HPC_TOKEN_TTL_SECONDS))
    limit = settings.HPC_UPLOAD_MAX_BYTES
    limit = None if limit is None else int(limit)
    upload = Upload(token_id, limit, on_done=transfers._done)
    upload.cluster_id, upload.job_id, upload.path = session.cluster_id, job_id, path
    upload.started = daemon.reactor.seconds()
    timeout = float(settings.HPC_AGENT_REQUEST_TIMEOUT)
    upload.ready.addTimeout(timeout, daemon.reactor)
    transfers._by_token[token_id] = transfers.active[token_id] = upload
    try:
        yield session.request("upload_file", job=job_id, path=path, token=secret,
                              max_size=limit)
        yield upload.ready
    except defer.TimeoutError:
        upload.fail("timed out")
        raise Timeout(f"the agent of cluster {session.cluster_id} was not ready to receive "
                      f"{path!r} within {timeout:g} s") from None
    except HpcdError:
        upload.fail("refused")
        upload.ready.addErrback(lambda _: None)  # the request's error is the one to report
        raise
    finally:
        transfers._by_token.pop(token_id, None)
    return DjangoSource(upload)


__all__ = ["start_upload", "Upload", "ChunkReader", "DjangoSource", "TooLarge"]
