"""What the agent does with hpcd's messages and the scheduler's answers.

:class:`AgentCore` holds the logic and no sockets: the websocket protocol
hands it frames and a ``send`` function (see :mod:`hpc_agent.connection`),
and it calls the scheduler on a worker thread.  Tests drive it with a
recording ``send`` and a fake clock.
"""

import platform

from twisted.internet import defer, threads
from twisted.logger import Logger

from hpc_agent import __version__, files, wire
from hpc_agent.schedulers.base import InvalidParameters, SchedulerError, submit_job
from hpc_agent.state import is_final
from hpc_agent.status import TERMINAL, JobStatus

log = Logger()

#: Submit attempts that fail with a SchedulerError (the scheduler may be
#: briefly unavailable) before the job is reported as an error.
SUBMIT_ATTEMPTS = 5
#: Unacknowledged updates are sent again after this many seconds.
RESEND_SECONDS = 30.0


class RequestFailed(Exception):
    """A request cannot be done; ``code`` and the message go back to hpcd."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class AgentCore:
    """The agent's behaviour, between one websocket and one scheduler."""

    def __init__(self, settings, state, reactor, threadpool, start_transfer, nvx=False):
        self.settings = settings
        self.state = state
        self.scheduler_class = settings.scheduler_class()
        self.reactor = reactor
        self._threadpool = threadpool
        self._start_transfer = start_transfer
        self._nvx = nvx
        self._send = None
        self._welcomed = False
        self._sent_upto = 0
        self._sent_at = {}  # seq -> when it was last sent, until acknowledged
        self._locks = {}
        self._submit_failures = {}
        self.resume_token = None
        self.poller = Poller(self, reactor)
        self._handlers = {
            "welcome": self._on_welcome,
            "ack": self._on_ack,
            "error": self._on_error,
            "reply": self._on_reply,
        }
        self._requests = {
            "submit": self._on_submit,
            "cancel": self._on_cancel,
            "delete": self._on_delete,
            "list_files": self._on_list_files,
            "fetch_file": self._on_fetch_file,
        }

    def in_thread(self, f, *args, **kwargs):
        """Run blocking scheduler or file work off the event loop."""
        return threads.deferToThreadPool(self.reactor, self._threadpool, f, *args, **kwargs)

    def scheduler(self, job, scheduler_id=None):
        return self.scheduler_class(self.settings, job, scheduler_id)

    # -- connection events ---------------------------------------------------

    def connected(self, send):
        self._send = send
        self._welcomed = False
        self._sent_upto = 0
        self._sent_at = {}
        send(wire.encode(
            "hello", protocol=wire.PROTOCOL_VERSION, agent_version=__version__,
            scheduler=self.settings.HPC_SCHEDULER_CLASS, hostname=platform.node(),
            nvx=self._nvx))

    def lost(self):
        self._send = None
        self._welcomed = False

    def frame_received(self, payload):
        """One text frame from hpcd.  Never raises."""
        try:
            message = wire.decode(payload, accept=wire.FROM_HPCD)
        except wire.ProtocolError as e:
            log.warn("refused a frame from hpcd: {error}", error=e.message)
            self._transmit(wire.error_frame(e))
            return
        mtype = message["type"]
        if mtype in self._requests:
            self._serve(message)
        else:
            self._handlers[mtype](message)

    def _transmit(self, frame):
        if self._send is not None:
            self._send(frame)

    # -- hpcd's messages -----------------------------------------------------

    def _on_welcome(self, message):
        self._welcomed = True
        self.resume_token = message["resume_token"]
        log.info("connected to hpcd as cluster {cluster!r}", cluster=message["cluster"])
        self.flush()

    def _on_ack(self, message):
        self.state.acknowledge(message["seqs"])
        for seq in message["seqs"]:
            self._sent_at.pop(seq, None)

    def _on_error(self, message):
        log.warn("hpcd could not understand a frame: {code}: {message}",
                 code=message["code"], message=message["message"])

    def _on_reply(self, message):
        log.warn("unexpected reply {id} from hpcd", id=message["id"])

    def _serve(self, message):
        d = self._with_job_lock(message.get("job"), self._requests[message["type"]], message)

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
        if job is None:
            self.state.record_submitting(job_id, message["parameters"])
            yield self._submit(job_id, message["parameters"])
        elif job.status == JobStatus.SUBMITTING and job.scheduler_id is None:
            # Recorded but never confirmed: a crash, or a failed attempt.
            yield self._resume_submit(job_id, job.parameters)
        job = self.state.get(job_id)
        return {"scheduler_id": job.scheduler_id, "status": int(job.status)}

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
            yield self._with_job_lock(job_id, lambda _: self._resume_submit(
                job_id, self.state.get(job_id).parameters), None)

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

    def _roots(self, job_id):
        if job_id is not None:
            return [self.scheduler(job_id).get_working_directory()]
        return [self.settings.HPC_JOB_WORKING_DIRECTORY, *self.settings.HPC_ALLOWED_FILE_ROOTS]

    @defer.inlineCallbacks
    def _on_list_files(self, message):
        try:
            listing = yield self.in_thread(files.list_files, self._roots(message["job"]),
                                           message["path"], message["recursive"],
                                           message["job"] is not None)
        except files.PathRefused as e:
            raise RequestFailed("path_refused", str(e))
        return {"files": listing}

    @defer.inlineCallbacks
    def _on_fetch_file(self, message):
        job_id = message["job"]
        try:
            path = yield self.in_thread(files.resolve, self._roots(job_id), message["path"],
                                        job_id is not None)
            if path.is_dir():
                raise files.PathRefused(f"{message['path']!r} is a directory")
            handle = yield self.in_thread(open, path, "rb")
        except files.PathRefused as e:
            raise RequestFailed("path_refused", str(e))
        except OSError as e:
            raise RequestFailed("unreadable", f"{message['path']!r}: {e.strerror}")
        size = path.stat().st_size
        hooks = self.scheduler(job_id) if job_id is not None else None
        if hooks is not None:
            yield self.in_thread(hooks.file_send_start, str(path))
        done = self._start_transfer(message["token"], handle, path.name, size)
        if hooks is not None:
            done.addBoth(lambda r: self.in_thread(hooks.file_send_end, str(path)))
        return {"size": size}

    # -- updates to hpcd -----------------------------------------------------

    def _record(self, job_id, status, detail="", scheduler_id=None):
        if self.state.set_status(job_id, status, detail, scheduler_id) is not None:
            self.flush()

    def flush(self):
        """Send the updates hpcd has not seen on this connection yet."""
        if not self._welcomed:
            return
        now = self.reactor.seconds()
        overdue = [s for s, at in self._sent_at.items() if now - at > RESEND_SECONDS]
        if overdue:
            # Sent but never acknowledged (hpcd's write failed, say): send
            # again from the oldest such update, however busy the link is.
            self._sent_upto = min(self._sent_upto, min(overdue) - 1)
        for update in self.state.pending_updates(after=self._sent_upto):
            self._transmit(wire.encode("update", **update))
            self._sent_upto = update["seq"]
            self._sent_at[update["seq"]] = now

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


