"""What the agent does with hpcd's messages and the scheduler's answers.

:class:`AgentCore` holds the logic and no sockets: the websocket protocol
hands it frames and a ``send`` function (see :mod:`hpc_agent.connection`),
and it calls the scheduler on a worker thread.  File requests are handled by
:mod:`hpc_agent.jobfiles`, on file workers of their own
(:mod:`hpc_agent.workers`); polling is :mod:`hpc_agent.poller`.  Tests drive
it with a recording ``send`` and a fake clock.

What goes to hpcd is durable first (see :mod:`hpc_agent.state`): updates
leave the outbox for the wire only once committed, and a reply waits until
the state it reports is committed.
"""

import platform

from twisted.internet import defer, threads
from twisted.logger import Logger

from hpc_agent import __version__, wire
from hpc_agent.jobfiles import FILE_THREADS, FileRequests
from hpc_agent.poller import Poller
from hpc_agent.schedulers.base import InvalidParameters, SchedulerError, submit_job
from hpc_agent.state import is_final
from hpc_agent.status import TERMINAL, JobStatus
from hpc_agent.wire import RequestFailed
from hpc_agent.workers import Workers

log = Logger()

#: Submit attempts that fail with a SchedulerError (the scheduler may be
#: briefly unavailable) before the job is reported as an error.
SUBMIT_ATTEMPTS = 5
#: An update hpcd neither acknowledged nor asked to retry is sent again after
#: this many seconds (a safety net: hpcd answers every update).
RESEND_SECONDS = 30.0
#: Updates hpcd could not store (``ack`` with ``retry``) are sent again after
#: this many seconds, doubling while it keeps failing, up to RETRY_MAX_SECONDS.
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0
#: Updates sent and not yet acknowledged, at most: the rest wait in the
#: outbox, so a long disconnection does not flood hpcd (or the agent's memory).
MAX_IN_FLIGHT = 5000

#: The detail of a job whose id the agent holds for another job.
CONFLICT_DETAIL = (
    "this agent already holds a job {job} submitted with other parameters (was the "
    "database reset or restored?); not submitted, and its files are not served. Submit "
    "a new job.")


def _other_job(job, parameters):
    """Whether a submit of ``parameters`` is for another job than the record
    ``job`` (a tombstone left by a cancel or delete holds no parameters)."""
    return job._parameters != "null" and job.parameters != parameters


def _conflict_key(job_id):
    # In the state's meta table: job ids whose submit named another job.
    return f"conflict:{int(job_id)}"


def _is_conflict(state, job_id):
    return job_id is not None and state.get_meta(_conflict_key(job_id)) is not None


def _refuse_conflicted_files(message):
    raise RequestFailed("path_refused", f"job {message['job']}'s id belongs to another job on "
                        "this cluster; its files are not served")


