"""``twistd hpcd``: the options and the service tree.

``makeService`` sets Django up from ``--settings`` (or
``DJANGO_SETTINGS_MODULE``) and returns the :class:`Daemon`, a
``MultiService`` whose start order matters: the two listeners first (the
agents' websocket and Django's Unix socket), and only once both listen its
child services, in order: the database pool, the cluster manager and the
dispatcher (which hand agents the listener's real address).  It then tells
systemd (or a test) it is ready by sending ``READY=1`` to ``$NOTIFY_SOCKET``.
"""

import os
import resource
import socket
import sys

from twisted.application import service
from twisted.internet import defer, endpoints, task
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python import failure, usage

from djangoapp.ipc import socket_path
from hpcd import control_socket, logs
from hpcd.control_socket import StartupError
from hpcd.stamp import SessionsStamp

log = Logger()


class Options(usage.Options):
    synopsis = "[--settings MODULE] [--pythonpath DIR] [--log-format text|json]"
    longdesc = ("Runs the hpc-job-controller daemon: the websocket server for cluster "
                "agents, the Unix socket Django talks to, and the agents' launcher.")
    optParameters = [
        ["settings", "s", None,
         "Django settings module (default: $DJANGO_SETTINGS_MODULE)."],
        ["pythonpath", None, None,
         "A directory to put first on sys.path (your Django project's)."],
        ["log-format", None, "text",
         "text, or json: one JSON object per line (time, level, namespace, text, and "
         "the event's fields such as cluster and job)."],
    ]

    def opt_version(self):
        """Print hpcd's version and exit."""
        from hpc_agent import __version__

        print(f"hpcd (hpc-job-controller) {__version__}")
        sys.exit(0)

    def postOptions(self):
        if self["log-format"] not in logs.FORMATS:
            raise usage.UsageError(f"--log-format must be one of {', '.join(logs.FORMATS)}, "
                                   f"not {self['log-format']!r}")


def setup_django(options):
    if options["pythonpath"]:
        sys.path.insert(0, os.path.abspath(options["pythonpath"]))
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if options["settings"]:
        os.environ["DJANGO_SETTINGS_MODULE"] = options["settings"]
    if not os.environ.get("DJANGO_SETTINGS_MODULE"):
        raise usage.UsageError("name the Django settings with --settings or "
                               "DJANGO_SETTINGS_MODULE")
    import django

    django.setup()


def run_system_checks():
    """Django's system checks, as ``manage.py check`` runs them (djangoapp's
    among them: djangoapp/checks.py).  Warnings go to stderr; errors stop
    hpcd before it listens anywhere, with their messages."""
    from django.core.management.base import SystemCheckError
    from django.core.management.commands.check import Command

    from djangoapp import checks

    checks.IN_HPCD = True  # a missing socket directory is an error here
    try:
        Command(stdout=sys.stderr, stderr=sys.stderr).check(display_num_errors=False)
    except SystemCheckError as e:
        sys.stderr.write(f"hpcd: not starting: the settings have errors.\n{e}\n")
        sys.exit(1)


def makeService(options):
    from hpc_agent import malloc

    malloc.keep_freed_memory()  # file transfers: see hpc_agent.malloc
    setup_django(options)
    run_system_checks()
    from twisted.internet import reactor

    from djangoapp.conf import hpc_settings

    from hpcd.metrics import MetricsUnavailable

    try:
        daemon = Daemon(reactor, hpc_settings)
    except MetricsUnavailable as e:
        sys.stderr.write(f"hpcd: not starting: {e}\n")
        sys.exit(1)
    # twistd builds its log observer only after this returns, from the
    # application's ILogObserver component if there is one (setServiceParent).
    daemon.log_observer, daemon.log_limiter = logs.observer_for(
        getattr(options, "parent", None), options["log-format"],
        hpc_settings.HPC_LOG_WARNINGS_PER_SECOND)
    return daemon