class Poller:
    """Polls fast while jobs change and backs off to slow when nothing does.

    Never faster than the scheduler's ``poll_fast_seconds`` nor than the
    site's command budget (``HPC_SCHEDULER_COMMANDS_PER_MINUTE``) allows.
    """

    def __init__(self, core, reactor):
        self._core = core
        self._reactor = reactor
        cls = core.scheduler_class
        budget = core.settings.HPC_SCHEDULER_COMMANDS_PER_MINUTE
        floor = 60.0 / budget if budget and getattr(cls, "rate_limited", True) else 0.0
        self.fast = max(cls.poll_fast_seconds, floor)
        self.slow = max(cls.poll_slow_seconds, self.fast)
        self.interval = self.slow
        self._call = None
        self._running = False
        self._last_poll = -1e9

    def start(self):
        self._schedule(0)

    def stop(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def kick(self):
        """Something changed (a submit, a cancel): poll soon and fast."""
        self.interval = self.fast
        wait = max(0.0, self._last_poll + self.fast - self._reactor.seconds())
        if self._call is not None and self._call.active():
            if self._call.getTime() - self._reactor.seconds() > wait:
                self._call.reset(wait)
        elif not self._running:
            self._schedule(wait)

    def _schedule(self, delay):
        self._call = self._reactor.callLater(delay, self._tick)

    @defer.inlineCallbacks
    def _tick(self):
        self._call = None
        self._running = True
        self._last_poll = self._reactor.seconds()
        try:
            changed = yield self._core.poll()
        except Exception:
            log.failure("polling the scheduler failed")
            changed = False
        finally:
            self._running = False
        self._core.flush()
        self.interval = self.fast if changed else min(self.slow, self.interval * 2)
        if self._call is None:
            self._schedule(self.interval)
