"""Keeping one agent connected per enabled cluster.

Each cluster has a :class:`ClusterLink`, an Automat state machine that
decides when to launch its agent: after start (or after losing the agent)
it first waits a grace period for the agent to come back by itself with its
resume token; it launches when none does, waits for the launched agent to
connect, and backs off exponentially after failures.  The machine does no
I/O: it calls the :class:`ClusterManager`, which owns the store, the
launcher and the live sessions.
"""

import random

from automat import MethodicalMachine
from automat._core import NoTransition
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from hpc_agent.wire import CLOSE_SHUTDOWN, CLOSE_SUPERSEDED
from djangoapp.crypto import CredentialKeyError
from djangoapp.protocol import ClusterOffline, NotFound
from hpcd.launch import LaunchFailed

log = Logger()


class ClusterLink:
    """When to launch one cluster's agent.  States are words; inputs are events."""

    _machine = MethodicalMachine()

    def __init__(self, cluster_id, manager, clock, grace, connect_timeout, max_backoff):
        self.cluster_id = cluster_id
        self._manager = manager
        self._clock = clock
        self._grace = grace
        self._connect_timeout = connect_timeout
        self._max_backoff = max_backoff
        self._timer = None
        self.failures = 0

    # -- states ----------------------------------------------------------------

    @_machine.state(initial=True)
    def idle(self):
        "Not started, or stopped."

    @_machine.state()
    def waiting(self):
        "No agent: giving it a grace period to reconnect by itself."

    @_machine.state()
    def launching(self):
        "The launch command runs."

    @_machine.state()
    def connecting(self):
        "Launched; waiting for the agent's connection."

    @_machine.state()
    def online(self):
        "An agent is connected."

    @_machine.state()
    def backing_off(self):
        "The last attempt failed; waiting before the next."

    # -- inputs ----------------------------------------------------------------

    @_machine.input()
    def start(self):
        "hpcd started, or the cluster was enabled."

    @_machine.input()
    def stop(self):
        "hpcd stops, or the cluster was disabled or removed."

    @_machine.input()
    def connect_requested(self):
        "Someone asked for the agent (try_connect)."

    @_machine.input()
    def relaunch_requested(self):
        "Someone asked for a new agent even if one is connected."

    @_machine.input()
    def timer_fired(self):
        "The grace period, connect timeout or backoff is over."

    @_machine.input()
    def launch_succeeded(self):
        "The launch command reported a running agent."

    @_machine.input()
    def launch_failed(self, why):
        "The launch command failed."

    @_machine.input()
    def agent_connected(self):
        "An agent of this cluster connected and said hello."

    @_machine.input()
    def agent_lost(self):
        "The agent's connection closed."

    # -- outputs ---------------------------------------------------------------

    # Automat forbids calling outputs directly; these helpers are shared.
    def _set_timer(self, delay):
        self._stop_timer()
        self._timer = self._clock.callLater(delay, self._fire)

    def _stop_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _fire(self):
        self._timer = None
        self.timer_fired()

    @_machine.output()
    def _cancel(self):
        self._stop_timer()

    @_machine.output()
    def _start_grace(self):
        self._set_timer(self._grace)

    @_machine.output()
    def _launch(self):
        self._stop_timer()
        self._manager.launch(self)

    @_machine.output()
    def _start_connect_timer(self):
        self._set_timer(self._connect_timeout)

    @_machine.output()
    def _connect_timed_out(self):
        self._failed(f"the agent was launched but did not connect within "
                     f"{self._connect_timeout:.0f} s (see its log directory on the cluster)")

    @_machine.output()
    def _launch_failed(self, why):
        self._failed(why)

    def _failed(self, why):
        self.failures += 1
        # The exponent is bounded: 2.0 * 2 ** 1024 overflows a float.
        delay = 2.0 * 2 ** min(self.failures - 1, 32)
        delay *= random.uniform(0.8, 1.2)  # clusters failing together spread out
        delay = min(delay, self._max_backoff * random.uniform(0.8, 1.0))
        self._manager.report(self, f"{why.rstrip('.')}; retrying in {delay:.0f} s "
                                   f"(attempt {self.failures})")
        self._set_timer(delay)

    @_machine.output()
    def _connected(self):
        self._stop_timer()
        self.failures = 0

    # -- transitions -----------------------------------------------------------

    idle.upon(start, enter=waiting, outputs=[_start_grace])
    idle.upon(connect_requested, enter=launching, outputs=[_launch])
    idle.upon(relaunch_requested, enter=launching, outputs=[_launch])
    idle.upon(agent_connected, enter=online, outputs=[_connected])
    idle.upon(stop, enter=idle, outputs=[])

    waiting.upon(timer_fired, enter=launching, outputs=[_launch])
    waiting.upon(connect_requested, enter=launching, outputs=[_launch])
    waiting.upon(relaunch_requested, enter=launching, outputs=[_launch])
    waiting.upon(agent_connected, enter=online, outputs=[_connected])
    waiting.upon(stop, enter=idle, outputs=[_cancel])

    launching.upon(launch_succeeded, enter=connecting, outputs=[_start_connect_timer])
    launching.upon(launch_failed, enter=backing_off, outputs=[_launch_failed])
    launching.upon(agent_connected, enter=online, outputs=[_connected])
    launching.upon(connect_requested, enter=launching, outputs=[])
    launching.upon(relaunch_requested, enter=launching, outputs=[])
    launching.upon(agent_lost, enter=launching, outputs=[])
    launching.upon(stop, enter=idle, outputs=[])

    connecting.upon(agent_connected, enter=online, outputs=[_connected])
    connecting.upon(timer_fired, enter=backing_off, outputs=[_connect_timed_out])
    connecting.upon(connect_requested, enter=connecting, outputs=[])
    connecting.upon(relaunch_requested, enter=launching, outputs=[_launch])
    connecting.upon(agent_lost, enter=connecting, outputs=[])
    connecting.upon(stop, enter=idle, outputs=[_cancel])

    online.upon(agent_lost, enter=waiting, outputs=[_start_grace])
    online.upon(agent_connected, enter=online, outputs=[])
    online.upon(connect_requested, enter=online, outputs=[])
    online.upon(relaunch_requested, enter=launching, outputs=[_launch])
    # A launch whose agent connected before the launch command returned.
    online.upon(launch_succeeded, enter=online, outputs=[])
    online.upon(launch_failed, enter=online, outputs=[])
    online.upon(stop, enter=idle, outputs=[])

    backing_off.upon(timer_fired, enter=launching, outputs=[_launch])
    backing_off.upon(connect_requested, enter=launching, outputs=[_launch])
    backing_off.upon(relaunch_requested, enter=launching, outputs=[_launch])
    backing_off.upon(agent_connected, enter=online, outputs=[_connected])
    backing_off.upon(agent_lost, enter=backing_off, outputs=[])
    backing_off.upon(stop, enter=idle, outputs=[_cancel])

    # Events that can arrive late in any state (a launch finishing after a
    # stop, a timer racing a connection) change nothing there.
    for _state in (idle, waiting, connecting, backing_off):
        _state.upon(launch_succeeded, enter=_state, outputs=[])
        _state.upon(launch_failed, enter=_state, outputs=[])
    for _state in (idle, waiting):
        _state.upon(agent_lost, enter=_state, outputs=[])
    for _state in (idle, launching, online):
        _state.upon(timer_fired, enter=_state, outputs=[])
    del _state


