"""The agent's websocket connection to hpcd: the wire side of the link.

The first connection presents the single-use launch token; every accepted
connection brings a new resume token (``welcome``), which the agent uses to
come back by itself after a drop, so an hpcd restart or a network blip needs
no relaunch.  *When* to retry, which credential to present and when to give
up is decided by :class:`hpc_agent.link.LinkMachine`; this module turns what
happens on the wire into its inputs and carries out its decisions.
Twisted's ClientService runs the retry loop, with the machine's backoff.
"""

import random
from urllib.parse import urlsplit

from automat import NoTransition
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.internet import ClientService
from twisted.internet import endpoints, ssl
from twisted.logger import Logger

from hpc_agent import wire
from hpc_agent.link import LinkMachine

log = Logger()

#: Close codes after which the agent must not come back.
DISMISSING = {wire.CLOSE_SUPERSEDED: "superseded", wire.CLOSE_SHUTDOWN: "shutdown",
              wire.CLOSE_PROTOCOL: "protocol", wire.CLOSE_INSTALLATION: "installation"}
#: Handshake answers that mean "this credential is no good".
REFUSING = frozenset({401, 403})


class AgentClientProtocol(WebSocketClientProtocol):
    """Thin: wire events to the :class:`Link`, frames to the AgentCore."""

    refused_status = None

    def onOpen(self):
        self.factory.link.opened(self)

    def send_frame(self, frame):
        self.sendMessage(frame, isBinary=False)

    def onMessage(self, payload, isBinary):
        if isBinary:
            self.send_frame(wire.encode(
                "error", code="bad_frame",
                message="binary frames are not part of the control protocol"))
            return
        self.factory.link.core.frame_received(payload)

    def failHandshake(self, reason):
        # Autobahn reports a refused upgrade only as text; the status line
        # it parsed is still here.
        self.refused_status = _http_status(getattr(self, "http_status_line", None))
        super().failHandshake(reason)

    def onClose(self, wasClean, code, reason):
        self.factory.link.closed(self, code, reason)


def _http_status(status_line):
    try:
        return int(status_line.split()[1])
    except (AttributeError, IndexError, ValueError):
        return None


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


class _Reported:
    """An endpoint that tells the link (and the log) why an attempt failed
    before any connection was made (ClientService only says it will retry)."""

    def __init__(self, endpoint, url, link):
        self._endpoint = endpoint
        self._url = url
        self._link = link

    def connect(self, factory):
        def failed(failure):
            why = failure.getErrorMessage()
            log.warn("connecting to {url} failed: {why}", url=self._url, why=why)
            self._link.event("attempt_failed", why)
            return failure

        return self._endpoint.connect(factory).addErrback(failed)


class Link:
    """Keeps one control connection to hpcd for an AgentCore.

    ``on_give_up(why)`` is called once when the agent should exit.
    """

    def __init__(self, reactor, core, url, token, reconnect_seconds, ca_file, on_give_up,
                 ping_seconds=10, handshake_timeout=15):
        self.reactor = reactor
        self.core = core
        self.on_give_up = on_give_up
        self.protocol = None
        self.machine = LinkMachine(self, reactor, reconnect_seconds)
        core.on_welcome = lambda token, grace: self.event("welcomed", token, grace)
        core.on_refuse = self.refuse
        self._refused = None  # why the agent itself closed for good
        base = url.rstrip("/")
        self.factory = WebSocketClientFactory(f"{base}/agent")
        self.factory.protocol = AgentClientProtocol
        self.factory.link = self
        self.factory.setProtocolOptions(
            autoPingInterval=ping_seconds, autoPingTimeout=3 * ping_seconds,
            # As long as hpcd waits: a busy hpcd (50 agents launched at once)
            # takes longer than Autobahn's 5 s default.
            openHandshakeTimeout=handshake_timeout,
            # Time for hpcd to read why the agent leaves (Autobahn's 1 s is short).
            closeHandshakeTimeout=5,
            maxFramePayloadSize=wire.MAX_CONTROL_MESSAGE,
            maxMessagePayloadSize=wire.MAX_CONTROL_MESSAGE)
        self.use_credential(token)
        self.service = ClientService(
            _Reported(client_endpoint(reactor, base, ca_file), base, self), self.factory,
            retryPolicy=self._retry_delay)

    def _retry_delay(self, _attempts):
        # ClientService counts a TCP connection as success even when the
        # handshake then fails: the machine counts attempts instead.
        delay = self.machine.retry_delay()
        return delay + random.uniform(0, delay / 4)

    def start(self):
        self.event("start")
        self.service.startService()

    def stop(self):
        self.event("stop")
        return self.service.stopService()

    def event(self, name, *args):
        """Feed one input to the machine; a bug there is logged, never raised
        into the network code that reported the event."""
        try:
            getattr(self.machine, name)(*args)
        except NoTransition as e:
            log.error("the agent's link got {event} when it did not expect it: {e}",
                      event=name, e=e)

    # -- the wire's events -----------------------------------------------------

    def opened(self, protocol):
        self.protocol = protocol
        self.event("opened")

    def closed(self, protocol, code, reason):
        if protocol is not self.protocol:
            # It never opened.
            if protocol.refused_status in REFUSING:
                self.event("credential_refused", protocol.refused_status)
            else:
                self.event("attempt_failed", reason or "the opening handshake failed")
            return
        self.protocol = None
        self.core.lost()
        if self._refused is not None:
            self.event("dismissed", *self._refused)
        elif code in DISMISSING:
            self.event("dismissed", code, reason)
        else:
            self.event("lost", code, reason)

    def refuse(self, code, reason):
        """The agent closes the connection for good (hpcd sees ``code``
        and records ``reason``); it exits once the connection is closed."""
        self._refused = (code, reason)
        if self.protocol is not None:
            # A close reason is at most 123 bytes of UTF-8.
            self.protocol.sendClose(code, reason.encode("utf-8")[:123].decode("utf-8", "ignore"))

    # -- the machine's decisions -----------------------------------------------

    def greet(self):
        self.core.connected(self.protocol.send_frame)

    def ready(self):
        self.core.ready()

    def use_credential(self, token):
        self.factory.headers = {"Authorization": f"Bearer {token}"}

    def give_up(self, why):
        log.warn("agent stopping: {why}", why=why)
        self.on_give_up(why)
