"""Every database access hpcd makes, on a thread pool of its own.

The reactor thread never touches the ORM (on the default reactor an ORM
call there does not fail, it silently blocks everything).  Functions named
``*_thd`` run on the pool; the :class:`Store` methods without the suffix
return Deferreds.  Each call closes stale connections before and after, and
hands back plain values, never querysets or model instances.
"""

import time
from datetime import timedelta

from django.db import close_old_connections, connection, transaction
from django.db.models import Count
from django.utils import timezone
from twisted.application import service
from twisted.internet import threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from djangoapp import transitions
from djangoapp.models import HpcCluster, HpcJob, WebsocketToken, get_job_model
from hpc_agent.status import NEEDS_DISPATCH, JobStatus
from hpcd.metrics import DatabaseStats

log = Logger()


_CLUSTER_FIELDS = ("id", "host_name", "port", "client_path", "enabled")


# -- clusters ------------------------------------------------------------------

def clusters_thd():
    """Every cluster, without its credentials."""
    return list(HpcCluster.objects.values(*_CLUSTER_FIELDS))


def cluster_thd(cluster_id):
    """One cluster with its decrypted credentials, for a login; None if gone.

    A credential that cannot be decrypted raises CredentialKeyError, whose
    message names the setting to fix.
    """
    c = HpcCluster.objects.filter(pk=cluster_id).first()
    if c is None:
        return None
    return {**{f: getattr(c, f) for f in _CLUSTER_FIELDS}, "username": c.username,
            "key": c.key, "password": c.password, "host_key": c.host_key}


def mark_all_offline_thd():
    """At start: nothing is connected to a daemon that just started."""
    HpcCluster.objects.filter(online=True).update(online=False, connected_since=None)


def set_cluster_state_thd(cluster_id, online, detail):
    HpcCluster.objects.filter(pk=cluster_id).update(
        online=online, status_detail=detail,
        connected_since=timezone.now() if online else None)


def set_cluster_detail_thd(cluster_id, detail):
    HpcCluster.objects.filter(pk=cluster_id).update(status_detail=detail)


# -- tokens ----------------------------------------------------------------------

def issue_token_thd(cluster_id, purpose, ttl):
    """A new token; returns ``(token_id, secret)``.  A new resume token
    revokes the cluster's older unused ones: only the latest resumes."""
    with transaction.atomic():
        if purpose == "resume":
            WebsocketToken.objects.filter(cluster_id=cluster_id, purpose="resume",
                                          used_at__isnull=True).update(used_at=timezone.now())
        row, secret = WebsocketToken.objects.issue(cluster_id, purpose, ttl)
    return row.pk, secret


def claim_token_thd(secret, purposes):
    """``{"token_id", "cluster_id", "purpose"}`` for a valid token, spending it."""
    row = WebsocketToken.objects.claim(secret, purposes)
    if row is None:
        return None
    return {"token_id": row.pk, "cluster_id": row.cluster_id, "purpose": row.purpose}


def token_cluster_thd(token_id):
    return WebsocketToken.objects.filter(pk=token_id).values_list(
        "cluster_id", flat=True).first()


def purge_tokens_thd(keep_ids, older_than_seconds=86400):
    """Forget tokens older than a day that prove nothing any more: not the
    latest unused resume tokens, and not those of live connections
    (``keep_ids``), which is_connected() returns."""
    cutoff = timezone.now() - timedelta(seconds=older_than_seconds)
    return WebsocketToken.objects.filter(created__lt=cutoff).exclude(
        purpose="resume", used_at__isnull=True).exclude(pk__in=keep_ids).delete()[0]


# -- jobs ------------------------------------------------------------------------

def _assign_clusters_thd(job_ids):
    """PENDING jobs without a cluster get one from the job class's own
    choose_cluster(), now that some cluster may be online."""
    model = get_job_model()
    for job in model.objects.filter(pk__in=job_ids, cluster__isnull=True,
                                    job_status=JobStatus.PENDING):
        cluster = job.choose_cluster(job.job_parameters)
        if cluster is not None:
            HpcJob.objects.filter(pk=job.pk, cluster__isnull=True).update(cluster=cluster)


def work_thd(job_id=None):
    """Jobs hpcd owes a message to: ``[{"job", "status", "cluster_id", "parameters"}]``."""
    jobs = HpcJob.objects.filter(job_status__in=[int(s) for s in NEEDS_DISPATCH])
    if job_id is not None:
        jobs = jobs.filter(pk=job_id)
    orphans = list(jobs.filter(cluster__isnull=True).values_list("pk", flat=True))
    if orphans:
        _assign_clusters_thd(orphans)
    return [{"job": pk, "status": JobStatus(status), "cluster_id": cluster_id,
             "parameters": parameters}
            for pk, status, cluster_id, parameters in jobs.exclude(cluster__isnull=True)
            .order_by("pk").values_list("pk", "job_status", "cluster_id", "job_parameters")]


def transition_thd(job_id, new, detail=""):
    applied, _ = transitions.apply(job_id, new, "hpcd", detail)
    return applied


