"""Changing a job's state: the functions every writer calls.

Every change is checked against the one transition table
(:func:`hpc_agent.status.can_transition`), recorded in the job's history in
the same transaction, and announced after the commit with
:data:`djangoapp.signals.job_status_changed`.  Two ways to write, chosen by
the job's class:

* **Compare-and-set** (the default): ``UPDATE ... WHERE job_status = <what
  was read>`` on HpcJob's own table.  One statement, correct on PostgreSQL
  under real races and free of SQLite's "database is locked" under
  concurrent ``select_for_update``.  If another writer got there first, the
  state is read again and the change re-decided, so nothing the table
  forbids from the state the job is really in is ever applied.
* **Through the model**, when ``pre_save`` or ``post_save`` receivers are
  connected for the job's class: the row is locked (``select_for_update``;
  SQLite has no row locks, and its IMMEDIATE transactions serialise the
  writers instead), the table consulted, and the instance saved with
  ``save(update_fields=...)``.  The receivers see every change as the seed's
  ``job.save()`` showed it to them: the new state on the instance, the old
  row still in the database during ``pre_save``.

:func:`apply_batch` applies many changes (an agent's updates) in one
transaction with a number of statements that does not grow with the batch:
one read of every job's state, one compare-and-set ``UPDATE`` per group of
jobs making the same moves, one insert of the history rows.  Jobs whose
compare-and-set lost a race are applied one by one afterwards.
"""

import logging
from collections import namedtuple

from django.db import connection, transaction
from django.db.models.expressions import RawSQL
from django.db.models.signals import post_save, pre_save
from django.utils import timezone

from djangoapp.signals import job_status_changed
from hpc_agent.status import ALLOWED_FROM, TIME_FIELDS, JobStatus, can_transition

log = logging.getLogger(__name__)

#: One applied change of a job's state.
Change = namedtuple("Change", "job old new detail source")


class JobStateError(Exception):
    """The job is in a state that does not allow what was asked."""


class _LostRace(Exception):
    """A compare-and-set matched fewer rows than it was meant to."""


def model_receivers(model):
    """Whether ``pre_save``/``post_save`` receivers are connected for ``model``:
    then its changes are saved through the model so that they see them."""
    return pre_save.has_listeners(model) or post_save.has_listeners(model)


def apply(job_id, new, source, detail="", decide=None, extra=None, instance=None,
          robust=False):
    """Move job ``job_id`` to ``new``; returns ``(applied, old_status)``.

    ``decide(old) -> new or None`` may replace ``new`` with a target chosen
    from the state the job is actually in (None: do nothing).  ``extra``
    holds more fields to set with the change.  A change the table forbids,
    or to the state the job is already in, is not applied; ``old_status`` is
    None when there is no such job.

    ``instance``: the caller's job object; it is the one saved (and handed
    to receivers), and its fields are brought up to date either way.
    Without it, the job class is ``HPC_JOB_CLASS``.  ``robust``: a
    ``pre_save``/``post_save`` receiver that raises is logged and the change
    stored without it (hpcd must store what a cluster reported); otherwise
    its exception reaches the caller and nothing is stored.
    """
    from djangoapp.models import get_job_model

    model = type(instance) if instance is not None else get_job_model()
    if model_receivers(model):
        try:
            result = _apply_through_model(model, job_id, new, source, detail, decide, extra,
                                          instance)
        except Exception:
            if not robust:
                raise
            log.exception("a pre_save/post_save receiver of %s failed on job %s; the change "
                          "is stored without it", model.__name__, job_id)
            result = None
        if result is not None:
            return result
    return _compare_and_set(model, job_id, new, source, detail, decide, extra, instance)


def _compare_and_set(model, job_id, new, source, detail, decide, extra, instance):
    from djangoapp.models import HpcJob, HpcJobStatusChange

    # A state with a single predecessor needs no read first: the
    # compare-and-set itself says whether the job was in it.
    guess = None
    if decide is None and len(ALLOWED_FROM[JobStatus(new)]) == 1:
        (guess,) = ALLOWED_FROM[JobStatus(new)]
    for _ in range(20):
        if guess is not None:
            old, guess = guess, None
        else:
            row = HpcJob.objects.filter(pk=job_id).values_list("job_status", flat=True).first()
            if row is None:
                return False, None
            old = JobStatus(row)
            if instance is not None:
                instance.job_status = int(old)
        target = decide(old) if decide else new
        if target is None or target == old or not can_transition(old, target):
            return False, old
        target = JobStatus(target)
        now = timezone.now()
        fields = _fields(target, detail, extra, now)
        # No savepoint: a failure here fails the caller's transaction anyway.
        with transaction.atomic(savepoint=False):
            if HpcJob.objects.filter(pk=job_id, job_status=int(old)).update(**fields):
                HpcJobStatusChange.objects.create(
                    job_id=job_id, time=now, old_status=int(old), new_status=int(target),
                    source=source, detail=detail)
                if instance is not None:
                    for name, value in fields.items():
                        setattr(instance, name, value)
                _after_commit(model, [Change(job_id, old, target, detail, source)],
                              {job_id: instance} if instance is not None else None)
                return True, old
    raise RuntimeError(f"job {job_id}: state kept changing under 20 attempts to update it")


