"""What hpcd counts, and the HTTP listener that shows it: /metrics and /healthz.

The numbers are kept in plain objects that cost nothing to update and need
no library: :class:`DatabaseStats` (filled by ``Store.run``),
:class:`EventStats` (a log observer counting the job events that
dispatch, the store and the agents' server log with a ``hpc_event``
field, so one call at each site makes both the log line and the count)
and :func:`live_status` (the connected agents, transfers and requests in
flight, read from the daemon on the reactor thread; the ``Status`` AMP
command answers with it too).

Only when ``HPC_METRICS_ENDPOINT`` is set does :class:`MetricsListener`
import ``prometheus_client`` (the ``metrics`` extra) and serve them.  Its
Twisted resource runs the exposition on the reactor's thread pool, so the
collector never touches the ORM or the daemon's dicts from there: it asks
the reactor thread for a snapshot, and the job counts come from a cache a
LoopingCall refreshes through the store's own thread pool.
"""

import bisect
import os
import threading

from twisted.application import service
from twisted.internet import defer, endpoints, task, threads
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python import threadable
from twisted.web import resource, server

import hpc_agent
from djangoapp import protocol as commands

log = Logger()

#: Seconds: request latencies from a millisecond to a few minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 300.0)

#: Seconds /healthz waits for each of its round trips.
HEALTH_TIMEOUT = 5.0


class Histogram:
    """Counts of observations per bucket, and their sum; thread-safe."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value):
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value

    def snapshot(self):
        """``([(upper bound, cumulative count), ..., ("+Inf", total)], sum)``."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], counts):
            running += count
            cumulative.append((bound, running))
        return cumulative, total

    @property
    def count(self):
        with self._lock:
            return sum(self._counts)


class DatabaseStats:
    """The store's queue: tasks waiting for a thread, running, and how long
    each kind waited and ran.  Updated from the reactor and the pool."""

    def __init__(self):
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self.wait = {}  # task -> Histogram
        self.run = {}
        self.total = {}

    def _histograms(self, task_name):
        if task_name not in self.wait:
            self.wait[task_name] = Histogram()
            self.run[task_name] = Histogram()
            self.total[task_name] = Histogram()
        return self.wait[task_name], self.run[task_name], self.total[task_name]

    def queued(self):
        with self._lock:
            self.waiting += 1

    def started(self, task_name, waited):
        with self._lock:
            self.waiting -= 1
            self.running += 1
            wait, _, _ = self._histograms(task_name)
        wait.observe(waited)

    def finished(self, task_name, waited, ran):
        with self._lock:
            self.running -= 1
            _, run, total = self._histograms(task_name)
        run.observe(ran)
        total.observe(waited + ran)


#: hpc_event -> (family, label: the event field holding its value).
_COUNTED = {
    "dispatched": ("dispatched", "action"),
    "dispatch_failed": ("dispatch_failures", "action"),
    "state_change": ("state_changes", "new"),
    "update_refused": ("refused_updates", "reason"),
    "connection_refused": ("refused_connections", "reason"),
    "input_refused": ("refused_inputs", "reason"),
}


