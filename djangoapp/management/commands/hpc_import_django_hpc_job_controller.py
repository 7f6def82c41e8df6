"""Import the clusters and jobs of a django_hpc_job_controller database.

The seed project kept its rows in ``django_hpc_job_controller_hpccluster``
and ``..._hpcjob`` (its migrations 0001-0010).  Clusters and jobs are copied
with their ids, so a portal's own job table, whose parent pointer holds
those ids, lines up with the imported rows (see the README, "Coming from
django_hpc_job_controller").  Job parameters were pickled there; they are
unpickled by an unpickler that builds plain data only (it refuses every
class and function a pickle names, before looking it up) and stored as JSON.
Parameters that are not plain JSON data are left empty and reported by job id.
"""

import io
import math
import pickle
from datetime import timezone as dt_timezone

from django.apps.registry import Apps
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.core.management.color import no_style
from django.db import DEFAULT_DB_ALIAS, connections, models, transaction
from django.utils import timezone

from djangoapp import crypto
from djangoapp.models import HpcCluster, HpcJob, JobStatus

ACTIVE_IN_SEED = (JobStatus.SUBMITTING, JobStatus.SUBMITTED, JobStatus.QUEUED,
                  JobStatus.RUNNING, JobStatus.CANCELLING, JobStatus.DELETING)


class NotPlainData(ValueError):
    """A stored parameter value that this project cannot carry as JSON."""


class _PlainUnpickler(pickle.Unpickler):
    """Builds what pickle's own opcodes build (None, bool, int, float, str,
    bytes, tuple, list, dict, set) and nothing else: every class or function
    a pickle names goes through find_class, which refuses them all, so no
    code of the pickle's choosing ever runs."""

    def find_class(self, module, name):
        raise NotPlainData(f"the pickle names {module}.{name}, which is not plain data")

    def persistent_load(self, pid):
        raise NotPlainData("the pickle refers to a persistent object")


def unpickle_plain(data):
    """The plain value pickled in ``data``, or NotPlainData saying why not."""
    try:
        return _PlainUnpickler(io.BytesIO(bytes(data))).load()
    except NotPlainData:
        raise
    except Exception as e:  # a corrupt or truncated pickle
        raise NotPlainData(f"the pickle cannot be read: {e}") from None


