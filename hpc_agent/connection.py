"""The agent's websocket connection to hpcd, kept up with backoff.

The first connection presents the single-use launch token; every accepted
connection brings a new resume token (``welcome``), which the agent uses to
come back by itself after a drop, so an hpcd restart or a network blip needs
no relaunch.  When hpcd refuses the credential, or nothing works for
``HPC_RECONNECT_SECONDS``, the agent exits and leaves the relaunch to hpcd.
"""

from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import endpoints, ssl
from twisted.logger import Logger

from hpc_agent import wire
from hpc_agent.wire import CLOSE_SHUTDOWN, CLOSE_SUPERSEDED

log = Logger()


class AgentClientProtocol(WebSocketClientProtocol):
    """Thin: frames in and out of the :class:`AgentCore`."""

    def onOpen(self):
        self.factory.link.opened(self)
        self.factory.core.connected(self._send_frame)

    def _send_frame(self, frame):
        self.sendMessage(frame, isBinary=False)

    def onMessage(self, payload, isBinary):
        if isBinary:
            self._send_frame(wire.encode(
                "error", code="bad_frame",
                message="binary frames are not part of the control protocol"))
            return
        self.factory.core.frame_received(payload)

    def failHandshake(self, reason):
        # Autobahn reports a refused upgrade only as text; keep the status.
        self.factory.link.refused(reason)
        super().failHandshake(reason)

    def onClose(self, wasClean, code, reason):
        self.factory.core.lost()
        self.factory.link.closed(self, code, reason)


def client_endpoint(reactor, url, ca_file=None):
    """A Twisted client endpoint for a ``ws://`` or ``wss://`` URL.

    For ``wss`` the server's certificate is always verified (Autobahn's
    default TLS context does not), against ``ca_file`` or the system store.
    """
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    endpoint = endpoints.HostnameEndpoint(reactor, parts.hostname, port, timeout=15)
    if secure:
        trust = None
        if ca_file:
            with open(ca_file, "rb") as f:
                trust = ssl.Certificate.loadPEM(f.read())
        options = ssl.optionsForClientTLS(parts.hostname, trustRoot=trust)
        endpoint = endpoints.wrapClientTLS(options, endpoint)
    return endpoint


class _Logged:
    """An endpoint that says in the log why a connection attempt failed
    (ClientService only says it will retry)."""

    def __init__(self, endpoint, url):
        self._endpoint = endpoint
        self._url = url

    def connect(self, factory):
        def failed(failure):
            log.warn("connecting to {url} failed: {why}", url=self._url,
                     why=failure.getErrorMessage())
            return failure

        return self._endpoint.connect(factory).addErrback(failed)


class Link:
    """Keeps one control connection to hpcd alive for an :class:`AgentCore`."""

    def __init__(self, reactor, core, url, token, reconnect_seconds, ca_file, on_give_up,
                 ping_seconds=10):
        self.reactor = reactor
        self.core = core
        self.token = token
        self.reconnect_seconds = reconnect_seconds
        self.on_give_up = on_give_up
        self.protocol = None
        self._refused = None
        self._deadline = None
        base = url.rstrip("/")
        self.factory = WebSocketClientFactory(f"{base}/agent")
        self.factory.protocol = AgentClientProtocol
        self.factory.core = core
        self.factory.link = self
        self.factory.setProtocolOptions(
            autoPingInterval=ping_seconds, autoPingTimeout=3 * ping_seconds,
            maxFramePayloadSize=wire.MAX_CONTROL_MESSAGE,
            maxMessagePayloadSize=wire.MAX_CONTROL_MESSAGE)
        self._set_credential(token)
        self.service = ClientService(
            _Logged(client_endpoint(reactor, base, ca_file), base), self.factory,
            # Capped well below hpcd's resume grace period (15 s), so an agent is
            # back before hpcd would launch a replacement.
            retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=8.0),
            prepareConnection=self._prepare)

    def _set_credential(self, token):
        self.factory.headers = {"Authorization": f"Bearer {token}"}

    def _prepare(self, protocol):
        self._refused = None

    def start(self):
        self._deadline = self.reactor.callLater(self.reconnect_seconds, self._give_up,
                                                "could not reach hpcd")
        self.service.startService()

    def stop(self):
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        return self.service.stopService()

    # -- events from the protocol --------------------------------------------

    def opened(self, protocol):
        self.protocol = protocol
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def refused(self, reason):
        self._refused = reason

    def closed(self, protocol, code, reason):
        if protocol is self.protocol:
            self.protocol = None
        if self.core.resume_token:
            # Every welcome rotates it; the old launch token is spent.
            self._set_credential(self.core.resume_token)
        if self._refused and ("[401]" in self._refused or "[403]" in self._refused):
            self._give_up(f"hpcd refused the agent's credential ({self._refused})")
        elif code in (CLOSE_SUPERSEDED, CLOSE_SHUTDOWN, wire.CLOSE_PROTOCOL):
            self._give_up(f"hpcd closed the connection for good ({code}: {reason})")
        elif self._deadline is None:
            log.info("lost hpcd ({code} {reason}); reconnecting for up to {s} s",
                     code=code, reason=reason, s=self.reconnect_seconds)
            self._deadline = self.reactor.callLater(
                self.reconnect_seconds, self._give_up, "could not reconnect to hpcd")

    def _give_up(self, why):
        log.warn("agent stopping: {why}", why=why)
        self.on_give_up(why)