def apply_updates_thd(cluster_id, updates):
    """Apply an agent's updates in one transaction; returns the seqs to ack.

    Idempotent: a replayed or stale update is refused by the transition
    table and acknowledged all the same, so the agent stops resending it.
    An update about a job of another cluster is refused and logged: an
    agent speaks only for its own cluster.
    """
    owners = dict(HpcJob.objects.filter(pk__in={u["job"] for u in updates})
                  .values_list("pk", "cluster_id"))
    acked, changes = [], []
    with transaction.atomic():
        for u in updates:
            if owners.get(u["job"]) != cluster_id:
                log.warn("cluster {cluster} reported on job {job}, which is not its own; "
                         "ignored", cluster=cluster_id, job=u["job"])
            else:
                try:
                    status = JobStatus(u["status"])
                except ValueError:
                    log.warn("job {job}: unknown status {status} ignored", job=u["job"],
                             status=u["status"])
                else:
                    extra = {"remote_job_id": u["scheduler_id"]} if u["scheduler_id"] else None
                    applied, old = transitions.apply(u["job"], status, "agent", u["detail"],
                                                     extra=extra)
                    if applied:
                        changes.append((u["job"], old, status, u["detail"]))
                    log_update(cluster_id, u["job"], applied, old, status, u["detail"])
            acked.append(u["seq"])
    _notify_job_class(changes)
    return acked


def log_update(cluster_id, job_id, applied, old, new, detail):
    """One line per state change an agent reported; a refused one says why
    (an update the job already has is a replay, and not worth a line)."""
    if applied or old != new:
        log.info("cluster {cluster} job {job}: {old} -> {new}{why}{detail}", cluster=cluster_id,
                 job=job_id, old=old.name if old is not None else "gone", new=new.name,
                 why="" if applied else " refused by the transition table",
                 detail=f": {detail}" if detail else "",
                 hpc_event="state_change" if applied else "update_refused",
                 reason=f"{old.name if old is not None else 'gone'} -> {new.name}")


def _notify_job_class(changes):
    """Call the job class's on_status_change() for each stored change.

    After the commit, and each on its own: a hook that fails is logged and
    changes nothing (the state is stored and acknowledged already).
    """
    model = get_job_model()
    for job_id, old, new, detail in changes:
        try:
            job = model.objects.filter(pk=job_id).first()
            if job is not None:
                job.on_status_change(old, new, detail)
        except Exception:
            log.failure("{model}.on_status_change failed for job {job}",
                        model=model.__name__, job=job_id)


# -- operations ------------------------------------------------------------------

def ping_thd():
    """One round trip to the database (for /healthz)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def job_counts_thd():
    """``{(cluster_id or None, state name): count}`` of every job."""
    rows = HpcJob.objects.order_by().values("cluster_id", "job_status").annotate(n=Count("id"))
    return {(r["cluster_id"], JobStatus(r["job_status"]).name): r["n"] for r in rows}


class Store(service.Service):
    """Runs the ``*_thd`` functions on hpcd's database thread pool.

    One explicit method per function, each returning a Deferred: a typo
    fails at once, a search finds every caller, and the unit tests' fakes
    are checked against these signatures (tests/unit/hpcd/test_fakes.py).
    """

    name = "store"

    def __init__(self, reactor, threads_count):
        self._reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=threads_count, name="hpcd-db")
        self.stats = DatabaseStats()

    def startService(self):
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        if self.pool.started:
            self.pool.stop()

    def run(self, f, *args, **kwargs):
        """Run ``f`` on the pool, between two ``close_old_connections``,
        counting how long it waited for a thread and ran (``self.stats``)."""
        name = f.__name__.removesuffix("_thd")
        queued = time.monotonic()
        self.stats.queued()

        def call():
            started = time.monotonic()
            self.stats.started(name, started - queued)
            close_old_connections()
            try:
                return f(*args, **kwargs)
            finally:
                close_old_connections()
                self.stats.finished(name, started - queued, time.monotonic() - started)

        return threads.deferToThreadPool(self._reactor, self.pool, call)

    # -- clusters ----------------------------------------------------------------

    def clusters(self):
        return self.run(clusters_thd)

    def cluster(self, cluster_id):
        return self.run(cluster_thd, cluster_id)

    def mark_all_offline(self):
        return self.run(mark_all_offline_thd)

    def set_cluster_state(self, cluster_id, online, detail):
        return self.run(set_cluster_state_thd, cluster_id, online, detail)

    def set_cluster_detail(self, cluster_id, detail):
        return self.run(set_cluster_detail_thd, cluster_id, detail)

    # -- tokens ------------------------------------------------------------------

    def issue_token(self, cluster_id, purpose, ttl):
        return self.run(issue_token_thd, cluster_id, purpose, ttl)

    def claim_token(self, secret, purposes):
        return self.run(claim_token_thd, secret, purposes)

    def token_cluster(self, token_id):
        return self.run(token_cluster_thd, token_id)

    def purge_tokens(self, keep_ids, older_than_seconds=86400):
        return self.run(purge_tokens_thd, keep_ids, older_than_seconds)

    # -- jobs --------------------------------------------------------------------

    def work(self, job_id=None):
        return self.run(work_thd, job_id)

    def transition(self, job_id, new, detail=""):
        return self.run(transition_thd, job_id, new, detail)

    def apply_updates(self, cluster_id, updates):
        return self.run(apply_updates_thd, cluster_id, updates)

    # -- operations --------------------------------------------------------------

    def ping(self):
        return self.run(ping_thd)

    def job_counts(self):
        return self.run(job_counts_thd)
