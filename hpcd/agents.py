"""The websocket server agents connect to.

``/agent`` is an agent's control connection, ``/file`` one file transfer.
Before the upgrade the token in the ``Authorization: Bearer`` header is
*checked* (anything but a valid, unused, unexpired token of the right kind
gets 401/403); it is *spent* only when the agent's first frame arrives,
which proves the agent saw the upgrade complete.  An attempt the agent gave
up on (hpcd was stopped mid-handshake, say) never spends the token, so the
agent can try again with it.  Until then a connection is unauthenticated and
counts against :class:`PreAuthLimits`.

The protocol class only decodes and hands over: :class:`AgentSession` holds
a control connection's logic, :mod:`hpcd.transfers` a transfer's.
"""

import itertools
from collections import Counter

from automat import MethodicalMachine
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer
from twisted.logger import Logger

from djangoapp.protocol import AgentError, ClusterOffline, Timeout
from hpc_agent import wire
from hpc_agent.wire import CLOSE_INSTALLATION, CLOSE_PROTOCOL
from hpcd import transfers

log = Logger()

MAX_TOKEN_LENGTH = 256
#: The opening handshake's request line and headers may not exceed this:
#: Autobahn searches the whole buffer for the header's end on every read, so
#: endless headers cost quadratic CPU and unbounded memory.
MAX_HANDSHAKE_BYTES = 16 * 1024
#: Close code for a token spent by another connection in the meantime.
CLOSE_TOKEN_SPENT = 4004


class PreAuthLimits:
    """Caps connections that have not proven a token yet, in all and per host.

    An agent needs one control connection and one per file being fetched;
    anything beyond these caps is an attack or a bug, and is refused at once
    so that it cannot use up hpcd's file descriptors.  Refusals are counted
    by reason here and logged by :func:`log_refusal`.
    """

    def __init__(self, total, per_host):
        self.total = total
        self.per_host = per_host
        self._by_host = Counter()
        self.count = 0
        self.refused = Counter()  # reason -> how many, since start

    def admit(self, host):
        """The reason to refuse one more unauthenticated connection from
        ``host``, or None (then it is counted)."""
        if self.count >= self.total:
            return "too many unauthenticated connections"
        if self._by_host[host] >= self.per_host:
            return "too many unauthenticated connections from one address"
        self.count += 1
        self._by_host[host] += 1
        return None

    def release(self, host):
        self.count -= 1
        self._by_host[host] -= 1
        if self._by_host[host] <= 0:
            del self._by_host[host]


