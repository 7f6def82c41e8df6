"""Every database access hpcd makes, on a thread pool of its own.

The reactor thread never touches the ORM (on the default reactor an ORM
call there does not fail, it silently blocks everything).  Functions named
``*_thd`` run on the pool; the :class:`Store` methods without the suffix
return Deferreds.  Each hands back plain values, never querysets or model
instances.

Each pool thread keeps its database connection from one call to the next,
whatever the site's ``CONN_MAX_AGE`` (which is about web requests): opening
a PostgreSQL connection per call cost hpcd about 15% of its time under
load.  A connection is checked before use when its last use raised an error
or it sat idle long enough for a server restart to have cut it, and closed
if it no longer works; one a caller left outside autocommit is closed.
"""

import threading
import time
from datetime import timedelta

from django.db import connection, connections, transaction
from django.db.models import Count, Max
from django.utils import timezone
from twisted.application import service
from twisted.internet import threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from djangoapp import submission, transitions
from djangoapp.conf import hpc_settings
from djangoapp.models import HpcCluster, HpcInstallation, HpcJob, WebsocketToken, get_job_model
from djangoapp.protocol import ParametersRefused
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
            **c.credentials(), "host_key": c.host_key}


def mark_all_offline_thd(resume_ttl):
    """At start and at a clean stop: nothing is connected to this daemon."""
    with transaction.atomic():
        HpcCluster.objects.filter(online=True).update(online=False, connected_since=None)
        _arm_resume_tokens(WebsocketToken.objects.all(), resume_ttl)


def set_cluster_state_thd(cluster_id, online, detail, resume_ttl=None):
    """Record a cluster's agent as connected or not; when it goes, its resume
    token starts to expire (``resume_ttl`` seconds)."""
    with transaction.atomic():
        HpcCluster.objects.filter(pk=cluster_id).update(
            online=online, status_detail=detail,
            connected_since=timezone.now() if online else None)
        if not online and resume_ttl is not None:
            _arm_resume_tokens(WebsocketToken.objects.filter(cluster_id=cluster_id), resume_ttl)


def _arm_resume_tokens(tokens, ttl):
    # A resume token has no expiry while its connection lives (that may be
    # months); from the moment the connection is gone it has ``ttl`` seconds.
    tokens.filter(purpose="resume", used_at__isnull=True, expires__isnull=True).update(
        expires=timezone.now() + timedelta(seconds=ttl))


def prepare_launch_thd(cluster_id, ttl):
    """What launching a cluster's agent needs, in one transaction (one round
    trip of fifty when hpcd launches fifty agents at once): ``(cluster,
    (token_id, secret))``, the cluster as :func:`cluster_thd` gives it and a
    new agent token valid ``ttl`` seconds, its detail now "launching the
    agent"; None if the cluster is gone."""
    with transaction.atomic():
        info = cluster_thd(cluster_id)
        if info is None:
            return None
        row, secret = WebsocketToken.objects.issue(cluster_id, "agent", ttl)
        set_cluster_detail_thd(cluster_id, "launching the agent")
    return info, (row.pk, secret)


def set_cluster_detail_thd(cluster_id, detail):
    HpcCluster.objects.filter(pk=cluster_id).update(status_detail=detail)


def installation_id_thd():
    """This installation's id (HpcInstallation), as hpcd's welcome sends it."""
    return str(HpcInstallation.current().installation_id)


def welcome_thd(cluster_id):
    """What hpcd's welcome to a cluster's new agent carries, in one round trip:
    ``(installation id, (token_id, secret))``, the secret a new resume token
    (which revokes the older ones, see :func:`issue_token_thd`)."""
    return installation_id_thd(), issue_token_thd(cluster_id, "resume", None)


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


def check_token_thd(secret, purposes):
    """``{"token_id", "cluster_id", "purpose"}`` for a valid token, or None;
    the token stays unspent (see hpcd.agents)."""
    row = WebsocketToken.objects.usable(secret, purposes)
    if row is None:
        return None
    return {"token_id": row.pk, "cluster_id": row.cluster_id, "purpose": row.purpose}