def _apply_through_model(model, job_id, new, source, detail, decide, extra, instance):
    """The change saved through ``model`` with its row locked; None when the
    row is not one of ``model`` (the compare-and-set path then applies it)."""
    from djangoapp.models import HpcJobStatusChange

    with transaction.atomic():
        current = model._base_manager.select_for_update().filter(pk=job_id).first()
        if current is None:
            return None
        old = JobStatus(current.job_status)
        job = instance if instance is not None else current
        target = decide(old) if decide else new
        if target is None or target == old or not can_transition(old, target):
            job.job_status = int(old)
            return False, old
        target = JobStatus(target)
        now = timezone.now()
        fields = _fields(target, detail, extra, now)
        for name, value in fields.items():
            setattr(job, name, value)
        job.save(update_fields=list(fields))
        HpcJobStatusChange.objects.create(
            job_id=job_id, time=now, old_status=int(old), new_status=int(target),
            source=source, detail=detail)
        _after_commit(model, [Change(job_id, old, target, detail, source)], {job_id: job})
    return True, old


def _fields(target, detail, extra, now):
    fields = {"job_status": int(target), "job_details": detail, **(extra or {})}
    if target in TIME_FIELDS:
        fields[TIME_FIELDS[target]] = now
    return fields


def apply_batch(updates, source, cluster_id=None, skipped=None):
    """Apply ``updates`` in order, in one transaction; returns ``(changes, refused)``.

    ``updates``: dicts with ``job``, ``status`` (a JobStatus), ``detail`` and
    ``scheduler_id`` (None, or the scheduler's id to store as
    ``remote_job_id``).  Several updates of one job apply in their order.
    An update the table forbids (a replay, a late report) is skipped.  With
    ``cluster_id``, an update about a job of another cluster, or a job that
    does not exist, is refused: its job id is in ``refused``.  ``changes``
    lists the applied ones as :class:`Change` tuples.  A receiver that
    raises is logged and its change stored all the same (see :func:`apply`).
    ``skipped``, a list, receives a Change for each update the table
    refused from another state (a replay of the state the job is in is not
    one: nothing is wrong with it).
    """
    from djangoapp.models import get_job_model

    model = get_job_model()
    with transaction.atomic():
        rows = _read_states([u["job"] for u in updates])
        refused = [u["job"] for u in updates
                   if u["job"] not in rows
                   or (cluster_id is not None and rows[u["job"]][0] != cluster_id)]
        if refused:
            refused_set = set(refused)
            updates = [u for u in updates if u["job"] not in refused_set]
        skipped = [] if skipped is None else skipped
        if model_receivers(model):
            changes = _apply_each(updates, source, skipped)
        else:
            changes = _apply_grouped(model, updates, source,
                                     {job: status for job, (_, status) in rows.items()},
                                     skipped)
    return changes, refused