class ClusterManager(service.Service):
    """The clusters, their launch machines and their live agent sessions."""

    name = "clusters"

    def __init__(self, reactor, store, launcher, settings, public_url):
        self._reactor = reactor
        self._store = store
        self._launcher = launcher
        self._settings = settings
        self._public_url = public_url
        self.links = {}
        self.sessions = {}
        self.infos = {}
        self.changed = {}  # cluster id -> when it last went online or offline (hpc_status)
        self.on_online = lambda cluster_id: None
        # Called in the turn a cluster's live session comes or goes, before
        # hpcd answers anything else (hpcd.stamp: Django's kept answers).
        self.on_sessions_changed = lambda: None
        self._refresher = None
        self._purger = None

    def startService(self):
        super().startService()
        d = self._store.mark_all_offline(self._resume_ttl())
        d.addCallback(lambda _: self.refresh())
        d.addErrback(lambda f: log.failure("loading clusters failed", f))
        self._refresher = task.LoopingCall(self._refresh_quietly)
        self._refresher.clock = self._reactor
        self._refresher.start(float(self._settings.HPC_DISPATCH_SCAN_SECONDS), now=False)
        # Tokens only need forgetting after a day: once an hour is plenty.
        self._purger = task.LoopingCall(self._purge_tokens)
        self._purger.clock = self._reactor
        self._purger.start(3600, now=False)
        return d

    def stopService(self):
        super().stopService()
        for loop in (self._refresher, self._purger):
            if loop is not None and loop.running:
                loop.stop()
        for link in self.links.values():
            link.stop()
        # A clean stop: the admin must not show clusters online meanwhile.
        # (The store runs this before its pool stops: queued work goes first.)
        return self._store.mark_all_offline(self._resume_ttl()).addErrback(
            lambda f: log.failure("marking clusters offline failed", f))

    def _resume_ttl(self):
        return float(self._settings.HPC_AGENT_RESUME_TOKEN_TTL_SECONDS)

    def _refresh_quietly(self):
        return self.refresh().addErrback(lambda f: log.failure("refreshing clusters failed", f))

    def _purge_tokens(self):
        live = [s.token_id for s in self.sessions.values()]
        return self._store.purge_tokens(live).addErrback(
            lambda f: log.failure("purging old tokens failed", f))

    @defer.inlineCallbacks
    def refresh(self):
        """Follow the clusters table: new ones start, disabled or removed ones stop."""
        clusters = yield self._store.clusters()
        seen = set()
        for info in clusters:
            seen.add(info["id"])
            self.infos[info["id"]] = info
            link = self.links.get(info["id"])
            if info["enabled"] and link is None:
                link = self.links[info["id"]] = self._new_link(info["id"])
                self.changed.setdefault(info["id"], self._reactor.seconds())
                link.start()
            elif not info["enabled"] and link is not None:
                self._drop(info["id"])
        for cluster_id in set(self.links) - seen:
            self._drop(cluster_id)

    def _new_link(self, cluster_id):
        s = self._settings
        return ClusterLink(cluster_id, self, self._reactor,
                           grace=float(s.HPC_AGENT_RESUME_GRACE_SECONDS),
                           connect_timeout=float(s.HPC_AGENT_CONNECT_TIMEOUT),
                           max_backoff=float(s.HPC_LAUNCH_MAX_BACKOFF_SECONDS))

    def _drop(self, cluster_id):
        self.links.pop(cluster_id).stop()
        session = self.sessions.get(cluster_id)
        if session is not None:
            session.close(CLOSE_SHUTDOWN, "cluster disabled or removed")

    # -- what Django asks ------------------------------------------------------

    def session(self, cluster_id):
        """The live, greeted agent session of a cluster, or None."""
        session = self.sessions.get(cluster_id)
        return session if session is not None and session.ready else None

    def require_session(self, cluster_id):
        session = self.session(cluster_id)
        if session is None:
            name = self.infos.get(cluster_id, {}).get("host_name", cluster_id)
            raise ClusterOffline(f"cluster {name!r} (id {cluster_id}) has no connected agent; "
                                 "try HpcCluster.try_connect() and check its status_detail")
        return session

    @defer.inlineCallbacks
    def try_connect(self, cluster_id, force):
        if cluster_id not in self.links:
            yield self.refresh()
        link = self.links.get(cluster_id)
        if link is None:
            raise NotFound(f"no enabled cluster with id {cluster_id}")
        self._input(link, link.relaunch_requested if force else link.connect_requested)

    # -- the machines' collaborators ------------------------------------------

    def _input(self, link, event, *args):
        try:
            event(*args)
        except NoTransition as e:
            log.warn("cluster {id}: ignored event: {e}", id=link.cluster_id, e=e)

    @defer.inlineCallbacks
    def launch(self, link):
        cluster_id = link.cluster_id
        try:
            prepared = yield self._store.prepare_launch(
                cluster_id, int(self._settings.HPC_TOKEN_TTL_SECONDS))
            if prepared is None:
                raise LaunchFailed("the cluster no longer exists")
            info, (_, secret) = prepared
            self.infos[cluster_id] = info
            output = yield self._launcher.launch(info, self._public_url(), secret)
        except (LaunchFailed, CredentialKeyError) as e:
            self._input(link, link.launch_failed, str(e))
        except Exception as e:
            log.failure("launching cluster {id} failed", id=cluster_id)
            self._input(link, link.launch_failed, f"launch failed: {e}")
        else:
            log.info("cluster {id}: {output}", id=cluster_id, output=output)
            self._input(link, link.launch_succeeded)

    def report(self, link, detail):
        log.warn("cluster {id}: {detail}", id=link.cluster_id, detail=detail)
        self._store.set_cluster_detail(link.cluster_id, detail).addErrback(
            lambda f: log.failure("recording cluster detail failed", f))

    # -- sessions --------------------------------------------------------------

    def agent_hello(self, session):
        """A new agent said hello; fires when it may take the cluster over.

        One live control connection per cluster: an older one is told to go
        away and the new one proceeds only once it is gone.
        """
        old = self.sessions.get(session.cluster_id)
        if old is None or old is session:
            self.sessions[session.cluster_id] = session
            self.on_sessions_changed()
            return defer.succeed(None)
        old.close(CLOSE_SUPERSEDED, "a newer agent connected for this cluster")
        d = old.gone()

        def take_over(_):
            self.sessions[session.cluster_id] = session
            self.on_sessions_changed()

        return d.addCallback(take_over)

    @defer.inlineCallbacks
    def agent_ready(self, session):
        # Ready from now on (AgentSession.ready was just set), in this turn.
        self.on_sessions_changed()
        if session.cluster_id not in self.links:
            yield self.refresh()  # a cluster added since the last refresh
        link = self.links.get(session.cluster_id)
        if link is None:  # disabled or removed
            session.close(CLOSE_SHUTDOWN, "cluster disabled or removed")
            return
        self._input(link, link.agent_connected)
        self.changed[session.cluster_id] = self._reactor.seconds()
        detail = (f"connected: agent {session.hello['agent_version']} on "
                  f"{session.hello['hostname']}, {session.hello['scheduler']}")
        log.info("cluster {cluster}: {detail}", cluster=session.cluster_id, detail=detail)
        self._store.set_cluster_state(session.cluster_id, True, detail).addErrback(
            lambda f: log.failure("recording cluster state failed", f))
        self.on_online(session.cluster_id)

    def agent_lost(self, session):
        if self.sessions.get(session.cluster_id) is not session:
            return
        del self.sessions[session.cluster_id]
        self.on_sessions_changed()
        self.changed[session.cluster_id] = self._reactor.seconds()
        link = self.links.get(session.cluster_id)
        if link is not None:
            self._input(link, link.agent_lost)
        detail = "agent connection lost"
        if session.refusal is not None:
            # Another installation's agent directory: relaunching cannot help.
            detail = (f"the agent refused to serve this installation: {session.refusal}; "
                      "then use 'Connect now' (HpcCluster.try_connect())")
            log.error("cluster {id}: {detail}", id=session.cluster_id, detail=detail)
            if link is not None:
                self._input(link, link.stop)
        self._store.set_cluster_state(session.cluster_id, False, detail, self._resume_ttl()) \
            .addErrback(lambda f: log.failure("recording cluster state failed", f))