def claim_token_thd(secret, purposes):
    """``{"token_id", "cluster_id", "purpose", "created", "expires", "used_at"}``
    for a valid token, spending it.  The times let IsClusterOnline answer the
    whole token from memory (is_connected() makes no query)."""
    row = WebsocketToken.objects.claim(secret, purposes)
    if row is None:
        return None
    return {"token_id": row.pk, "cluster_id": row.cluster_id, "purpose": row.purpose,
            "created": row.created, "expires": row.expires, "used_at": row.used_at}


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

# Where the last bounded round of cluster choices stopped: the next one
# starts after it, so every waiting job gets its turn.
_assign_after = 0


def _assign_clusters_thd(job_ids, limit=None):
    """PENDING jobs without a cluster get one from the job class's own
    choose_cluster(), now that some cluster may be online; returns
    ``{job_id: cluster_id}`` of those that got one.

    At most ``limit`` (HPC_DISPATCH_ASSIGN_LIMIT) jobs are asked per call,
    in turn.  A row that is not one of HPC_JOB_CLASS (created as a plain
    HpcJob while the setting names a subclass) can never be asked: it ends
    in ERROR saying so, instead of being fetched again by every scan.
    """
    global _assign_after
    limit = limit or int(hpc_settings.HPC_DISPATCH_ASSIGN_LIMIT)
    ids = sorted(job_ids)
    turn = ([i for i in ids if i > _assign_after] + [i for i in ids if i <= _assign_after])
    turn = turn[:limit]
    if not turn:
        return {}
    _assign_after = turn[-1]
    model = get_job_model()
    jobs = model._base_manager.in_bulk(turn)
    assigned = {}
    for job in (jobs[i] for i in turn if i in jobs):
        if job.job_status != JobStatus.PENDING or job.cluster_id is not None:
            continue
        try:
            cluster = job.choose_cluster(job.job_parameters)
        except Exception:
            log.failure("{model}.choose_cluster failed for job {job}", model=model.__name__,
                        job=job.pk)
            continue
        if cluster is not None and HpcJob.objects.filter(
                pk=job.pk, cluster__isnull=True).update(cluster=cluster):
            assigned[job.pk] = cluster.pk
    for job_id in sorted(set(turn) - set(jobs)):
        applied, _ = transitions.apply(
            job_id, JobStatus.ERROR, "hpcd", robust=True, detail=(
                f"job {job_id} was created as a plain HpcJob, but HPC_JOB_CLASS is "
                f"{model._meta.label}: hpcd loads jobs only through that class, so nothing "
                "can choose its cluster. Create jobs with djangoapp.models.get_job_model()."))
        if applied:
            log.warn("job {job} is not a {model}; it ended in ERROR", job=job_id,
                     model=model._meta.label)
    return assigned


def work_thd(job_id=None):
    """Jobs hpcd owes a message to: ``[{"job", "status", "cluster_id", "parameters"}]``.

    ``job_id`` None or 0: every such job (a scan); otherwise that job only.
    One query, plus a bounded round of cluster choices for jobs without one.
    """
    jobs = HpcJob.objects.filter(job_status__in=[int(s) for s in NEEDS_DISPATCH])
    if job_id:
        jobs = jobs.filter(pk=job_id)
    return _work_of_rows_thd(list(jobs.order_by("pk").values_list(
        "pk", "job_status", "cluster_id", "job_parameters")))


def _work_of_rows_thd(rows):
    """work_thd's answer for rows of (pk, status, cluster_id, parameters):
    jobs no frame can carry end in ERROR, jobs without a cluster get one (a
    bounded round), and those still without one are left for a later scan."""
    unsendable = _end_unsendable_thd(rows)
    if unsendable:
        rows = [row for row in rows if row[0] not in unsendable]
    orphans = [pk for pk, status, cluster_id, _ in rows
               if cluster_id is None and status == JobStatus.PENDING]
    assigned = _assign_clusters_thd(orphans) if orphans else {}
    return [{"job": pk, "status": JobStatus(status), "cluster_id": cluster_id or assigned[pk],
             "parameters": parameters}
            for pk, status, cluster_id, parameters in rows
            if cluster_id is not None or pk in assigned]


