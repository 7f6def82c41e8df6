"""Sending jobs' pending work to their clusters' agents.

hpcd owns dispatching.  Django's notification (``Dispatch``) only makes it
happen sooner: hpcd also scans for PENDING, SUBMITTING, CANCELLING and
DELETING jobs at start, when a cluster connects, and periodically, so a lost
notification, a dropped connection or an unanswered request only delays.
Every message is safe to repeat: the agent answers a repeated submit from
its records, and cancel and delete are idempotent.

Submissions go in rounds of batches, per cluster.  A round claims up to
BATCH of the cluster's PENDING jobs in one transaction (each moved to
SUBMITTING by compare-and-set before anything is sent, so a job is sent by
whoever moved it and by no one else) and sends them in one ``submit_many``
request; the agent submits each and answers per job.  While a batch awaits
its answer the next is claimed, up to a window of batches in flight per
cluster that grows while the agent answers within WINDOW_TARGET_SECONDS and
halves when it does not (or fails).  With one batch in flight and answers
still slow (a slow scheduler: the request must not time out), the batches
shrink, down to MIN_BATCH, and grow back when answers are quick.  An agent
too old for ``submit_many`` gets one ``submit`` per job instead.

Notifications arriving within NOTIFY_SECONDS are looked up together, in one
query: a burst of submit() calls costs one lookup per burst, not per job.  A
notification that says the job became PENDING on a known cluster (what
submit() sends) needs no lookup at all: it only starts that cluster's round.
When a claim finds fewer than MIN_BATCH jobs (submit() calls arriving one by
one), the next claim waits for the batch in flight to be answered, so jobs
that arrive meanwhile go out together instead of one claim, one request and
one stored answer each.
"""

import weakref

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from djangoapp.protocol import AgentError, HpcdError
from hpc_agent.status import JobStatus

log = Logger()

#: Jobs claimed and sent to an agent in one submit_many request, at most,
#: and at least while answers are slow.
BATCH = 250
MIN_BATCH = 10
#: Their parameters, encoded, at most (the agent's frames are limited).
BATCH_BYTES = 4 * 1024 * 1024
#: Batches in flight per cluster: the window starts at 1 and grows by one
#: per batch answered within WINDOW_TARGET_SECONDS, up to WINDOW_MAX; it
#: halves when an answer is slower, and drops to 1 when a batch fails.
WINDOW_MAX = 4
WINDOW_TARGET_SECONDS = 5.0
#: Notifications gathered into one lookup.
NOTIFY_SECONDS = 0.005