class EventStats:
    """A log observer counting job events by their ``hpc_event`` field.

    Every event reaches it, also those the log's rate limit holds back.
    Called from the reactor and from the database threads.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.counts = {family: {} for family, _ in _COUNTED.values()}
        self.dispatch_seconds = {}  # action -> Histogram

    def __call__(self, event):
        kind = event.get("hpc_event")
        if kind is None:
            return
        if kind == "dispatch_answered":
            action = str(event.get("action"))
            with self._lock:
                histogram = self.dispatch_seconds.setdefault(action, Histogram())
            histogram.observe(float(event.get("seconds", 0.0)))
            return
        counted = _COUNTED.get(kind)
        if counted is None:
            return
        family, field = counted
        label = str(event.get(field, ""))
        with self._lock:
            self.counts[family][label] = self.counts[family].get(label, 0) + 1

    def snapshot(self):
        with self._lock:
            return ({family: dict(values) for family, values in self.counts.items()},
                    dict(self.dispatch_seconds))


def live_status(daemon):
    """What hpcd knows that the database does not; on the reactor thread.

    A JSON-able dict: the ``Status`` AMP command's answer, and the live half
    of /metrics.
    """
    clusters = daemon.clusters
    now = daemon.reactor.seconds()
    cluster_rows = []
    for cluster_id in sorted(set(clusters.links) | set(clusters.sessions)):
        info = clusters.infos.get(cluster_id, {})
        session = clusters.session(cluster_id)
        hello = session.hello if session is not None else None
        link = clusters.links.get(cluster_id)
        since = clusters.changed.get(cluster_id)
        cluster_rows.append({
            "id": cluster_id,
            "host_name": info.get("host_name"),
            "online": session is not None,
            "since": since,
            "agent_version": hello["agent_version"] if hello else None,
            "agent_host": hello["hostname"] if hello else None,
            "scheduler": hello["scheduler"] if hello else None,
            "launch_failures": link.failures if link is not None else 0,
        })
    transfers = [{"cluster": t.cluster_id, "job": t.job_id, "path": t.path,
                  "bytes": t.received, "size": t.size, "seconds": now - t.started}
                 for t in daemon.transfers.active.values()]
    db = daemon.store.stats
    return {
        "version": hpc_agent.__version__,
        "pid": os.getpid(),
        "started": daemon.started_at,
        "uptime_seconds": now - daemon.started_at if daemon.started_at else 0.0,
        "agents_url": daemon.public_url,
        "clusters": cluster_rows,
        "agents_connected": len(clusters.sessions),
        "transfers": transfers,
        "transfer_bytes": daemon.transfers.bytes_done + sum(t["bytes"] for t in transfers),
        "transfers_done": dict(daemon.transfers.done),
        "dispatch_in_flight": daemon.dispatcher.in_flight,
        "db_tasks_waiting": db.waiting,
        "db_tasks_running": db.running,
        "db_threads": daemon.store.pool.max,
    }


# -- the HTTP listener -----------------------------------------------------------

class _Collector:
    """prometheus_client's view of the numbers above."""

    def __init__(self, listener):
        self._listener = listener

    def describe(self):
        return []  # no collect() at registration time

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily, InfoMetricFamily)

        listener = self._listener
        daemon = listener.daemon
        live = listener.live()

        yield InfoMetricFamily("hpcd", "hpcd's version", value={"version": live["version"]})
        yield GaugeMetricFamily("hpcd_start_time_seconds", "When hpcd started (Unix time)",
                                value=live["started"] or 0)

        clusters = GaugeMetricFamily("hpcd_clusters", "Enabled clusters by connection state",
                                     labels=["state"])
        online = sum(1 for c in live["clusters"] if c["online"])
        clusters.add_metric(["online"], online)
        clusters.add_metric(["offline"], len(live["clusters"]) - online)
        yield clusters
        yield GaugeMetricFamily("hpcd_agents_connected", "Agents connected to hpcd",
                                value=live["agents_connected"])

        jobs = GaugeMetricFamily("hpcd_jobs", "Jobs by cluster and state (counted every "
                                 "HPC_METRICS_JOB_COUNT_SECONDS)", labels=["cluster", "state"])
        for (cluster, state), count in sorted(listener.job_counts.items()):
            jobs.add_metric([cluster, state], count)
        yield jobs

        counts, dispatch_seconds = daemon.event_stats.snapshot()
        for family, label, text in (
                ("dispatched", "action", "Requests sent to agents (submit, cancel, delete)"),
                ("dispatch_failures", "action", "Requests to agents that failed or timed out"),
                ("state_changes", "state", "Job state changes reported by agents and stored"),
                ("refused_updates", "reason", "Agents' job updates the transition table refused"),
                ("refused_connections", "reason", "Websocket connections refused"),
                ("refused_inputs", "reason", "Frames from agents refused")):
            counter = CounterMetricFamily(f"hpcd_{family}", text, labels=[label])
            for value, count in sorted(counts[family].items()):
                counter.add_metric([value], count)
            yield counter
        dispatch = HistogramMetricFamily("hpcd_dispatch_seconds", "Time from sending a request "
                                         "to an agent to its answer", labels=["action"])
        for action, histogram in sorted(dispatch_seconds.items()):
            buckets, total = histogram.snapshot()
            dispatch.add_metric([action], buckets, total)
        yield dispatch
        yield GaugeMetricFamily("hpcd_dispatch_in_flight", "Requests to agents awaiting "
                                "their answer", value=live["dispatch_in_flight"])

        yield GaugeMetricFamily("hpcd_transfers_active", "File transfers in progress",
                                value=len(live["transfers"]))
        yield CounterMetricFamily("hpcd_transfer_bytes", "Bytes relayed from agents to Django",
                                  value=live["transfer_bytes"])
        done = CounterMetricFamily("hpcd_transfers", "Finished file transfers",
                                   labels=["outcome"])
        for outcome, count in sorted(live["transfers_done"].items()):
            done.add_metric([outcome], count)
        yield done

        stats = daemon.store.stats
        tasks = GaugeMetricFamily("hpcd_db_tasks", "Database tasks by state", labels=["state"])
        tasks.add_metric(["waiting"], live["db_tasks_waiting"])
        tasks.add_metric(["running"], live["db_tasks_running"])
        yield tasks
        for name, histograms, text in (
                ("hpcd_db_task_wait_seconds", stats.wait, "Time database tasks waited for "
                 "a thread"),
                ("hpcd_db_task_run_seconds", stats.run, "Time database tasks ran")):
            family = HistogramMetricFamily(name, text, labels=["task"])
            for task_name, histogram in sorted(histograms.items()):
                buckets, total = histogram.snapshot()
                family.add_metric([task_name], buckets, total)
            yield family
        updates = HistogramMetricFamily("hpcd_state_update_seconds", "Time from an agent's "
                                        "batch of updates reaching the store to its commit")
        if "apply_updates" in stats.total:
            buckets, total = stats.total["apply_updates"].snapshot()
            updates.add_metric([], buckets, total)
        yield updates