def _end_unsendable_thd(rows):
    """SUBMITTING jobs whose parameters no submit frame can carry (written
    around submit(), which refuses them, or before it did) end in ERROR
    saying why, instead of being sent, and refused, on every scan; returns
    their ids.  Only SUBMITTING ones are checked: a job is SUBMITTING before
    its first send, so each is caught by the scan after it, at the latest."""
    limit = submission.parameters_limit()
    ended = set()
    for pk, status, _, parameters in rows:
        if status != JobStatus.SUBMITTING:
            continue
        try:
            submission.check_parameters(pk, parameters, limit)
        except ParametersRefused as e:
            transitions.apply(pk, JobStatus.ERROR, "hpcd", str(e), robust=True)
            log.warn("job {job} ends in ERROR: {why}", job=pk, why=e,
                     hpc_event="dispatch_failed", action="submit")
            ended.add(pk)
    return ended


def stuck_jobs_thd(threshold_seconds, limit=100):
    """Jobs hpcd owes a message to whose last change is older than the
    threshold: ``[{"job", "status" (a name), "cluster_id", "waited" (s)}]``,
    the longest waiting first, at most ``limit``."""
    now = timezone.now()
    rows = (HpcJob.objects.filter(job_status__in=[int(s) for s in NEEDS_DISPATCH])
            .annotate(last=Max("status_changes__time"))
            .filter(last__lt=now - timedelta(seconds=threshold_seconds))
            .order_by("last").values_list("pk", "job_status", "cluster_id", "last")[:limit])
    return [{"job": pk, "status": JobStatus(status).name, "cluster_id": cluster_id,
             "waited": (now - last).total_seconds()}
            for pk, status, cluster_id, last in rows]


def transition_thd(job_id, new, detail=""):
    applied, _ = transitions.apply(job_id, new, "hpcd", detail, robust=True)
    return applied


def transition_many_thd(job_ids, new, detail=""):
    """Move many jobs to ``new`` in one transaction, each by the transition
    table (for the dispatcher: PENDING -> SUBMITTING for a whole scan, a few
    statements instead of two per job); returns the ids of those moved."""
    new = JobStatus(new)
    changes, _ = transitions.apply_batch(
        [{"job": job_id, "status": new, "detail": detail, "scheduler_id": None}
         for job_id in job_ids], "hpcd")
    return [change.job for change in changes]


def work_of_thd(job_ids):
    """:func:`work_thd` for the jobs ``job_ids`` (notifications that came
    together), in one query per 500 jobs."""
    rows = []
    for chunk in transitions.chunks(sorted(set(job_ids))):
        rows.extend(HpcJob.objects.filter(
            pk__in=chunk, job_status__in=[int(s) for s in NEEDS_DISPATCH]).values_list(
            "pk", "job_status", "cluster_id", "job_parameters"))
    rows.sort()
    return _work_of_rows_thd(rows)


def claim_work_thd(cluster_id, limit, max_bytes):
    """Claim up to ``limit`` of the cluster's PENDING jobs, oldest first,
    whose parameters take at most ``max_bytes`` encoded (at least one job):
    they move to SUBMITTING in one transaction, each by compare-and-set, so
    a job is claimed once whoever else claims.  Returns the claimed
    ``[{"job", "parameters"}]``; the dispatcher sends them after this."""
    rows = list(HpcJob.objects.filter(cluster_id=cluster_id, job_status=JobStatus.PENDING)
                .order_by("pk").values_list("pk", "job_parameters")[:limit])
    batch, size = [], 0
    for pk, parameters in rows:
        try:
            size += submission.encoded_size(parameters) + 32
        except (TypeError, ValueError):
            pass  # not JSON: _end_unsendable_thd ends it in ERROR below
        if batch and size > max_bytes:
            break
        batch.append((pk, parameters))
    if not batch:
        return []
    moved = set(transition_many_thd([pk for pk, _ in batch], JobStatus.SUBMITTING))
    claimed = [(pk, JobStatus.SUBMITTING, cluster_id, parameters)
               for pk, parameters in batch if pk in moved]
    # Written around submit()'s size check: ERROR now, not a refused send.
    unsendable = _end_unsendable_thd(claimed)
    return [{"job": pk, "parameters": parameters} for pk, _, _, parameters in claimed
            if pk not in unsendable]


