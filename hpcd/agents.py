"""The websocket server agents connect to.

``/agent`` is an agent's control connection, ``/file`` one file transfer.
The token in the ``Authorization: Bearer`` header is checked (and spent)
before the upgrade completes; anything else is refused with 401/403.  The
protocol class only decodes and hands over: :class:`AgentSession` holds a
control connection's logic, :mod:`hpcd.transfers` a transfer's.
"""

import itertools

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer
from twisted.logger import Logger

from hpc_agent import wire
from hpc_agent.wire import CLOSE_PROTOCOL
from djangoapp.protocol import AgentError, ClusterOffline, Timeout

log = Logger()

MAX_TOKEN_LENGTH = 256


class AgentServerProtocol(WebSocketServerProtocol):
    """Thin: authenticate, then pass frames to a handler object."""

    handler = None

    def onConnect(self, request):
        if request.path not in ("/agent", "/file"):
            raise _refused(request, 404, "unknown path")
        auth = request.headers.get("authorization", "")
        scheme, _, secret = auth.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise _refused(request, 401, "a bearer token is required")
        if len(secret) > MAX_TOKEN_LENGTH:
            raise _refused(request, 403, "invalid token")
        purposes = ("agent", "resume") if request.path == "/agent" else ("file",)
        d = self.factory.daemon.store.claim_token(secret, purposes)

        def check(claim):
            if claim is None:
                raise _refused(request, 403, "invalid, used or expired token")
            self.claim = claim
            self.path = request.path
            if request.path == "/file":
                # The receiver pauses reading for flow control and would then
                # miss pongs: no pings on transfers.
                self.autoPingInterval = 0

        return d.addCallback(check)

    def onOpen(self):
        daemon = self.factory.daemon
        if self.path == "/agent":
            self.handler = AgentSession(daemon, self, self.claim)
        else:
            self.handler = daemon.transfers.connected(self, self.claim)

    def onMessage(self, payload, isBinary):
        try:
            self.handler.message(payload, isBinary)
        except Exception:
            # A bug in a handler must not cost the agent its connection.
            log.failure("handling a frame from cluster {id} failed",
                        id=self.claim["cluster_id"])

    def onClose(self, wasClean, code, reason):
        if self.handler is not None:
            self.handler.lost(code, reason)

    def send_frame(self, frame):
        self.sendMessage(frame, isBinary=False)


def _refused(request, code, reason):
    """Log a refused connection (counted by reason in /metrics) and say no."""
    log.warn("refused a connection to {path} from {peer}: {reason}", path=request.path,
             peer=request.peer, reason=reason, hpc_event="connection_refused")
    return ConnectionDeny(code, reason)


def server_factory(daemon, url):
    factory = WebSocketServerFactory(url)
    factory.protocol = AgentServerProtocol
    factory.daemon = daemon
    ping = float(daemon.settings.HPC_AGENT_PING_SECONDS)
    factory.setProtocolOptions(
        # A silent network cut is noticed within about four ping intervals.
        autoPingInterval=ping, autoPingTimeout=3 * ping, openHandshakeTimeout=15,
        # Autobahn's 1 s default aborts (and discards the close reason)
        # before a busy or distant agent has read the close frame.
        closeHandshakeTimeout=5,
        maxFramePayloadSize=wire.MAX_CONTROL_MESSAGE,
        maxMessagePayloadSize=wire.MAX_CONTROL_MESSAGE,
        # No permessage-deflate: transfers carry bulk data, and the control
        # frames are small.
        perMessageCompressionAccept=lambda offers: None)
    return factory


