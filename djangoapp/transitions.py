"""Changing a job's state: the one function every writer calls.

A change is a compare-and-set ``UPDATE ... WHERE job_status = <what we
read>`` on HpcJob's own table: one statement, correct on PostgreSQL under
real races and free of SQLite's "database is locked" under concurrent
``select_for_update``.  If another writer got there first the function reads
again and re-decides, so it never applies a change the transition table
forbids from the state the job is really in.  Each applied change is recorded
in the job's history in the same transaction.
"""

from django.db import transaction
from django.utils import timezone

from hpc_agent.status import TIME_FIELDS, JobStatus, can_transition


class JobStateError(Exception):
    """The job is in a state that does not allow what was asked."""


def apply(job_id, new, source, detail="", decide=None, extra=None):
    """Move job ``job_id`` to ``new``; returns ``(applied, old_status)``.

    ``decide(old) -> new or None`` may replace ``new`` with a target chosen
    from the state the job is actually in (None: do nothing).  ``extra``
    holds more fields to set with the change.  A change the table forbids,
    or to the state the job is already in, is not applied.
    """
    from djangoapp.models import HpcJob, HpcJobStatusChange

    for _ in range(20):
        row = HpcJob.objects.filter(pk=job_id).values_list("job_status", flat=True).first()
        if row is None:
            return False, None
        old = JobStatus(row)
        target = decide(old) if decide else new
        if target is None or target == old or not can_transition(old, target):
            return False, old
        target = JobStatus(target)
        now = timezone.now()
        fields = {"job_status": int(target), "job_details": detail, **(extra or {})}
        if target in TIME_FIELDS:
            fields[TIME_FIELDS[target]] = now
        with transaction.atomic():
            if HpcJob.objects.filter(pk=job_id, job_status=int(old)).update(**fields):
                HpcJobStatusChange.objects.create(
                    job_id=job_id, time=now, old_status=int(old), new_status=int(target),
                    source=source, detail=detail)
                return True, old
    raise RuntimeError(f"job {job_id}: state kept changing under 20 attempts to update it")