def to_json(value, where="parameters"):
    """``value`` as JSON data (tuples become lists), or NotPlainData."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotPlainData(f"{where} is {value}, which JSON cannot hold")
        return value
    if isinstance(value, (list, tuple)):
        return [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise NotPlainData(f"{where} has the key {key!r}, and JSON keys are text")
        return {k: to_json(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise NotPlainData(f"{where} is a {type(value).__name__}, which JSON cannot hold")


def seed_models(app_label):
    """Read-only models of the seed's two tables as its migration 0010 left
    them, in a registry of their own (nothing is installed or migrated)."""
    registry = Apps()

    def model(name, fields):
        meta = type("Meta", (), {"app_label": app_label, "apps": registry, "managed": False,
                                 "db_table": f"{app_label}_{name.lower()}"})
        return type(name, (models.Model,), {"__module__": __name__, "Meta": meta, **fields})

    cluster = model("HpcCluster", {
        "host_name": models.CharField(max_length=250),
        "key": models.TextField(),
        "username": models.CharField(max_length=32),
        "password": models.CharField(max_length=1024),
        "client_path": models.CharField(max_length=2048),
    })
    job = model("HpcJob", {
        "cluster_id": models.IntegerField(null=True),
        "job_status": models.IntegerField(null=True),
        "job_details": models.TextField(null=True),
        "job_parameters": models.BinaryField(null=True),
        **{f: models.DateTimeField(null=True) for f in (
            "job_pending_time", "job_submitting_time", "job_submitted_time",
            "job_queued_time", "job_running_time", "job_finished_time")},
    })
    return cluster, job


class Command(BaseCommand):
    help = ("Import the clusters and jobs of a django_hpc_job_controller database, keeping "
            "their ids, states and times; pickled parameters become JSON where they are "
            "plain data. Run it once, into empty djangoapp tables.")

    def add_arguments(self, parser):
        parser.add_argument("--database", default=DEFAULT_DB_ALIAS,
                            help="the DATABASES alias holding the seed's tables "
                                 "(default: the default database)")
        parser.add_argument("--app-label", default="django_hpc_job_controller",
                            help="the seed's app label, which prefixes its table names")
        parser.add_argument("--enable-clusters", action="store_true",
                            help="import the clusters enabled, so hpcd launches agents at "
                                 "once (default: disabled until their host keys are pinned "
                                 "and the agent installed)")
        parser.add_argument("--end-active", action="store_true",
                            help="jobs the seed still had on a cluster end in ERROR (their "
                                 "state lives in the seed's client, which the agent does not "
                                 "read); by default they keep their state")
        parser.add_argument("--dry-run", action="store_true",
                            help="report what would be imported, write nothing")

    def handle(self, database, app_label, enable_clusters, end_active, dry_run, **options):
        seed_cluster, seed_job = seed_models(app_label)
        source = connections[database]
        tables = set(source.introspection.table_names())
        missing = [m._meta.db_table for m in (seed_cluster, seed_job)
                   if m._meta.db_table not in tables]
        if missing:
            raise CommandError(f"no table {', '.join(missing)} in database {database!r}: give "
                               "the seed's database with --database, or its app label with "
                               "--app-label")
        if HpcCluster.objects.exists() or HpcJob.objects.exists():
            raise CommandError("djangoapp already has clusters or jobs: import into empty "
                               "tables, since the seed's ids are kept")

        clusters = [self._cluster(row, enable_clusters)
                    for row in seed_cluster.objects.using(database).order_by("id")]
        jobs, refused, active, unknown = [], [], [], []
        for row in seed_job.objects.using(database).order_by("id").iterator(chunk_size=2000):
            job, problem = self._job(row)
            if problem:
                refused.append((row.id, problem))
            if row.job_status is not None and row.job_status not in JobStatus._value2member_map_:
                unknown.append(row.id)
            if job.job_status in ACTIVE_IN_SEED:
                active.append(job.pk)
                if end_active:
                    job.job_details = ("imported from django_hpc_job_controller while it was "
                                       f"{JobStatus(job.job_status).name}; its state on the "
                                       "cluster is unknown here")
                    job.job_status = int(JobStatus.ERROR)
            jobs.append(job)

        if not dry_run:
            try:
                with transaction.atomic():
                    HpcCluster.objects.bulk_create(clusters, batch_size=500)
                    HpcJob.objects.bulk_create(jobs, batch_size=500)
                    self._reset_sequences()
            except crypto.CredentialKeyError as e:
                raise CommandError(f"the clusters' credentials must be encrypted: {e}") from None
        self._report(clusters, jobs, refused, active, unknown, end_active, enable_clusters,
                     dry_run)

    def _cluster(self, row, enabled):
        # key and password were stored in plain text; saving encrypts them.
        return HpcCluster(pk=row.id, host_name=row.host_name, username=row.username,
                          key=row.key or "", password=row.password or "",
                          client_path=row.client_path or "", enabled=enabled)

    def _job(self, row):
        problem, parameters = None, None
        if row.job_parameters:
            try:
                parameters = to_json(unpickle_plain(row.job_parameters))
            except NotPlainData as e:
                problem = str(e)
        status = row.job_status if row.job_status is not None else int(JobStatus.DRAFT)
        details = row.job_details or ""
        if status not in JobStatus._value2member_map_:
            details = f"imported with the unknown state {status}. {details}".strip()
            status = int(JobStatus.ERROR)
        times = {f: _aware(getattr(row, f)) for f in (
            "job_pending_time", "job_submitting_time", "job_submitted_time",
            "job_queued_time", "job_running_time", "job_finished_time")}
        return HpcJob(pk=row.id, cluster_id=row.cluster_id, job_status=status,
                      job_details=details, job_parameters=parameters, **times), problem

    def _reset_sequences(self):
        # Explicit ids leave PostgreSQL's sequences behind; the next row
        # created would collide with an imported one.
        connection = connections[DEFAULT_DB_ALIAS]
        statements = connection.ops.sequence_reset_sql(no_style(), [HpcCluster, HpcJob])
        if statements:
            with connection.cursor() as cursor:
                for sql in statements:
                    cursor.execute(sql)

    def _report(self, clusters, jobs, refused, active, unknown, end_active, enabled, dry_run):
        verb = "would import" if dry_run else "imported"
        self.stdout.write(f"{verb} {len(clusters)} clusters "
                          f"({'enabled' if enabled else 'disabled'}) and {len(jobs)} jobs, "
                          "with their ids")
        converted = sum(1 for j in jobs if j.job_parameters is not None)
        self.stdout.write(f"parameters: {converted} converted to JSON, {len(refused)} not "
                          "plain data (left empty)")
        for job_id, problem in refused:
            self.stderr.write(f"job {job_id}: parameters not imported: {problem}")
        for job_id in unknown:
            self.stderr.write(f"job {job_id}: an unknown state number; imported as ERROR")
        if active:
            ids = ", ".join(str(i) for i in active[:20]) + (" ..." if len(active) > 20 else "")
            what = "ended in ERROR" if end_active else "kept their state"
            self.stderr.write(
                f"{len(active)} jobs were on a cluster in the seed ({ids}); they {what}. "
                "Their scheduler state lives in the seed's client, which this project's "
                "agent does not read: let them finish under the seed before importing, or "
                "use --end-active.")
        if clusters and not enabled and not dry_run:
            self.stdout.write("clusters are disabled: pin their host keys (hpc_host_keys), "
                              "install the agent (hpc_install_agent), then enable them")


def _aware(value):
    if value is not None and settings.USE_TZ and timezone.is_naive(value):
        return timezone.make_aware(value, dt_timezone.utc)
    return value
