"""Saying so in the log when a job waits on hpcd for too long.

A job that hpcd owes a message to (PENDING, SUBMITTING, CANCELLING,
DELETING) normally moves on within seconds.  One that has not moved for
``HPC_STUCK_JOB_SECONDS`` gets a warning naming its cluster, its state, how
long it has waited and what it waits for (a cluster that is offline, or has
none yet), and another each further period it stays: an operator reading
the log finds it without querying the database.  Jobs queued or running on
a cluster are the scheduler's business, and may rightly wait for days.
"""

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

log = Logger()


class StuckJobs(service.Service):
    """Every minute, asks the store for jobs waiting on hpcd too long."""

    name = "stuck-jobs"

    def __init__(self, reactor, store, clusters, threshold, every=60.0):
        self._reactor = reactor
        self._store = store
        self._clusters = clusters
        self._threshold = threshold
        self._every = every
        self._warned = {}  # job id -> (state, the waited time at the last warning)
        self._loop = None

    def startService(self):
        super().startService()
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self._reactor
        self._loop.start(self._every, now=False)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def check(self):
        d = self._store.stuck_jobs(self._threshold)
        d.addCallback(self._report)
        d.addErrback(lambda f: log.failure("looking for stuck jobs failed", f))
        return d

    def _report(self, jobs):
        seen = {}
        for job in jobs:
            previous = self._warned.get(job["job"])
            if (previous is not None and previous[0] == job["status"]
                    and job["waited"] < previous[1] + self._threshold):
                seen[job["job"]] = previous  # warned in this period already
                continue
            seen[job["job"]] = (job["status"], job["waited"])
            log.warn("cluster {cluster} job {job}: {status} for {minutes:.0f} min; {why}",
                     cluster=job["cluster_id"], job=job["job"], status=job["status"],
                     minutes=job["waited"] / 60, why=self._why(job),
                     hpc_event="job_stuck", reason=job["status"])
        self._warned = seen

    def _why(self, job):
        if job["cluster_id"] is None:
            return ("no cluster was chosen for it yet (choose_cluster found none online; "
                    "see hpc_status)")
        if self._clusters.session(job["cluster_id"]) is None:
            return ("its cluster is offline: see the cluster's status_detail or "
                    "python manage.py hpc_status")
        return "its cluster is online but has not answered for it: see the agent's log"