def _chunk_size():
    # A statement holds up to five parameters per job (the IN list and two
    # CASE branches); stay inside the backend's limit (SQLite: 999).
    limit = connection.features.max_query_params
    return 500 if limit is None else max(1, min(500, limit // 5))


def chunks(items):
    size = _chunk_size()
    return (items[i:i + size] for i in range(0, len(items), size))


def _read_states(job_ids):
    """``{job_id: (cluster_id, job_status)}`` of the jobs that exist."""
    from djangoapp.models import HpcJob

    rows = {}
    for chunk in chunks(sorted(set(job_ids))):
        rows.update((pk, (cluster, status)) for pk, cluster, status in HpcJob.objects.filter(
            pk__in=chunk).values_list("pk", "cluster_id", "job_status"))
    return rows


def _apply_each(updates, source, skipped):
    changes = []
    for u in updates:
        extra = {"remote_job_id": u["scheduler_id"]} if u["scheduler_id"] else None
        applied, old = apply(u["job"], u["status"], source, u["detail"], extra=extra,
                             robust=True)
        change = Change(u["job"], old, u["status"], u["detail"], source)
        if applied:
            changes.append(change)
        elif old is not None and old != u["status"]:
            skipped.append(change)
    return changes


class _Plan:
    """What a batch does to one job: the moves from the state it was read in."""

    __slots__ = ("start", "steps", "remote")

    def __init__(self, start):
        self.start = start
        self.steps = []  # (old, new, detail, scheduler_id)
        self.remote = None


def _apply_grouped(model, updates, source, states, skipped):
    from djangoapp.models import HpcJob

    plans = {}
    for u in updates:
        job, new = u["job"], JobStatus(u["status"])
        plan = plans.get(job)
        old = plan.steps[-1][1] if plan and plan.steps else JobStatus(states[job])
        if new == old:
            continue
        if not can_transition(old, new):
            skipped.append(Change(job, old, new, u["detail"], source))
            continue
        if plan is None:
            plan = plans[job] = _Plan(old)
        plan.steps.append((old, new, u["detail"], u["scheduler_id"]))
        if u["scheduler_id"]:
            plan.remote = u["scheduler_id"]

    # Jobs making the same moves from the same state share one statement.
    groups = {}
    for job, plan in plans.items():
        groups.setdefault((plan.start, tuple(s[1] for s in plan.steps)), []).append(job)
    now = timezone.now()
    won, lost = [], []
    for (start, path), jobs in groups.items():
        time_fields = {TIME_FIELDS[s] for s in path if s in TIME_FIELDS}
        for chunk in chunks(jobs):
            fields = {"job_status": int(path[-1]), **dict.fromkeys(time_fields, now),
                      "job_details": value_per_job("job_details",
                                           {j: plans[j].steps[-1][2] for j in chunk})}
            remotes = {j: plans[j].remote for j in chunk if plans[j].remote}
            if remotes:
                fields["remote_job_id"] = value_per_job("remote_job_id", remotes,
                                                default="remote_job_id", covers=chunk)
            try:
                # A savepoint: when fewer rows matched, which ones did is
                # unknown, so the group is undone and its jobs applied singly.
                with transaction.atomic():
                    matched = HpcJob.objects.filter(pk__in=chunk, job_status=int(start)).update(
                        **fields)
                    if matched != len(chunk):
                        raise _LostRace
            except _LostRace:
                lost.extend(chunk)
            else:
                won.extend(chunk)

    changes = [Change(job, old, new, detail, source)
               for job in won for old, new, detail, _ in plans[job].steps]
    insert_history(changes, now)
    _after_commit(model, list(changes))
    for job in lost:
        # Another writer moved the job since it was read: each update is
        # re-decided from the state the job is in now.
        for _, new, detail, scheduler_id in plans[job].steps:
            extra = {"remote_job_id": scheduler_id} if scheduler_id else None
            applied, old = _compare_and_set(model, job, new, source, detail, None, extra, None)
            if applied:
                changes.append(Change(job, old, new, detail, source))
    return changes


def insert_history(changes, now):
    """One history row per change, with multi-row INSERTs.

    Written as SQL rather than with bulk_create: building and preparing a
    model instance per row cost a third of a batch's time.  The values are
    prepared by the model's own fields, once per batch where they repeat.
    """
    from djangoapp.models import HpcJobStatusChange

    if not changes:
        return
    meta = HpcJobStatusChange._meta
    names = ("job", "time", "old_status", "new_status", "source", "detail")
    fields = [meta.get_field(name) for name in names]
    quote = connection.ops.quote_name
    time = fields[1].get_db_prep_save(now, connection)
    limit = connection.features.max_query_params
    size = 1000 if limit is None else max(1, min(1000, limit // len(names)))
    head = (f"INSERT INTO {quote(meta.db_table)} "
            f"({', '.join(quote(f.column) for f in fields)}) VALUES ")
    row = "(" + ", ".join(["%s"] * len(names)) + ")"
    with connection.cursor() as cursor:
        for i in range(0, len(changes), size):
            chunk = changes[i:i + size]
            params = []
            for c in chunk:
                params += [c.job, time, int(c.old), int(c.new), c.source, c.detail]
            cursor.execute(head + ", ".join([row] * len(chunk)), params)


def value_per_job(name, values, default=None, covers=None):
    """The value of field ``name`` for each job id in ``values``, as one
    expression: a plain value when it is the same for every job, else
    ``CASE id WHEN ... THEN ... ELSE <default column> END``.

    Written as SQL rather than as Django's Case/When: resolving a When per
    job cost more than the rest of a batch (about 0.1 ms each).
    """
    from djangoapp.models import HpcJob

    try:
        distinct = set(values.values())
    except TypeError:  # dicts and lists (JSON parameters) do not hash
        distinct = None
    if distinct is not None and len(distinct) == 1 and (
            covers is None or len(values) == len(covers)):
        return distinct.pop()
    field = HpcJob._meta.get_field(name)
    quote = connection.ops.quote_name
    sql, params = ["CASE ", quote(HpcJob._meta.pk.column)], []
    for job, value in values.items():
        sql.append(" WHEN %s THEN %s")
        params += [job, field.get_db_prep_save(value, connection)]
    sql.append(f" ELSE {quote(HpcJob._meta.get_field(default).column)} END" if default
               else " END")
    return RawSQL("".join(sql), params, output_field=field)


def _after_commit(model, changes, instances=None):
    """Send job_status_changed for ``changes`` once the transaction commits
    (at once outside one); nothing to do, and no query, without receivers."""
    if changes and job_status_changed.has_listeners(model):
        transaction.on_commit(lambda: _send(model, changes, instances or {}))


def _send(model, changes, instances):
    missing = {c.job for c in changes} - set(instances)
    if missing:
        instances = {**instances, **model._base_manager.in_bulk(list(missing))}
    for change in changes:
        job = instances.get(change.job)
        if job is None:
            continue
        results = job_status_changed.send_robust(
            sender=model, job=job, old=change.old, new=change.new, detail=change.detail,
            source=change.source)
        for receiver, result in results:
            if isinstance(result, Exception):
                log.error("job_status_changed receiver %r failed on job %s", receiver,
                          change.job, exc_info=result)