def notify_ready():
    """``READY=1`` to systemd's notification socket, if there is one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(b"READY=1")


class Daemon(service.MultiService):
    """hpcd: every long-lived part, and what they share."""

    def __init__(self, reactor, settings):
        super().__init__()
        from hpcd.agents import server_factory
        from hpcd.clusters import ClusterManager
        from hpcd.dispatch import Dispatcher
        from hpcd.ipc import ControlFactory
        from hpcd.launch import Launcher, LocalLauncher, LoginLimiter, SSHLauncher
        from hpcd.metrics import EventStats, MetricsListener
        from hpcd.shells import Shells
        from hpcd.store import Store
        from hpcd.transfers import Transfers
        from hpcd.watchdog import StuckJobs

        self.reactor = reactor
        self.settings = settings
        self.public_url = None
        self.store = Store(reactor, int(settings.HPC_DB_THREADS))
        self.store.setServiceParent(self)
        limiter = LoginLimiter(reactor, int(settings.HPC_SSH_LOGINS_PER_MINUTE))
        launcher = Launcher(LocalLauncher(reactor), SSHLauncher(reactor, limiter))
        self.clusters = ClusterManager(reactor, self.store, launcher, settings,
                                       lambda: self.public_url)
        self.clusters.setServiceParent(self)
        self.shells = Shells(reactor, self.store, limiter,
                             float(settings.HPC_SSH_SESSION_IDLE_SECONDS))
        self.dispatcher = Dispatcher(reactor, self.store, self.clusters,
                                     float(settings.HPC_DISPATCH_SCAN_SECONDS))
        self.dispatcher.setServiceParent(self)
        StuckJobs(reactor, self.store, self.clusters,
                  float(settings.HPC_STUCK_JOB_SECONDS)).setServiceParent(self)
        self.clusters.on_online = lambda cluster_id: self.dispatcher.scan_soon()
        self.transfers = Transfers(self)
        self._server_factory = server_factory
        self._control_factory = ControlFactory(self)
        # No "Starting factory" lines (AMP's per-connection lines are
        # filtered out by hpcd.logs).
        self._control_factory.noisy = False
        self._ports = []
        self._socket_lock = None
        self.stamp = None  # hpcd.stamp.SessionsStamp, once bound
        self.started_at = None
        self.event_stats = EventStats()
        self.log_observer = self.log_limiter = None
        self._log_flush = None
        if settings.HPC_METRICS_ENDPOINT:
            # Fails at once, with what to install, if prometheus_client is missing.
            self.metrics = MetricsListener(self, settings.HPC_METRICS_ENDPOINT,
                                           float(settings.HPC_METRICS_JOB_COUNT_SECONDS))
            self.metrics.setServiceParent(self)
        else:
            self.metrics = None

    def setServiceParent(self, parent):
        super().setServiceParent(parent)
        # twistd's Application: hand it hpcd's log observer (hpcd.logs).
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)

    def _websocket_endpoint(self):
        s = self.settings
        if s.HPC_WEBSOCKET_ENDPOINT:
            return endpoints.serverFromString(self.reactor, s.HPC_WEBSOCKET_ENDPOINT)
        interface = s.HPC_WEBSOCKET_INTERFACE
        kind = endpoints.TCP6ServerEndpoint if ":" in interface else endpoints.TCP4ServerEndpoint
        return kind(self.reactor, int(s.HPC_WEBSOCKET_PORT), interface=interface)

    def _public_url(self, port):
        s = self.settings
        if s.HPC_WEBSOCKET_PUBLIC_URL:
            # "{port}" stands for the port really listened on (an endpoint
            # on port 0, or a socket handed over by systemd).
            url = s.HPC_WEBSOCKET_PUBLIC_URL.replace("{port}", str(port.getHost().port))
            return url.rstrip("/")
        host = s.HPC_WEBSOCKET_INTERFACE
        if host in ("", "0.0.0.0", "::"):
            host = socket.getfqdn()
        elif ":" in host:
            host = f"[{host}]"
        return f"ws://{host}:{port.getHost().port}"

    def privilegedStartService(self):
        """Bind both listeners now, before the reactor runs, so that a start
        that cannot work (a port in use, an unsafe or missing socket
        directory, another hpcd) exits at once with one line saying why."""
        from hpc_agent import __version__

        log.info("hpcd {version} starting, pid {pid}, settings {settings}", version=__version__,
                 pid=os.getpid(), settings=os.environ.get("DJANGO_SETTINGS_MODULE"))
        raise_file_limit()
        try:
            self._bind()
        except StartupError as e:
            for port in self._ports:
                port.stopListening()
            self._ports = []
            # Printed once, on stderr (which twistd sends to its log).
            raise SystemExit(f"hpcd cannot start: {e}") from None
        super().privilegedStartService()

    def _bind(self):
        s = self.settings
        factory = self._server_factory(self, "ws://localhost")
        factory.noisy = False
        ws_port = _listened(
            self._websocket_endpoint().listen(factory),
            lambda why: f"cannot listen for agents ({why}); set HPC_WEBSOCKET_PORT or "
                        "HPC_WEBSOCKET_ENDPOINT, or stop what uses the port")
        self._ports.append(ws_port)
        self.public_url = self._public_url(ws_port)
        path = socket_path()
        group = s.HPC_IPC_SOCKET_GROUP
        self._socket_lock = control_socket.prepare(path, not s.HPC_IPC_UNIX_SOCKET, group)
        # Owner-only from the first moment; the configured mode comes after.
        old_umask = os.umask(0o077)
        try:
            unix_port = _listened(
                endpoints.UNIXServerEndpoint(self.reactor, path, mode=0o600,
                                             wantPID=False).listen(self._control_factory),
                lambda why: f"cannot listen on {path} ({why})")
        finally:
            os.umask(old_umask)
        self._ports.append(unix_port)
        control_socket.finish(path, int(s.HPC_IPC_SOCKET_MODE), group)
        # Beside the socket, with its mode: lets Django keep IsClusterOnline
        # answers until a session comes or goes (hpcd.stamp).
        stamp = SessionsStamp(path)
        try:
            stamp.open(int(s.HPC_IPC_SOCKET_MODE),
                       control_socket.group_id(group) if group else -1)
        except OSError as e:
            raise StartupError(f"cannot write {stamp.path} ({e.strerror or e})") from None
        self.stamp = stamp
        self.clusters.on_sessions_changed = stamp.bump
        log.info("hpcd listening: agents at {url}, Django at {path}", url=self.public_url,
                 path=path)

    def startService(self):
        self.started_at = self.reactor.seconds()
        globalLogPublisher.addObserver(self.event_stats)
        if self.log_limiter is not None:
            self._log_flush = task.LoopingCall(self.log_limiter.flush)
            self._log_flush.clock = self.reactor
            self._log_flush.start(1.0, now=False)
        # The children, in the order they were added: the database pool,
        # then the cluster manager and the dispatcher, which hand agents the
        # listener's real address and so start only once it is known, and
        # the metrics listener (whose /healthz asks the Unix socket).
        super().startService()
        ready = self.metrics.port_ready if self.metrics is not None else defer.succeed(None)
        # Not before the reactor runs: twistd starts the services first, and
        # until reactor.run() installs its handlers a SIGTERM (systemd stopping
        # a unit it was just told is ready) kills hpcd without its clean stop.
        ready.addCallback(lambda _: self.reactor.callWhenRunning(notify_ready))
        ready.addErrback(self._failed_to_start)

    def _failed_to_start(self, failure):
        log.failure("hpcd could not start", failure)
        self.reactor.stop()

    @defer.inlineCallbacks
    def stopService(self):
        for port in self._ports:
            yield port.stopListening()
        self._ports = []
        if self.stamp is not None:
            self.stamp.close()
            self.stamp = None
        if self._socket_lock is not None:
            self._socket_lock.unlock()
            self._socket_lock = None
        yield self.shells.close_all()
        # The children in reverse: metrics, dispatcher, cluster manager,
        # database pool.
        yield super().stopService()
        if self._log_flush is not None and self._log_flush.running:
            self._log_flush.stop()
            self.log_limiter.flush()
        globalLogPublisher.removeObserver(self.event_stats)


def raise_file_limit(ceiling=65536):
    """Raise the soft limit on open files to the hard one (at most
    ``ceiling``): every agent and every transfer holds a descriptor, and the
    usual soft limit of 1,024 is soon reached.  At the limit, new connections
    wait in the kernel's listen backlog until descriptors free up (Twisted
    logs "Out of file descriptors"); Django's socket is one of them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, max(soft, ceiling))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    log.info("hpcd may hold {n} open files", n=resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _listened(d, describe):
    """The port a just-made ``listen()`` Deferred holds; TCP and Unix
    endpoints bind synchronously, so it has fired already."""
    result = []
    d.addBoth(result.append)
    if not result:
        raise StartupError(describe("the endpoint did not bind at once; use a tcp:, ssl:, "
                                    "unix: or systemd: endpoint"))
    if isinstance(result[0], failure.Failure):
        raise StartupError(describe(result[0].getErrorMessage()))
    return result[0]
