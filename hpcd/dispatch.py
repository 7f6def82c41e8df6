"""Sending jobs' pending work to their clusters' agents.

hpcd owns dispatching.  Django's notification (``Dispatch``) only makes it
happen sooner: hpcd also scans for PENDING, SUBMITTING, CANCELLING and
DELETING jobs at start, when a cluster connects, and periodically, so a lost
notification, a dropped connection or an unanswered request only delays.
Every message is safe to repeat: the agent answers a repeated submit from
its records, and cancel and delete are idempotent.
"""

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from hpc_agent.status import JobStatus
from djangoapp.protocol import HpcdError

log = Logger()


class Dispatcher(service.Service):
    name = "dispatcher"

    def __init__(self, reactor, store, clusters, scan_seconds):
        self._reactor = reactor
        self._store = store
        self._clusters = clusters
        self._scan_seconds = scan_seconds
        self._in_flight = set()
        self._loop = None

    def startService(self):
        super().startService()
        self._loop = task.LoopingCall(self.scan)
        self._loop.clock = self._reactor
        self._loop.start(self._scan_seconds, now=True)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def notify(self, job_id):
        """Django changed this job: act on it now."""
        return self._run(job_id)

    def scan(self):
        """Act on every job that needs it."""
        return self._run(None)

    def _run(self, job_id):
        d = self._store.work(job_id)
        d.addCallback(lambda jobs: [self._dispatch(job) for job in jobs])
        d.addErrback(lambda f: log.failure("dispatch scan failed", f))
        return d

    def _dispatch(self, job):
        session = self._clusters.session(job["cluster_id"])
        if session is None or job["job"] in self._in_flight:
            return
        self._in_flight.add(job["job"])
        d = self._send(session, job)
        d.addErrback(self._failed, job)
        d.addBoth(lambda _: self._in_flight.discard(job["job"]))

    @property
    def in_flight(self):
        """How many jobs' requests await an agent's answer."""
        return len(self._in_flight)

    @defer.inlineCallbacks
    def _send(self, session, job):
        status = job["status"]
        if status == JobStatus.PENDING:
            moved = yield self._store.transition(job["job"], JobStatus.SUBMITTING)
            if not moved:
                return  # cancelled or dispatched meanwhile
            status = JobStatus.SUBMITTING
        action = _ACTIONS.get(status)
        if action is None:
            return
        log.info("cluster {cluster} job {job}: {action} sent to the agent",
                 cluster=job["cluster_id"], job=job["job"], action=action, hpc_event="dispatched")
        started = self._reactor.seconds()
        fields = {"parameters": job["parameters"]} if action == "submit" else {}
        answer = yield session.request(action, job=job["job"], **fields)
        answer = answer or {}
        log.info("cluster {cluster} job {job}: the agent answered the {action} in {seconds:.3f} s"
                 "{scheduler}", cluster=job["cluster_id"], job=job["job"], action=action,
                 seconds=self._reactor.seconds() - started, hpc_event="dispatch_answered",
                 scheduler=f" (scheduler id {answer['scheduler_id']})"
                 if answer.get("scheduler_id") else "")
        # The resulting states come back as the agent's updates.

    def _failed(self, failure, job):
        if failure.check(HpcdError):
            log.warn("cluster {cluster} job {job}: {status} not delivered, retried on the next "
                     "scan: {error}", cluster=job["cluster_id"], job=job["job"],
                     status=JobStatus(job["status"]).name, error=failure.value,
                     hpc_event="dispatch_failed", action=_ACTIONS.get(job["status"], "submit"))
        else:
            log.failure("dispatching job {job} failed", failure, job=job["job"])


#: The request each state sends (a PENDING job is SUBMITTING by then).
_ACTIONS = {JobStatus.PENDING: "submit", JobStatus.SUBMITTING: "submit",
            JobStatus.CANCELLING: "cancel", JobStatus.DELETING: "delete"}