class Health(resource.Resource):
    """/healthz: 200 when the database and the Unix socket both answer."""

    isLeaf = True

    def __init__(self, daemon):
        super().__init__()
        self.daemon = daemon

    def render_GET(self, request):
        d = check_health(self.daemon)

        def answer(problems):
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            if problems:
                request.setResponseCode(503)
                body = "".join(f"{problem}\n" for problem in problems)
            else:
                body = "ok: database and Unix socket answer\n"
            request.write(body.encode())
            request.finish()

        def failed(failure):
            log.failure("/healthz failed", failure)
            request.setResponseCode(500)
            request.finish()

        d.addCallbacks(answer, failed)
        request.notifyFinish().addErrback(lambda _: None)
        return server.NOT_DONE_YET


@defer.inlineCallbacks
def check_health(daemon, timeout=HEALTH_TIMEOUT):
    """A list of problems (empty: healthy): one round trip to the database
    on the store's threads, one AMP call over hpcd's own Unix socket."""
    reactor = daemon.reactor
    problems = []

    db = daemon.store.ping()
    db.addTimeout(timeout, reactor)
    path = daemon.settings.HPC_IPC_UNIX_SOCKET
    sock = endpoints.connectProtocol(
        endpoints.UNIXClientEndpoint(reactor, path, timeout=timeout), amp.AMP())

    def ask(proto):
        d = proto.callRemote(commands.IsClusterOnline, cluster_id=0)
        d.addBoth(lambda result: (proto.transport.loseConnection(), result)[1])
        return d

    sock.addCallback(ask)
    sock.addTimeout(timeout, reactor)
    results = yield defer.DeferredList([db, sock], consumeErrors=True)
    (db_ok, db_result), (sock_ok, sock_result) = results
    if not db_ok:
        waiting = daemon.store.stats.waiting
        if db_result.check(defer.TimeoutError):
            why = f"no answer within {timeout:g} s ({waiting} database tasks waiting)"
        else:
            why = (db_result.getErrorMessage().strip() or repr(db_result.value)).splitlines()[0]
        problems.append(f"database: {why}")
    if not sock_ok:
        why = ("no answer within {timeout:g} s" if sock_result.check(defer.TimeoutError)
               else sock_result.getErrorMessage())
        problems.append(f"unix socket {path}: {why}")
    return problems


class _Root(resource.Resource):
    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"hpcd: /metrics (Prometheus), /healthz\n"


class _QuietSite(server.Site):
    def log(self, request):
        pass  # no line per scrape


class MetricsListener(service.Service):
    """Serves /metrics and /healthz on ``HPC_METRICS_ENDPOINT``; counts the
    jobs by state every ``HPC_METRICS_JOB_COUNT_SECONDS`` for /metrics."""

    name = "metrics"

    def __init__(self, daemon, endpoint, count_seconds):
        try:
            from prometheus_client import CollectorRegistry, ProcessCollector
            from prometheus_client.twisted import MetricsResource
        except ImportError:
            raise MetricsUnavailable(
                f"HPC_METRICS_ENDPOINT is set ({endpoint!r}) but prometheus_client is not "
                "installed: pip install 'hpc-job-controller[metrics]' (or unset the setting)"
            ) from None
        self.daemon = daemon
        self.endpoint = endpoint
        self.count_seconds = count_seconds
        self.job_counts = {}
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        self.registry.register(_Collector(self))
        root = _Root()
        root.putChild(b"metrics", MetricsResource(self.registry))
        root.putChild(b"healthz", Health(daemon))
        self.site = _QuietSite(root)
        self.site.noisy = False
        self.port = None
        self.port_ready = None
        self._loop = None

    def startService(self):
        super().startService()
        reactor = self.daemon.reactor
        # hpcd waits for this before it says it is ready; a failure stops it.
        self.port_ready = endpoints.serverFromString(reactor, self.endpoint).listen(self.site)
        self.port_ready.addCallback(self._listening)

    def _listening(self, port):
        self.port = port
        address = port.getHost()
        log.info("hpcd metrics at http://{host}:{port}/metrics and /healthz",
                 host=getattr(address, "host", address), port=getattr(address, "port", ""))
        self._loop = task.LoopingCall(self._count_jobs)
        self._loop.clock = self.daemon.reactor
        self._loop.start(self.count_seconds, now=True)

    def live(self):
        """live_status(), read on the reactor thread whichever thread asks:
        the exposition runs on the reactor's thread pool."""
        if threadable.isInIOThread():
            return live_status(self.daemon)
        return threads.blockingCallFromThread(self.daemon.reactor, live_status, self.daemon)

    def _count_jobs(self):
        def store(counts):
            self.job_counts = {(str(cluster or ""), state): n
                               for (cluster, state), n in counts.items()}

        return self.daemon.store.job_counts().addCallbacks(store, lambda f: log.warn(
            "counting jobs for /metrics failed: {error}", error=f.getErrorMessage()))

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.port is not None:
            yield self.port.stopListening()
            self.port = None


class MetricsUnavailable(Exception):
    """HPC_METRICS_ENDPOINT is set but prometheus_client is missing."""