class AgentServerProtocol(WebSocketServerProtocol):
    """Thin: authenticate, then pass frames to a handler object."""

    handler = None
    claim = None
    _admitted = False
    _spending = None  # frames that arrived while the token was being spent

    # -- before the token is proven ---------------------------------------------

    def connectionMade(self):
        self._host = getattr(self.transport.getPeer(), "host", "?")
        refusal = self.factory.limits.admit(self._host)
        self._admitted = refusal is None
        super().connectionMade()
        if refusal:
            self._refused(None, refusal)
            self.transport.abortConnection()

    def _refused(self, code, reason):
        """Count and log a refusal; the ConnectionDeny to raise, if any."""
        self.factory.limits.refused[reason] += 1
        log_refusal(self._host, reason)
        return ConnectionDeny(code, reason) if code else None

    def _authenticated(self):
        if self._admitted:
            self._admitted = False
            self.factory.limits.release(self._host)

    def dataReceived(self, data):
        if self.state == self.STATE_CONNECTING and len(self.data) + len(data) > MAX_HANDSHAKE_BYTES:
            self._refused(None, "handshake over 16 KiB")
            self.transport.abortConnection()
            return
        super().dataReceived(data)

    def onConnect(self, request):
        if request.path not in ("/agent", "/file"):
            raise self._refused(404, "unknown path")
        auth = request.headers.get("authorization", "")
        scheme, _, secret = auth.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise self._refused(401, "a bearer token is required")
        if len(secret) > MAX_TOKEN_LENGTH:
            raise self._refused(403, "invalid token")
        purposes = ("agent", "resume") if request.path == "/agent" else ("file",)
        d = self.factory.daemon.store.check_token(secret, purposes)

        def check(claim):
            if self.state == self.STATE_CLOSED:
                # The agent left, or the handshake timed out, while the token
                # was checked.  Autobahn would complete the handshake on the
                # dead connection, and its ping timeout would later fail
                # inside txaio's timer bucket (a critical "Error(s) processing
                # call_later bucket").  Refusing it drops nothing: it is closed.
                raise ConnectionDeny(400, "the connection closed during the token check")
            if claim is None:
                raise self._refused(403, "invalid, used or expired token")
            self._secret, self._purposes = secret, purposes
            self.path = request.path
            if request.path == "/file":
                # The receiver pauses reading for flow control and would then
                # miss pongs: no pings on transfers.
                self.autoPingInterval = 0
                # Bulk data: read it in big pieces (Twisted reads bufferSize
                # bytes at a time, 64 KiB by default).
                self.transport.bufferSize = transfers.RELAY_BUFFER
                # The agent does not mask a transfer's frames: masking guards
                # browsers' connections against poisoned proxy caches, and
                # costs an agent a fifth of its time on bulk data.
                self.requireMaskedClientFrames = False

        return d.addCallback(check)

    def onOpen(self):
        self._spending = []

    def onMessage(self, payload, isBinary):
        if self.handler is None:
            self._spend_then(payload, isBinary)
            return
        try:
            self.handler.message(payload, isBinary)
        except Exception:
            # A bug in a handler must not cost the agent its connection.
            log.failure("handling a frame from cluster {id} failed",
                        id=self.claim["cluster_id"])

    def _spend_then(self, payload, isBinary):
        """The first frame spends the token; later ones wait until it is."""
        self._spending.append((payload, isBinary))
        if len(self._spending) > 1:
            return
        # Hold the agent's data (a transfer streams right after its header).
        self.transport.pauseProducing()
        d = self.factory.daemon.store.claim_token(self._secret, self._purposes)
        d.addCallback(self._spent)
        d.addErrback(lambda f: (log.failure("spending a token failed", f),
                                self.sendClose(1011, "hpcd could not check the token")))

    def _spent(self, claim):
        if self.state != self.STATE_OPEN:
            return
        if claim is None:
            # Another connection presented the same token first.
            self._refused(None, "token spent by another connection")
            self.sendClose(CLOSE_TOKEN_SPENT, "this token was used by another connection")
            return
        self._authenticated()
        self.claim = claim
        daemon = self.factory.daemon
        if self.path == "/agent":
            self.handler = AgentSession(daemon, self, claim)
        else:
            self.handler = daemon.transfers.connected(self, claim)
        frames, self._spending = self._spending, []
        for payload, isBinary in frames:
            self.onMessage(payload, isBinary)
        if self.state == self.STATE_OPEN:
            self.transport.resumeProducing()

    def onClose(self, wasClean, code, reason):
        self._authenticated()  # releases the pre-auth slot if still held
        if self.handler is not None:
            self.handler.lost(code, reason)

    def send_frame(self, frame):
        self.sendMessage(frame, isBinary=False)


def log_refusal(peer, reason):
    """One log event per refused connection: counted by reason in /metrics;
    the log observer (hpcd.logs) keeps a flood of them to a few lines."""
    log.warn("refused an agent connection from {peer}: {reason}", peer=peer, reason=reason,
             hpc_event="connection_refused")