class _Cluster:
    """One cluster's submission round."""

    __slots__ = ("more", "claiming", "batches", "window", "size", "trickle")

    def __init__(self):
        self.more = False  # PENDING jobs may be waiting
        self.claiming = False  # a claim is running
        self.batches = 0  # batches sent and not yet answered
        self.window = 1
        self.size = BATCH  # jobs per batch
        self.trickle = False  # the last claim was small: gather behind the batch in flight

    def may_claim(self):
        """Whether a claim may start now (``more`` aside)."""
        if self.claiming or self.batches >= self.window:
            return False
        return not (self.trickle and self.batches)

    def answered(self, seconds, failed):
        """Adapt the window and the batch size to how the agent answered."""
        if failed or seconds > WINDOW_TARGET_SECONDS:
            if failed or self.window == 1:
                self.size = max(MIN_BATCH, self.size // 2)
            self.window = 1 if failed else max(1, self.window // 2)
        else:
            self.window = min(WINDOW_MAX, self.window + 1)
            self.size = min(BATCH, self.size * 2)


class Dispatcher(service.Service):
    name = "dispatcher"

    def __init__(self, reactor, store, clusters, scan_seconds):
        self._reactor = reactor
        self._store = store
        self._clusters = clusters
        self._scan_seconds = scan_seconds
        self._in_flight = set()
        self._loop = None
        self._rounds = {}  # cluster id -> _Cluster
        self._notified = set()
        self._pending = set()  # clusters told of a new PENDING job
        self._notify_call = None
        self._scanning = None  # the scan_soon() scan running
        self._scan_again = False  # scan_soon() was asked for while it ran
        self._again = set()  # notified while in flight: looked at once answered
        # A lookup that started before a job's request was answered may read
        # the job as it was before: each lookup has an epoch, and jobs
        # answered during a lookup are not sent again from its result.
        self._epoch = 0
        self._looking = []  # epochs of the lookups running
        self._answered = {}  # job -> the epoch in which it was answered
        # Sessions whose agent refused submit_many (an older agent).
        self._single_only = weakref.WeakSet()

    def startService(self):
        super().startService()
        self._loop = task.LoopingCall(self.scan)
        self._loop.clock = self._reactor
        self._loop.start(self._scan_seconds, now=True)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._notify_call is not None and self._notify_call.active():
            self._notify_call.cancel()

    def notify(self, job_id, status=None, cluster_id=None):
        """Django changed this job: act on it soon (notifications that come
        together are looked up together).  ``status`` and ``cluster_id``, when
        Django says what it stored, spare the lookup of a PENDING job: the
        cluster's next claim takes it (or finds it gone: a claim is a
        compare-and-set, so a stale hint costs nothing)."""
        if status == JobStatus.PENDING and cluster_id and job_id:
            self._pending.add(cluster_id)
        else:
            self._notified.add(job_id)
        if self._notify_call is None:
            self._notify_call = self._reactor.callLater(NOTIFY_SECONDS, self._look_up)

    def _look_up(self):
        self._notify_call = None
        job_ids, self._notified = sorted(self._notified), set()
        pending, self._pending = self._pending, set()
        for cluster_id in pending:
            self._round(cluster_id).more = True
            self._pump(cluster_id)
        if not job_ids:
            return defer.succeed(None)
        # 0: "every job that needs it" (HpcJob.objects.submit_many sends it).
        return self._run(None if 0 in job_ids else job_ids)

    def scan(self):
        """Act on every job that needs it."""
        return self._run(None)

    def scan_soon(self):
        """A scan now, or, while one runs, one more once it ends: what a
        cluster coming online asks for, so that a thousand agents coming
        back after an hpcd restart cost a few scans, not a thousand."""
        if self._scanning is not None:
            self._scan_again = True
            return
        self._scanning = self.scan()

        def ended(_):
            self._scanning = None
            if self._scan_again:
                self._scan_again = False
                self.scan_soon()

        self._scanning.addBoth(ended).addErrback(
            lambda f: log.failure("dispatch scan failed", f))

    def _run(self, job_ids):
        self._epoch += 1
        epoch = self._epoch
        self._looking.append(epoch)
        d = self._store.work(None) if job_ids is None else self._store.work_of(job_ids)
        d.addCallback(self._act, epoch)
        d.addBoth(self._looked, epoch)
        d.addErrback(lambda f: log.failure("dispatch scan failed", f))
        return d

    def _looked(self, result, epoch):
        self._looking.remove(epoch)
        oldest = min(self._looking, default=self._epoch + 1)
        self._answered = {job: at for job, at in self._answered.items() if at >= oldest}
        return result

    def _act(self, jobs, epoch):
        resend = {}
        for job in jobs:
            if job["status"] == JobStatus.PENDING:
                self._round(job["cluster_id"]).more = True
            elif job["job"] in self._in_flight:
                # Look again once answered only if Django asked for more
                # (a cancel, a delete): a submit in flight is being answered,
                # and the agent's SUBMITTED may not be stored by then.
                if job["status"] != JobStatus.SUBMITTING:
                    self._again.add(job["job"])
            elif self._answered.get(job["job"], -1) >= epoch:
                pass  # answered since this was read: its state is on its way
            elif job["status"] == JobStatus.SUBMITTING:
                # Sent before and never answered: again, the agent answers a
                # job it knows from its records.
                resend.setdefault(job["cluster_id"], []).append(job)
            else:
                self._dispatch(job)
        for cluster_id, batch in resend.items():
            size = self._round(cluster_id).size
            for i in range(0, len(batch), size):
                self._send_batch(cluster_id, batch[i:i + size])
        for cluster_id in list(self._rounds):
            self._pump(cluster_id)

    @property
    def in_flight(self):
        """How many jobs' requests await an agent's answer."""
        return len(self._in_flight)

    # -- submissions, in batches ---------------------------------------------------

    def _round(self, cluster_id):
        state = self._rounds.get(cluster_id)
        if state is None:
            state = self._rounds[cluster_id] = _Cluster()
        return state

    def _pump(self, cluster_id):
        """Claim the cluster's next batch if it may have one and the window
        has room."""
        state = self._round(cluster_id)
        if (not state.more or not state.may_claim()
                or not self.running or self._clusters.session(cluster_id) is None):
            if not state.more and not state.claiming and not state.batches:
                self._rounds.pop(cluster_id, None)
            return
        state.claiming, state.more = True, False
        size = state.size
        d = self._store.claim_work(cluster_id, size, BATCH_BYTES)

        def claimed(jobs):
            state.claiming = False
            state.trickle = len(jobs) < MIN_BATCH
            if len(jobs) >= size:
                state.more = True  # probably more where these came from
            if jobs:
                self._send_batch(cluster_id, jobs)

        def failed(f):
            state.claiming = False
            log.failure("claiming cluster {cluster}'s pending jobs failed; retried on the "
                        "next scan", f, cluster=cluster_id)

        d.addCallbacks(claimed, failed)
        d.addBoth(lambda _: self._pump(cluster_id))
        d.addErrback(lambda f: log.failure("dispatch round failed", f))

    def _send_batch(self, cluster_id, jobs):
        """Send claimed (SUBMITTING) jobs in one request; the answer frees a
        place in the window."""
        jobs = [j for j in jobs if j["job"] not in self._in_flight]
        session = self._clusters.session(cluster_id)
        if session is None or not jobs:
            return  # the next scan or connection sends them
        state = self._round(cluster_id)
        state.batches += 1
        ids = [j["job"] for j in jobs]
        self._in_flight.update(ids)
        for job_id in ids:
            log.info("cluster {cluster} job {job}: {action} sent to the agent",
                     cluster=cluster_id, job=job_id, action="submit", hpc_event="dispatched")
        started = self._reactor.seconds()
        if session in self._single_only:
            d = self._submit_each(session, cluster_id, jobs)
        else:
            d = session.request("submit_many", jobs=[
                {"job": j["job"], "parameters": j["parameters"]} for j in jobs])
            d.addCallback(self._answered_many, cluster_id, started)
            d.addErrback(self._many_refused, session, cluster_id, jobs)

        def settled(result):
            state.batches -= 1
            state.answered(self._reactor.seconds() - started, isinstance(result, Exception))
            self._settle(ids)
            self._pump(cluster_id)

        def failed(f):
            if f.check(HpcdError):
                log.warn("cluster {cluster}: {n} jobs' submit not delivered, retried on the "
                         "next scan: {error}", cluster=cluster_id, n=len(ids), error=f.value,
                         hpc_event="dispatch_failed", action="submit")
            else:
                log.failure("dispatching {n} jobs to cluster {cluster} failed", f, n=len(ids),
                            cluster=cluster_id)
            return f.value

        d.addErrback(failed)
        d.addCallback(settled)
        d.addErrback(lambda f: log.failure("dispatch round failed", f))

    def _answered_many(self, result, cluster_id, started):
        seconds = self._reactor.seconds() - started
        for answer in (result or {}).get("jobs", []):
            if answer.get("ok"):
                log.info("cluster {cluster} job {job}: the agent answered the {action} in "
                         "{seconds:.3f} s{scheduler}", cluster=cluster_id, job=answer["job"],
                         action="submit", seconds=seconds, hpc_event="dispatch_answered",
                         scheduler=f" (scheduler id {answer['scheduler_id']})"
                         if answer.get("scheduler_id") else "")
            else:
                log.warn("cluster {cluster} job {job}: the agent could not take the submit, "
                         "retried on the next scan: {error}: {message}", cluster=cluster_id,
                         job=answer.get("job"), error=answer.get("error"),
                         message=answer.get("message"), hpc_event="dispatch_failed",
                         action="submit")
        # The resulting states come back as the agent's updates.

    def _many_refused(self, failure, session, cluster_id, jobs):
        failure.trap(AgentError)
        if failure.value.code not in ("unknown_type", "bad_field"):
            return failure
        log.info("cluster {cluster}: the agent does not know submit_many; one submit per "
                 "job from now on", cluster=cluster_id)
        self._single_only.add(session)
        return self._submit_each(session, cluster_id, jobs)

    def _submit_each(self, session, cluster_id, jobs):
        """One ``submit`` per job, all at once (an agent without submit_many)."""
        started = self._reactor.seconds()
        calls = []
        for job in jobs:
            d = session.request("submit", job=job["job"], parameters=job["parameters"])
            d.addCallback(lambda answer, job_id: self._answered_many(
                {"jobs": [{"ok": True, "job": job_id, **(answer or {})}]}, cluster_id, started),
                job["job"])
            calls.append(d)
        d = defer.DeferredList(calls, consumeErrors=True)

        def first_error(results):
            for ok, value in results:
                if not ok:
                    return value
            return None

        return d.addCallback(first_error)

    def _settle(self, ids):
        """These jobs' requests were answered (or failed): look again at the
        ones Django changed meanwhile."""
        self._in_flight.difference_update(ids)
        if self._looking:
            for job_id in ids:
                self._answered[job_id] = self._epoch
        again = self._again.intersection(ids)
        if again:
            self._again.difference_update(again)
            for job_id in again:
                self.notify(job_id)

    # -- cancel and delete, one job at a time --------------------------------------

    def _dispatch(self, job):
        session = self._clusters.session(job["cluster_id"])
        if session is None:
            return
        self._in_flight.add(job["job"])
        d = self._send(session, job)
        d.addErrback(self._failed, job)
        d.addBoth(lambda _: self._settle([job["job"]]))

    @defer.inlineCallbacks
    def _send(self, session, job):
        action = _ACTIONS.get(job["status"])
        if action is None:
            return
        log.info("cluster {cluster} job {job}: {action} sent to the agent",
                 cluster=job["cluster_id"], job=job["job"], action=action, hpc_event="dispatched")
        started = self._reactor.seconds()
        answer = yield session.request(action, job=job["job"])
        log.info("cluster {cluster} job {job}: the agent answered the {action} in {seconds:.3f} s",
                 cluster=job["cluster_id"], job=job["job"], action=action,
                 seconds=self._reactor.seconds() - started, hpc_event="dispatch_answered")
        return answer

    def _failed(self, failure, job):
        if failure.check(HpcdError):
            log.warn("cluster {cluster} job {job}: {status} not delivered, retried on the next "
                     "scan: {error}", cluster=job["cluster_id"], job=job["job"],
                     status=JobStatus(job["status"]).name, error=failure.value,
                     hpc_event="dispatch_failed", action=_ACTIONS.get(job["status"], "submit"))
        else:
            log.failure("dispatching job {job} failed", failure, job=job["job"])


#: The request each state other than PENDING and SUBMITTING sends.
_ACTIONS = {JobStatus.CANCELLING: "cancel", JobStatus.DELETING: "delete"}
