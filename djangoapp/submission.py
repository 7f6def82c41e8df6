"""Writing many jobs PENDING at once: the insides of HpcJobManager.submit_many()."""

import json
import random

from django.db import connections

from djangoapp import transitions
from djangoapp.conf import hpc_settings
from djangoapp.protocol import ParametersRefused
from djangoapp.transitions import JobStateError
from hpc_agent import wire
from hpc_agent.status import JobStatus

#: Room in a submit frame for everything but the parameters.
FRAME_OVERHEAD = 1024
#: The wire's encoding (hpc_agent.wire.encode), made once: building an
#: encoder per call cost more than encoding a small job's parameters.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def parameters_limit():
    """HPC_MAX_PARAMETERS_BYTES, never more than a control frame holds
    (read once per submission: a setting read costs as much as a check)."""
    return min(int(hpc_settings.HPC_MAX_PARAMETERS_BYTES),
               wire.MAX_CONTROL_MESSAGE - FRAME_OVERHEAD)


def encoded_size(parameters):
    """Bytes ``parameters`` take in a frame, as the wire encodes them;
    TypeError or ValueError when they are not JSON (NaN, a set)."""
    return len(_ENCODER.encode(parameters).encode("utf-8"))


def check_parameters(job_id, parameters, limit):
    """Raise ParametersRefused unless ``parameters`` can travel to the agent:
    JSON as the wire encodes it, at most ``limit`` bytes
    (:func:`parameters_limit`).  Otherwise the job would wait in SUBMITTING
    for good, its frame refused on every scan."""
    what = f"job {job_id}" if job_id else "a new job"
    try:
        size = encoded_size(parameters)
    except (TypeError, ValueError) as e:
        raise ParametersRefused(f"the parameters of {what} are not JSON: {e}") from None
    if size > limit:
        raise ParametersRefused(
            f"the parameters of {what} are {size} bytes of JSON, more than the {limit} "
            "allowed (HPC_MAX_PARAMETERS_BYTES): put large inputs in files "
            "(job.upload_file()) and pass their names; nothing was submitted")


def cluster_chooser(model):
    """``choose(job, parameters)``: the class's own choose_cluster, or, when
    it keeps the default, one read of the online clusters for all jobs."""
    from djangoapp.models import HpcCluster, HpcJob

    if model.choose_cluster is not HpcJob.choose_cluster:
        return lambda job, parameters: job.choose_cluster(parameters)
    online = list(HpcCluster.objects.online())
    return lambda job, parameters: random.choice(online) if online else None


def _pending_fields(job, parameters, now):
    job.job_status = int(JobStatus.PENDING)
    job.job_parameters = parameters
    job.job_pending_time = now
    job.job_details = ""


def insert_pending(model, pairs, now, db):
    """Insert new jobs already PENDING, in bulk, also for a subclass.

    Django's bulk_create refuses a multi-table subclass, so the rows are
    inserted table by table from HpcJob down: HpcJob's with bulk_create,
    which returns the ids, then each subclass table's own columns with the
    manager's ``_insert``, the call Model.save() itself makes per row.
    """
    if not pairs:
        return
    for job, parameters in pairs:
        _pending_fields(job, parameters, now)
    jobs = [job for job, _ in pairs]
    concrete = model._meta.concrete_model
    chain = [*reversed(concrete._meta.get_parent_list()), concrete]
    top = chain[0]
    if len(chain) == 1:
        top._base_manager.using(db).bulk_create(jobs)
        return
    rows = top._base_manager.using(db).bulk_create([
        top(**{f.attname: getattr(job, f.attname) for f in top._meta.concrete_fields
               if not f.primary_key}) for job in jobs])
    for job, row in zip(jobs, rows):
        for level in chain:
            setattr(job, level._meta.pk.attname, row.pk)
    for level in chain[1:]:
        fields = level._meta.local_concrete_fields
        size = connections[db].ops.bulk_batch_size(fields, jobs) or len(jobs)
        for i in range(0, len(jobs), size):
            level._base_manager._insert(jobs[i:i + size], fields=fields, using=db)
    for job in jobs:
        job._state.adding = False
        job._state.db = db


def update_pending(pairs, now):
    """Saved DRAFT jobs made PENDING: read their states with the rows locked,
    then one compare-and-set UPDATE per 500 jobs."""
    from djangoapp.models import HpcJob, _status_name

    if not pairs:
        return
    ids = [job.pk for job, _ in pairs]
    states = {}
    for chunk in transitions.chunks(ids):
        states.update(HpcJob.objects.select_for_update().filter(pk__in=chunk)
                      .values_list("pk", "job_status"))
    wrong = [pk for pk in ids if states.get(pk) != JobStatus.DRAFT]
    if wrong:
        raise JobStateError(
            "only DRAFT jobs can be submitted; " + ", ".join(
                f"job {pk} is {_status_name(states.get(pk))}" for pk in wrong[:10])
            + (f" and {len(wrong) - 10} more" if len(wrong) > 10 else "")
            + "; nothing was submitted")
    for chunk in transitions.chunks(pairs):
        parameters = {job.pk: p for job, p in chunk}
        matched = HpcJob.objects.filter(pk__in=list(parameters),
                                        job_status=JobStatus.DRAFT).update(
            job_status=int(JobStatus.PENDING), job_pending_time=now, job_details="",
            job_parameters=transitions.value_per_job("job_parameters", parameters),
            cluster_id=transitions.value_per_job("cluster", {job.pk: job.cluster_id
                                                     for job, _ in chunk}))
        if matched != len(chunk):
            raise JobStateError("some of the jobs were changed by another writer while they "
                                "were submitted; nothing was submitted, try again")
    for job, parameters in pairs:
        _pending_fields(job, parameters, now)