def server_factory(daemon, url):
    settings = daemon.settings
    factory = WebSocketServerFactory(url)
    factory.protocol = AgentServerProtocol
    factory.daemon = daemon
    factory.limits = PreAuthLimits(int(settings.HPC_PREAUTH_MAX_CONNECTIONS),
                                   int(settings.HPC_PREAUTH_MAX_PER_ADDRESS))
    ping = float(settings.HPC_AGENT_PING_SECONDS)
    factory.setProtocolOptions(
        # A silent network cut is noticed within about four ping intervals.
        autoPingInterval=ping, autoPingTimeout=3 * ping,
        # The agent uses the same deadline (its HPC_HANDSHAKE_TIMEOUT_SECONDS).
        openHandshakeTimeout=float(settings.HPC_HANDSHAKE_TIMEOUT_SECONDS),
        # Autobahn's 1 s default aborts (and discards the close reason)
        # before a busy or distant agent has read the close frame.
        closeHandshakeTimeout=5,
        maxFramePayloadSize=wire.MAX_CONTROL_MESSAGE,
        maxMessagePayloadSize=wire.MAX_CONTROL_MESSAGE,
        # No permessage-deflate: transfers carry bulk data, and the control
        # frames are small.
        perMessageCompressionAccept=lambda offers: None)
    return factory


class Requests:
    """hpcd's outstanding requests on one connection: id -> Deferred, each
    with a timeout; every one fails when the connection goes."""

    def __init__(self, clock, describe):
        self._clock = clock
        self._describe = describe  # "the agent of cluster 3"
        self._ids = itertools.count(1)
        self._pending = {}

    def new(self, mtype, timeout):
        """``(id, Deferred)`` for a request about to be sent."""
        request_id = next(self._ids)

        def expire(d, _):
            self._pending.pop(request_id, None)
            raise Timeout(f"{self._describe} did not answer {mtype} within {timeout:g} s")

        d = defer.Deferred()
        d.addTimeout(timeout, self._clock, onTimeoutCancel=expire)
        self._pending[request_id] = d
        return request_id, d

    def answered(self, message):
        d = self._pending.pop(message["id"], None)
        if d is None:
            log.warn("{who}: reply to unknown request {rid}", who=self._describe,
                     rid=message["id"])
        elif message["ok"]:
            d.callback(message.get("result"))
        else:
            d.errback(AgentError(f"{self._describe} answered "
                                 f"{message.get('error', 'error')}: {message.get('message', '')}",
                                 message.get("error")))

    def fail_all(self, error):
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(error)


class UpdateWriter:
    """Stores an agent's updates one transaction at a time; while one is
    written the next ones gather, so batches grow with the load.  Acks go
    back only for what was stored; a failed write is acknowledged as
    ``retry``, and the agent sends it again after a short backoff."""

    def __init__(self, store, cluster_id, send_ack):
        self._store = store
        self._cluster_id = cluster_id
        self._send_ack = send_ack
        self._queued = []
        self._writing = None  # the Deferred of the write in flight

    def add(self, update):
        self._queued.append(update)
        self._next()

    def _next(self):
        if self._writing is not None or not self._queued:
            return
        batch, self._queued = self._queued, []
        self._writing = d = self._store.apply_updates(self._cluster_id, batch)

        def failed(f):
            log.failure("storing {n} updates of cluster {id} failed", f, n=len(batch),
                        id=self._cluster_id)
            self._send_ack([], retry=[u["seq"] for u in batch])

        def done(_):
            self._writing = None
            self._next()

        d.addCallbacks(self._send_ack, failed).addBoth(done)