class AgentCore:
    """The agent's behaviour, between one websocket and one scheduler."""

    def __init__(self, settings, state, reactor, threadpool, start_transfer, nvx=False,
                 file_pool=None, start_upload=None):
        self.settings = settings
        self.state = state
        self.scheduler_class = settings.scheduler_class()
        self.reactor = reactor
        self._threadpool = threadpool
        self._file_pool = file_pool if file_pool is not None else threadpool
        #: ``start_transfer(token, FileSource) -> Deferred`` (hpc_agent.transfer)
        self.start_transfer = start_transfer
        #: ``start_upload(token, UploadSink) -> Deferred`` (hpc_agent.upload)
        self.start_upload = start_upload
        self._nvx = nvx
        self.files = Workers(reactor, self.in_file_thread, FILE_THREADS,
                             float(settings.HPC_FILE_TIMEOUT_SECONDS))
        #: ``on_welcome(resume_token, grace)``: the link decides what a welcome
        #: means (hpc_agent.link); without one, a welcome makes the core ready.
        self.on_welcome = None
        #: ``on_refuse(code, reason)``: close the connection with this code and
        #: exit (a welcome from an installation this agent does not serve).
        self.on_refuse = None
        self._send = None
        self._ready = False
        self._sent_upto = 0
        self._in_flight = {}  # seq -> when to send it again, until acknowledged
        self._resend_call = None
        self._store_failures = 0
        self._locks = {}
        self._submit_failures = {}
        self.poller = Poller(self, reactor)
        self._file_requests = FileRequests(self)
        state.on_durable = self.flush
        self._handlers = {
            "welcome": self._on_welcome,
            "ack": self._on_ack,
            "error": self._on_error,
            "reply": self._on_reply,
        }
        self._requests = {
            "submit": self._on_submit,
            "submit_many": self._on_submit_many,
            "cancel": self._on_cancel,
            "delete": self._on_delete,
            # Files: hpc_agent.jobfiles.
            "list_files": self._file_requests.list_files,
            "fetch_file": self._file_requests.fetch_file,
            "file_checksum": self._file_requests.file_checksum,
            "upload_file": self._file_requests.upload_file,
        }

    def in_thread(self, f, *args, **kwargs):
        """Run blocking scheduler work off the event loop."""
        return threads.deferToThreadPool(self.reactor, self._threadpool, f, *args, **kwargs)

    def in_file_thread(self, f, *args, **kwargs):
        """Run blocking file work off the event loop (use ``self.files``,
        which adds the deadline)."""
        return threads.deferToThreadPool(self.reactor, self._file_pool, f, *args, **kwargs)

    def scheduler(self, job, scheduler_id=None):
        return self.scheduler_class(self.settings, job, scheduler_id)

    # -- connection events ---------------------------------------------------

    def connected(self, send):
        """A connection opened: say hello.  Updates wait for :meth:`ready`."""
        self._send = send
        self._ready = False
        self._forget_in_flight()
        send(wire.encode(
            "hello", protocol=wire.PROTOCOL_VERSION, agent_version=__version__,
            scheduler=self.settings.HPC_SCHEDULER_CLASS, hostname=platform.node(),
            nvx=self._nvx))

    def ready(self):
        """hpcd welcomed the agent: send it the outbox."""
        self._ready = True
        self.flush()

    def lost(self):
        self._send = None
        self._ready = False
        self._forget_in_flight()

    def _forget_in_flight(self):
        self._sent_upto = 0
        self._in_flight = {}
        self._store_failures = 0
        if self._resend_call is not None and self._resend_call.active():
            self._resend_call.cancel()
        self._resend_call = None

    def frame_received(self, payload):
        """One text frame from hpcd.  Never raises."""
        try:
            message = wire.decode(payload, accept=wire.FROM_HPCD)
        except wire.ProtocolError as e:
            log.warn("refused a frame from hpcd: {error}", error=e.message)
            self._transmit(wire.error_frame(e))
            return
        mtype = message["type"]
        try:
            if mtype in self._requests:
                self._serve(message)
            else:
                self._handlers[mtype](message)
        except Exception:
            log.failure("handling a {type} frame from hpcd failed", type=mtype)

    def _transmit(self, frame):
        if self._send is not None:
            self._send(frame)

    # -- hpcd's messages -----------------------------------------------------

    def _on_welcome(self, message):
        installation = message.get("installation")
        if installation is not None:
            bound = self.state.bind_installation(installation)
            if bound != installation:
                self._refuse_installation(bound, installation)
                return
        log.info("connected to hpcd as cluster {cluster!r}", cluster=message["cluster"])
        if self.on_welcome is None:
            self.ready()
        else:
            self.on_welcome(message["resume_token"], message.get("resume_grace_seconds"))

    def _refuse_installation(self, bound, installation):
        # Job ids are unique within one Django database only: serving a
        # second installation would mix its jobs up with the first's.
        log.error("hpcd of installation {theirs} connected, but this agent directory ({path}) "
                  "belongs to installation {ours}: refusing it. Give that installation's "
                  "cluster another agent directory.", theirs=installation, ours=bound,
                  path=self.settings.HPC_JOB_WORKING_DIRECTORY)
        reason = (f"this agent directory belongs to installation {bound}; "
                  "use another agent directory")
        if self.on_refuse is not None:
            self.on_refuse(wire.CLOSE_INSTALLATION, reason)

    def _on_ack(self, message):
        self.state.acknowledge(message["seqs"])
        for seq in message["seqs"]:
            self._in_flight.pop(seq, None)
        retry = [seq for seq in message.get("retry", ()) if seq in self._in_flight]
        if retry:
            # hpcd could not store these (its database failed): again soon,
            # later and later while it keeps failing.
            self._store_failures += 1
            delay = min(RETRY_MAX_SECONDS,
                        RETRY_FIRST_SECONDS * 2 ** min(self._store_failures - 1, 16))
            due = self.reactor.seconds() + delay
            for seq in retry:
                self._in_flight[seq] = due
            self._arm_resend(due)
        elif message["seqs"]:
            self._store_failures = 0
        self.flush()

    def _on_error(self, message):
        log.warn("hpcd could not understand a frame: {code}: {message}",
                 code=message["code"], message=message["message"])

    def _on_reply(self, message):
        log.warn("unexpected reply {id} from hpcd", id=message["id"])

    def _serve(self, message):
        # Requests that change a job's state take its lock; file requests
        # only read, and one hung on a file system must not hold up a cancel.
        locked = message["type"] in ("submit", "cancel", "delete")
        handler = self._requests[message["type"]]
        if not locked and _is_conflict(self.state, message.get("job")):
            handler = _refuse_conflicted_files
        d = self._with_job_lock(message.get("job") if locked else None, handler, message)
        if locked:
            # Whatever the answer says about a job's state is durable first.
            d.addBoth(lambda result: self.state.when_durable().addCallback(lambda _: result))

        def ok(result):
            return wire.encode("reply", id=message["id"], ok=True, result=result)

        def failed(failure):
            if failure.check(RequestFailed):
                code, text = failure.value.code, str(failure.value)
            else:
                log.failure("request {type} {id} failed", failure,
                            type=message["type"], id=message["id"])
                code, text = "internal", f"{failure.type.__name__}: {failure.value}"
            return wire.encode("reply", id=message["id"], ok=False, error=code,
                               message=text)

        d.addCallbacks(ok, failed)
        d.addCallback(self._transmit)
        d.addErrback(lambda f: log.failure("could not answer a request", f))

    def _with_job_lock(self, job, handler, message):
        """Requests about one job run one at a time, in arrival order."""
        if job is None:
            return defer.maybeDeferred(handler, message)
        lock = self._locks.setdefault(job, defer.DeferredLock())

        def release(result):
            if not lock.locked and not lock.waiting:
                self._locks.pop(job, None)
            return result

        return lock.run(handler, message).addBoth(release)

    # -- requests ------------------------------------------------------------

    @defer.inlineCallbacks
    def _on_submit(self, message):
        job_id = message["job"]
        job = self.state.get(job_id)
        if job is not None and _other_job(job, message["parameters"]):
            return self._conflict(job_id)
        if job is None:
            # Durable before the scheduler sees it: a crash then never
            # submits it twice.
            yield self.state.record_submitting(job_id, message["parameters"])
            yield self._submit(job_id, message["parameters"])
        elif job.status == JobStatus.SUBMITTING and job.scheduler_id is None:
            # Recorded but never confirmed: a crash, or a failed attempt.
            yield self._resume_submit(job_id, job.parameters)
        job = self.state.get(job_id)
        return {"scheduler_id": job.scheduler_id, "status": int(job.status)}

    def _conflict(self, job_id):
        """hpcd submitted a job id this agent holds for a job with other
        parameters (a database reset or restored under the same
        installation): that job ends in ERROR in Django, and its file
        requests and delete are refused, so it never reaches the other job's
        files.  The record here stays the other job's."""
        key = _conflict_key(job_id)
        if self.state.get_meta(key) is None:
            self.state.set_meta(key, "1")
            log.error("hpcd submitted job {job} with other parameters than the job {job} this "
                      "agent holds; it ends in ERROR", job=job_id)
            self.state.report(job_id, JobStatus.ERROR, CONFLICT_DETAIL.format(job=job_id))
            self.flush()
        return {"scheduler_id": None, "status": int(JobStatus.ERROR)}

    @defer.inlineCallbacks
    def _submit(self, job_id, parameters):
        try:
            scheduler_id = yield self.in_thread(submit_job, self.scheduler(job_id), parameters)
        except InvalidParameters as e:
            self._record(job_id, JobStatus.ERROR, f"refused at submission: {e}")
        except SchedulerError as e:
            failures = self._submit_failures.get(job_id, 0) + 1
            self._submit_failures[job_id] = failures
            if failures >= SUBMIT_ATTEMPTS:
                self._submit_failures.pop(job_id)
                self._record(job_id, JobStatus.ERROR,
                             f"submission failed {failures} times, last: {e}")
            else:
                # Stays SUBMITTING without an id: hpcd sends submit again and
                # the scheduler is asked first whether it took the job.
                log.warn("submitting job {job} failed (attempt {n}): {error}",
                         job=job_id, n=failures, error=e)
        except Exception as e:
            log.failure("submitting job {job} failed", job=job_id)
            self._record(job_id, JobStatus.ERROR, f"submission failed: {e}")
        else:
            self._submit_failures.pop(job_id, None)
            self._record(job_id, JobStatus.SUBMITTED, scheduler_id=str(scheduler_id))
            self.poller.kick()

    @defer.inlineCallbacks
    def _resume_submit(self, job_id, parameters):
        found = yield self.in_thread(self.scheduler_class.find_submitted, self.settings,
                                     [job_id])
        if found is None and job_id in self._submit_failures:
            # This agent saw the last attempt fail (no crash in between): the
            # scheduler refused it, so trying again cannot run it twice.
            yield self._submit(job_id, parameters)
        elif found is None:
            self._record(job_id, JobStatus.ERROR,
                         "the agent stopped while submitting this job and the scheduler "
                         "cannot tell whether it took it; not resubmitted to avoid running "
                         "it twice: check the cluster and submit a new job if needed")
        elif job_id in found:
            self._record(job_id, JobStatus.SUBMITTED, scheduler_id=str(found[job_id]))
            self.poller.kick()
        else:
            yield self._submit(job_id, parameters)

    @defer.inlineCallbacks
    def reconcile(self):
        """After a start: settle jobs whose submission was interrupted."""
        stuck = [j.job for j in self.state.active_jobs()
                 if j.status == JobStatus.SUBMITTING and j.scheduler_id is None]
        for job_id in stuck:
            yield self._with_job_lock(job_id, self._reconcile_one, job_id)

    def _reconcile_one(self, job_id):
        # Requests from hpcd run meanwhile: a cancel may have ended the job,
        # or a submit settled it, since the list was made.
        job = self.state.get(job_id)
        if job is None or job.status != JobStatus.SUBMITTING or job.scheduler_id is not None:
            return None
        return self._resume_submit(job_id, job.parameters)

    @defer.inlineCallbacks
    def _on_cancel(self, message):
        job_id = message["job"]
        job = self.state.get(job_id)
        if job is None or (job.status == JobStatus.SUBMITTING and job.scheduler_id is None):
            # Never reached the scheduler: nothing runs, and a late submit
            # for it is answered from this record instead of running it.
            self._record(job_id, JobStatus.CANCELLED, "cancelled before submission")
        elif not is_final(job.status):
            # hpcd's state already; recorded here so the end states the
            # transition table allows after a cancel are accepted.
            self.state.set_status(job_id, JobStatus.CANCELLING)
            yield self.in_thread(self.scheduler(job_id, job.scheduler_id).cancel)
            self.poller.kick()
        return {"status": int(self.state.get(job_id).status)}

    @defer.inlineCallbacks
    def _on_delete(self, message):
        job_id = message["job"]
        if _is_conflict(self.state, job_id):
            # The data under this id is the other job's: keep it.
            self.state.report(job_id, JobStatus.DELETED, "nothing to delete: the directory "
                              "under this job id belongs to another job")
            self.flush()
            return {"status": int(JobStatus.DELETED)}
        job = self.state.get(job_id)
        if job is not None and not is_final(job.status):
            raise RequestFailed("job_active", f"job {job_id} is {job.status.name}: "
                                "cancel it before deleting its data")
        scheduler_id = job.scheduler_id if job else None
        if job is not None:
            self.state.set_status(job_id, JobStatus.DELETING)
        yield self.in_thread(self.scheduler(job_id, scheduler_id).delete_data)
        self._record(job_id, JobStatus.DELETED)
        return {"status": int(JobStatus.DELETED)}

    def _on_submit_many(self, message):
        """Each job as its own ``submit`` (in its job's lock, so a cancel
        that came first wins), all at once; answered per job once every
        state the answer reports is durable."""
        jobs = message["jobs"]
        calls = [self._with_job_lock(job["job"], self._on_submit, job) for job in jobs]

        def answer(results):
            answers = []
            for job, (ok, value) in zip(jobs, results):
                if ok:
                    answers.append({"job": job["job"], "ok": True, **value})
                elif value.check(RequestFailed):
                    answers.append({"job": job["job"], "ok": False, "error": value.value.code,
                                    "message": str(value.value)})
                else:
                    log.failure("submitting job {job} failed", value, job=job["job"])
                    answers.append({"job": job["job"], "ok": False, "error": "internal",
                                    "message": f"{value.type.__name__}: {value.value}"})
            return self.state.when_durable().addCallback(lambda _: {"jobs": answers})

        return defer.DeferredList(calls, consumeErrors=True).addCallback(answer)

    # -- updates to hpcd -----------------------------------------------------

    def _record(self, job_id, status, detail="", scheduler_id=None):
        if self.state.set_status(job_id, status, detail, scheduler_id) is not None:
            self.flush()

    def flush(self):
        """Send the durable updates hpcd has not seen on this connection yet,
        up to MAX_IN_FLIGHT unacknowledged (acknowledgements make room)."""
        if not self._ready:
            return
        due = self.reactor.seconds() + RESEND_SECONDS
        while len(self._in_flight) < MAX_IN_FLIGHT:
            updates = self.state.pending_updates(
                after=self._sent_upto, limit=min(1000, MAX_IN_FLIGHT - len(self._in_flight)))
            if not updates:
                break
            for update in updates:
                self._transmit(wire.encode("update", **update))
                self._sent_upto = update["seq"]
                self._in_flight[update["seq"]] = due
            self._arm_resend(due)

    def _arm_resend(self, at):
        call = self._resend_call
        if call is not None and call.active():
            if call.getTime() <= at:
                return
            call.cancel()
        self._resend_call = self.reactor.callLater(max(0.0, at - self.reactor.seconds()),
                                                   self._resend)

    def _resend(self):
        """Send again what is due: refused by hpcd's store, or never answered."""
        self._resend_call = None
        if not self._ready:
            return
        now = self.reactor.seconds()
        due = [seq for seq, at in self._in_flight.items() if at <= now]
        if due:
            again = self.state.updates(due)
            for seq in set(due) - {u["seq"] for u in again}:
                self._in_flight.pop(seq)  # acknowledged meanwhile, or pruned
            for update in again:
                self._transmit(wire.encode("update", **update))
                self._in_flight[update["seq"]] = now + RESEND_SECONDS
        if self._in_flight:
            self._arm_resend(min(self._in_flight.values()))

    # -- polling -------------------------------------------------------------

    @defer.inlineCallbacks
    def poll(self):
        """Ask the scheduler about every active job at once; True if any changed."""
        active = {j.job: j for j in self.state.active_jobs() if j.scheduler_id}
        if not active:
            return False
        states = yield self.in_thread(self.scheduler_class.status_many, self.settings,
                                      [(j.job, j.scheduler_id) for j in active.values()])
        changed = False
        for job_id, state in states.items():
            job = active.get(job_id)
            if job is None:
                continue
            if (state.started is not None and state.status in TERMINAL
                    and job.status in (JobStatus.SUBMITTED, JobStatus.QUEUED)):
                # It ran and ended between two polls: record that it ran.
                self.state.set_status(job_id, JobStatus.RUNNING)
            if self.state.set_status(job_id, state.status, state.detail) is not None:
                changed = True
        if changed:
            self.flush()
        return changed