def apply_updates_thd(cluster_id, updates):
    """Apply an agent's updates in one transaction; returns the seqs to ack.

    Batched (transitions.apply_batch): a constant number of statements per
    batch, one history row per applied change, each a compare-and-set.
    Idempotent: a replayed or stale update is refused by the transition
    table and acknowledged all the same, so the agent stops resending it.
    An update about a job of another cluster is refused and logged: an
    agent speaks only for its own cluster.
    """
    valid = []
    detail_limit = int(hpc_settings.HPC_JOB_DETAIL_MAX_CHARS)
    for u in updates:
        try:
            valid.append(_bounded(cluster_id, {**u, "status": JobStatus(u["status"])},
                                  detail_limit))
        except ValueError:
            log.warn("job {job}: unknown status {status} ignored", job=u["job"],
                     status=u["status"])
    skipped = []
    changes, refused = transitions.apply_batch(valid, "agent", cluster_id=cluster_id,
                                               skipped=skipped)
    for job in sorted(set(refused)):
        log.warn("cluster {cluster} reported on job {job}, which is not its own; ignored",
                 cluster=cluster_id, job=job, hpc_event="update_refused",
                 reason="another cluster's job")
    for change in changes:
        log_update(cluster_id, change.job, True, change.old, change.new, change.detail)
    for change in skipped:
        log_update(cluster_id, change.job, False, change.old, change.new, change.detail)
    _notify_job_class(changes)
    return [u["seq"] for u in updates]


def cap_detail(detail, limit):
    """``detail`` cut to ``limit`` characters, the cut said at its end: an
    agent's detail is stored in the job and in its history, and shown in the
    admin, so megabytes of scheduler output must not reach them."""
    if len(detail) <= limit:
        return detail
    keep = max(0, limit - 48)  # the marker's room
    return detail[:keep] + f" [... {len(detail) - keep} more characters cut]"


#: The longest scheduler id the remote_job_id column holds.
REMOTE_ID_MAX = HpcJob._meta.get_field("remote_job_id").max_length