class AgentSession:
    """One agent's control connection: its greeting, updates and requests.

    An Automat machine: the agent says hello, hpcd waits for any older
    connection of the cluster to go and issues a fresh resume token, then
    welcomes it; only then do updates and requests flow.  Its collaborators
    (the protocol, the cluster manager, the store) do the I/O.
    """

    _machine = MethodicalMachine()

    def __init__(self, daemon, protocol, claim):
        self.daemon = daemon
        self.protocol = protocol
        self.claim = claim
        self.cluster_id = claim["cluster_id"]
        self.token_id = claim["token_id"]
        #: Mirrors the machine: True in ``welcomed`` only (ClusterManager reads it).
        self.ready = False
        self.hello = None
        self.installation = None
        #: Why the agent refused this installation (it closed with
        #: CLOSE_INSTALLATION), for the cluster's status; else None.
        self.refusal = None
        self._requests = Requests(daemon.reactor, f"the agent of cluster {self.cluster_id}")
        self._writer = UpdateWriter(daemon.store, self.cluster_id, self._ack)
        self._gone = []
        self._handlers = {
            "update": lambda m: self._writer.add(m),
            "reply": self._requests.answered,
            "error": self._on_error,
        }

    def __repr__(self):
        return f"<AgentSession cluster={self.cluster_id} token={self.token_id}>"

    # -- states ------------------------------------------------------------------

    @_machine.state(initial=True)
    def unwelcomed(self):
        "Open; the agent has not said hello."

    @_machine.state()
    def taking_over(self):
        "Hello said; waiting for an older connection to go and a resume token."

    @_machine.state()
    def welcomed(self):
        "Welcomed: updates and requests flow."

    @_machine.state()
    def closed(self):
        "The connection is gone."

    # -- inputs ------------------------------------------------------------------

    @_machine.input()
    def hello_received(self, message):
        "The agent's hello, in the protocol version hpcd speaks."

    @_machine.input()
    def took_over(self, secret):
        "The cluster is this connection's now, and its resume token is issued."

    @_machine.input()
    def frame_received(self, message):
        "Any other valid frame from the agent."

    @_machine.input()
    def lost(self, code, reason):
        "The connection closed."

    # -- outputs -----------------------------------------------------------------

    @_machine.output()
    def _take_over(self, message):
        self.hello = message
        d = self.daemon.clusters.agent_hello(self)
        d.addCallback(lambda _: self.daemon.store.welcome(self.cluster_id))

        def welcome(answer):
            self.installation, (_, secret) = answer
            self.took_over(secret)

        d.addCallback(welcome)

        def failed(f):
            log.failure("greeting cluster {id} failed", f, id=self.cluster_id)
            self.close(1011, "hpcd could not take the agent in; try again")

        d.addErrback(failed)

    @_machine.output()
    def _welcome(self, secret):
        self.send(wire.encode(
            "welcome", protocol=wire.PROTOCOL_VERSION, cluster=str(self.cluster_id),
            resume_token=secret, installation=self.installation,
            resume_grace_seconds=float(self.daemon.settings.HPC_AGENT_RESUME_GRACE_SECONDS)))
        self.ready = True
        if not self.hello["nvx"]:
            log.warn("cluster {id}: the agent runs without Autobahn NVX; file transfers "
                     "from it will be slow", id=self.cluster_id)
        self.daemon.clusters.agent_ready(self).addErrback(
            lambda f: log.failure("cluster {id}: taking the agent in failed", f,
                                  id=self.cluster_id))

    @_machine.output()
    def _hello_again(self, message):
        self.send(wire.encode("error", code="bad_frame", message="hello was already said"))

    @_machine.output()
    def _not_ready(self, message):
        self._refuse(wire.ProtocolError("not_ready", "say hello first"))

    @_machine.output()
    def _handle(self, message):
        self._handlers[message["type"]](message)

    @_machine.output()
    def _fail_requests(self, code, reason):
        self._requests.fail_all(
            ClusterOffline(f"the agent of cluster {self.cluster_id} disconnected"))

    @_machine.output()
    def _forget(self, code, reason):
        if code == CLOSE_INSTALLATION:
            self.refusal = reason or "the agent refused this installation"
        self.ready = False
        self.daemon.clusters.agent_lost(self)
        log.info("cluster {id}: agent connection closed ({code} {reason})",
                 id=self.cluster_id, code=code, reason=reason)
        gone, self._gone = self._gone, None  # None: closed
        for d in gone:
            d.callback(None)

    # -- transitions -------------------------------------------------------------

    unwelcomed.upon(hello_received, enter=taking_over, outputs=[_take_over])
    unwelcomed.upon(frame_received, enter=unwelcomed, outputs=[_not_ready])
    unwelcomed.upon(lost, enter=closed, outputs=[_forget])

    taking_over.upon(took_over, enter=welcomed, outputs=[_welcome])
    taking_over.upon(hello_received, enter=taking_over, outputs=[_hello_again])
    taking_over.upon(frame_received, enter=taking_over, outputs=[_not_ready])
    taking_over.upon(lost, enter=closed, outputs=[_forget])

    welcomed.upon(frame_received, enter=welcomed, outputs=[_handle])
    welcomed.upon(hello_received, enter=welcomed, outputs=[_hello_again])
    welcomed.upon(lost, enter=closed, outputs=[_fail_requests, _forget])

    # A takeover that completes after the agent left: nothing to welcome.
    closed.upon(took_over, enter=closed, outputs=[])

    # -- frames in -----------------------------------------------------------------

    def message(self, payload, is_binary):
        if is_binary:
            self._refuse(wire.ProtocolError("bad_frame",
                                            "binary frames belong on /file connections"))
            return
        try:
            message = wire.decode(payload, accept=wire.FROM_AGENT - wire.TRANSFER_FROM_AGENT)
        except wire.ProtocolError as e:
            self._refuse(e)
            return
        if message["type"] != "hello":
            self.frame_received(message)
        elif message["protocol"] != wire.PROTOCOL_VERSION and self.hello is None:
            log.warn("cluster {id}: agent speaks protocol {theirs}, hpcd {ours}",
                     id=self.cluster_id, theirs=message["protocol"],
                     ours=wire.PROTOCOL_VERSION)
            self.close(CLOSE_PROTOCOL, f"hpcd speaks protocol {wire.PROTOCOL_VERSION}; "
                                       "upgrade the agent (hpc_install_agent)")
        else:
            self.hello_received(message)

    def _refuse(self, error):
        log.warn("cluster {cluster}: refused a frame: {error}", cluster=self.cluster_id,
                 error=error.message, hpc_event="input_refused", reason=error.code)
        self.send(wire.error_frame(error))

    def _ack(self, seqs, retry=()):
        self.send(wire.encode("ack", seqs=seqs, retry=list(retry)) if retry
                  else wire.encode("ack", seqs=seqs))

    def _on_error(self, message):
        log.warn("cluster {id}: the agent refused a frame: {code}: {message}",
                 id=self.cluster_id, code=message["code"], message=message["message"])

    # -- frames out --------------------------------------------------------------

    def send(self, frame):
        if self._gone is not None:
            self.protocol.send_frame(frame)

    def request(self, mtype, timeout=None, **fields):
        """Send a request; the Deferred fires with the reply's result."""
        if self._gone is None:
            return defer.fail(ClusterOffline(f"cluster {self.cluster_id} disconnected"))
        timeout = timeout or float(self.daemon.settings.HPC_AGENT_REQUEST_TIMEOUT)
        request_id, d = self._requests.new(mtype, timeout)
        self.send(wire.encode(mtype, id=request_id, **fields))
        return d

    def send_message(self, message):
        """Send a caller-built wire message (WebsocketToken.send_message)."""
        fields = dict(message)
        mtype = fields.pop("type", None)
        if not isinstance(mtype, str):
            raise wire.ProtocolError("bad_frame", "a message needs a 'type'")
        self.send(wire.encode(mtype, **fields))

    def close(self, code, reason):
        if self._gone is not None:
            self.protocol.sendClose(code, reason)

    def gone(self):
        """A Deferred that fires when this connection has closed."""
        d = defer.Deferred()
        if self._gone is None:
            d.callback(None)
        else:
            self._gone.append(d)
        return d