class AgentSession:
    """One agent's control connection: its greeting, updates and requests."""

    def __init__(self, daemon, protocol, claim):
        self.daemon = daemon
        self.protocol = protocol
        self.cluster_id = claim["cluster_id"]
        self.token_id = claim["token_id"]
        self.ready = False
        self.hello = None
        self._ids = itertools.count(1)
        self._pending = {}
        self._updates = []
        self._writing = False
        self._gone = []
        self._closed = False
        self._handlers = {
            "hello": self._on_hello,
            "update": self._on_update,
            "reply": self._on_reply,
            "error": self._on_error,
        }

    def __repr__(self):
        return f"<AgentSession cluster={self.cluster_id} token={self.token_id}>"

    # -- frames in ---------------------------------------------------------------

    def message(self, payload, is_binary):
        if is_binary:
            self._refuse(wire.ProtocolError("bad_frame",
                                            "binary frames belong on /file connections"))
            return
        try:
            message = wire.decode(payload, accept=wire.FROM_AGENT - {
                "file_header", "file_end", "file_error"})
        except wire.ProtocolError as e:
            self._refuse(e)
            return
        if not self.ready and message["type"] != "hello":
            self._refuse(wire.ProtocolError("not_ready", "say hello first"))
            return
        self._handlers[message["type"]](message)

    def _refuse(self, error):
        log.warn("cluster {cluster}: refused a frame: {error}", cluster=self.cluster_id,
                 error=error.message, hpc_event="input_refused", reason=error.code)
        self.send(wire.error_frame(error))

    def _on_hello(self, message):
        if self.hello is not None:
            self.send(wire.encode("error", code="bad_frame", message="hello was already said"))
            return
        if message["protocol"] != wire.PROTOCOL_VERSION:
            log.warn("cluster {id}: agent speaks protocol {theirs}, hpcd {ours}",
                     id=self.cluster_id, theirs=message["protocol"],
                     ours=wire.PROTOCOL_VERSION)
            self.close(CLOSE_PROTOCOL, f"hpcd speaks protocol {wire.PROTOCOL_VERSION}; "
                                       "upgrade the agent (hpc_install_agent)")
            return
        self.hello = message
        d = self.daemon.clusters.agent_hello(self)
        d.addCallback(lambda _: self.daemon.store.issue_token(self.cluster_id, "resume", None))
        d.addCallback(self._welcome)
        d.addErrback(lambda f: log.failure("greeting cluster {id} failed", f,
                                           id=self.cluster_id))

    def _welcome(self, token):
        if self._closed:
            return
        _, secret = token
        self.send(wire.encode("welcome", protocol=wire.PROTOCOL_VERSION,
                              cluster=str(self.cluster_id), resume_token=secret))
        self.ready = True
        if not self.hello["nvx"]:
            log.warn("cluster {id}: the agent runs without Autobahn NVX; file transfers "
                     "from it will be slow", id=self.cluster_id)
        self.daemon.clusters.agent_ready(self).addErrback(
            lambda f: log.failure("cluster {id}: taking the agent in failed", f,
                                  id=self.cluster_id))

    def _on_update(self, message):
        self._updates.append(message)
        self._write_updates()

    def _write_updates(self):
        """Store queued updates in one transaction at a time; while one is
        written the next ones gather, so batches grow with the load."""
        if self._writing or not self._updates:
            return
        batch, self._updates = self._updates, []
        self._writing = True
        d = self.daemon.store.apply_updates(self.cluster_id, batch)

        def stored(seqs):
            self.send(wire.encode("ack", seqs=seqs))

        def failed(f):
            # Not acknowledged: the agent sends them again.
            log.failure("storing {n} updates of cluster {id} failed", f, n=len(batch),
                        id=self.cluster_id)

        def next_batch(_):
            self._writing = False
            self._write_updates()

        d.addCallbacks(stored, failed).addBoth(next_batch)

    def _on_reply(self, message):
        d = self._pending.pop(message["id"], None)
        if d is None:
            log.warn("cluster {id}: reply to unknown request {rid}", id=self.cluster_id,
                     rid=message["id"])
        elif message["ok"]:
            d.callback(message.get("result"))
        else:
            d.errback(AgentError(f"the agent of cluster {self.cluster_id} answered "
                                 f"{message.get('error', 'error')}: {message.get('message', '')}",
                                 message.get("error")))

    def _on_error(self, message):
        log.warn("cluster {id}: the agent refused a frame: {code}: {message}",
                 id=self.cluster_id, code=message["code"], message=message["message"])

    # -- frames out --------------------------------------------------------------

    def send(self, frame):
        if not self._closed:
            self.protocol.send_frame(frame)

    def request(self, mtype, timeout=None, **fields):
        """Send a request; the Deferred fires with the reply's result."""
        if self._closed:
            return defer.fail(ClusterOffline(f"cluster {self.cluster_id} disconnected"))
        request_id = next(self._ids)
        timeout = timeout or float(self.daemon.settings.HPC_AGENT_REQUEST_TIMEOUT)

        def expire(d, _):
            self._pending.pop(request_id, None)
            raise Timeout(f"the agent of cluster {self.cluster_id} did not answer "
                          f"{mtype} within {timeout:g} s")

        d = defer.Deferred()
        d.addTimeout(timeout, self.daemon.reactor, onTimeoutCancel=expire)
        self._pending[request_id] = d
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
        if not self._closed:
            self.protocol.sendClose(code, reason)

    # -- the end -----------------------------------------------------------------

    def gone(self):
        """A Deferred that fires when this connection has closed."""
        d = defer.Deferred()
        if self._closed:
            d.callback(None)
        else:
            self._gone.append(d)
        return d

    def lost(self, code, reason):
        self._closed = True
        self.ready = False
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(ClusterOffline(f"the agent of cluster {self.cluster_id} disconnected"))
        self.daemon.clusters.agent_lost(self)
        log.info("cluster {id}: agent connection closed ({code} {reason})",
                 id=self.cluster_id, code=code, reason=reason)
        for d in self._gone:
            d.callback(None)
        self._gone = []