def _bounded(cluster_id, update, detail_limit):
    """An update whose detail fits HPC_JOB_DETAIL_MAX_CHARS and whose
    scheduler id fits its column.  A longer id fails that job alone, as an
    ERROR saying why (PostgreSQL would refuse the whole batch; SQLite would
    store it); the job's later updates are then refused as after any end."""
    update = {**update, "detail": cap_detail(update.get("detail") or "", detail_limit)}
    scheduler_id = update.get("scheduler_id")
    if scheduler_id and len(scheduler_id) > REMOTE_ID_MAX:
        log.warn("cluster {cluster} reported job {job} with a scheduler id of {n} "
                 "characters; the job ends in ERROR", cluster=cluster_id, job=update["job"],
                 n=len(scheduler_id),
                 hpc_event="update_refused", reason="scheduler id too long")
        update.update(status=JobStatus.ERROR, scheduler_id=None, detail=cap_detail(
            f"the scheduler's id for this job is {len(scheduler_id)} characters long, more "
            f"than the {REMOTE_ID_MAX} the database holds (it begins "
            f"{scheduler_id[:64]!r}); the job may still run on the cluster: check there",
            detail_limit))
    return update


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
    changes nothing (the state is stored and acknowledged already).  The
    jobs are loaded in one query, and only when the class overrides the
    hook; a job changed twice is reloaded before its second call.
    """
    model = get_job_model()
    if not changes or model.on_status_change is HpcJob.on_status_change:
        return
    try:
        jobs = model._base_manager.in_bulk(list({c.job for c in changes}))
    except Exception:
        log.failure("loading {n} jobs for {model}.on_status_change failed", n=len(changes),
                    model=model.__name__)
        return
    called = set()
    for change in changes:
        job = jobs.get(change.job)
        if job is None:
            continue
        try:
            if change.job in called:
                job.refresh_from_db()
            called.add(change.job)
            job.on_status_change(change.old, change.new, change.detail)
        except Exception:
            log.failure("{model}.on_status_change failed for job {job}",
                        model=model.__name__, job=change.job)


#: A connection idle this long is checked (``SELECT 1``) before its next use.
IDLE_CHECK_SECONDS = 30.0

_last_use = threading.local()


def _works(conn):
    """One ``SELECT 1`` on the raw connection (Django's own is_usable()
    trusts any SQLite connection, even a closed one)."""
    try:
        cursor = conn.connection.cursor()
        try:
            cursor.execute("SELECT 1")
        finally:
            cursor.close()
    except Exception:
        return False
    return True


def _healthy_connections():
    """Close this thread's connections that are broken, or that a caller
    left outside autocommit; keep the rest open for the next call."""
    idle = time.monotonic() - getattr(_last_use, "at", 0.0)
    for conn in connections.all(initialized_only=True):
        if conn.connection is None:
            continue
        if conn.get_autocommit() != conn.settings_dict["AUTOCOMMIT"]:
            _discard(conn)
        elif conn.errors_occurred or idle > IDLE_CHECK_SECONDS:
            if _works(conn):
                conn.errors_occurred = False
            else:
                _discard(conn)


def _discard(conn):
    # Closing a connection the server already dropped may raise (MySQLdb:
    # "2006 server has gone away"); Django forgets it all the same.
    try:
        conn.close()
    except Exception:
        pass


def run_thd(f, *args, **kwargs):
    """Run ``f`` on a pool thread with a healthy connection."""
    _healthy_connections()
    try:
        return f(*args, **kwargs)
    finally:
        _last_use.at = time.monotonic()


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
        """Run ``f(*args, **kwargs)`` on the pool with a healthy connection
        (:func:`run_thd`); a Deferred of its result.  Counts how long it
        waited for a thread and ran (``self.stats``)."""
        name = f.__name__.removesuffix("_thd")
        queued = time.monotonic()
        self.stats.queued()

        def call():
            started = time.monotonic()
            self.stats.started(name, started - queued)
            try:
                return run_thd(f, *args, **kwargs)
            finally:
                self.stats.finished(name, started - queued, time.monotonic() - started)

        return threads.deferToThreadPool(self._reactor, self.pool, call)

    # -- clusters ----------------------------------------------------------------

    def clusters(self):
        return self.run(clusters_thd)

    def cluster(self, cluster_id):
        return self.run(cluster_thd, cluster_id)

    def mark_all_offline(self, resume_ttl):
        return self.run(mark_all_offline_thd, resume_ttl)

    def set_cluster_state(self, cluster_id, online, detail, resume_ttl=None):
        return self.run(set_cluster_state_thd, cluster_id, online, detail, resume_ttl)

    def set_cluster_detail(self, cluster_id, detail):
        return self.run(set_cluster_detail_thd, cluster_id, detail)

    def prepare_launch(self, cluster_id, ttl):
        return self.run(prepare_launch_thd, cluster_id, ttl)

    def welcome(self, cluster_id):
        return self.run(welcome_thd, cluster_id)

    # -- tokens ------------------------------------------------------------------

    def issue_token(self, cluster_id, purpose, ttl):
        return self.run(issue_token_thd, cluster_id, purpose, ttl)

    def check_token(self, secret, purposes):
        return self.run(check_token_thd, secret, purposes)

    def claim_token(self, secret, purposes):
        return self.run(claim_token_thd, secret, purposes)

    def token_cluster(self, token_id):
        return self.run(token_cluster_thd, token_id)

    def purge_tokens(self, keep_ids, older_than_seconds=86400):
        return self.run(purge_tokens_thd, keep_ids, older_than_seconds)

    # -- jobs --------------------------------------------------------------------

    def work(self, job_id=None):
        return self.run(work_thd, job_id)

    def work_of(self, job_ids):
        return self.run(work_of_thd, job_ids)

    def claim_work(self, cluster_id, limit, max_bytes):
        return self.run(claim_work_thd, cluster_id, limit, max_bytes)

    def stuck_jobs(self, threshold_seconds, limit=100):
        return self.run(stuck_jobs_thd, threshold_seconds, limit)

    def transition(self, job_id, new, detail=""):
        return self.run(transition_thd, job_id, new, detail)

    def transition_many(self, job_ids, new, detail=""):
        return self.run(transition_many_thd, job_ids, new, detail)

    def apply_updates(self, cluster_id, updates):
        return self.run(apply_updates_thd, cluster_id, updates)

    # -- operations --------------------------------------------------------------

    def ping(self):
        return self.run(ping_thd)

    def job_counts(self):
        return self.run(job_counts_thd)
