"""manage.py hpc_import_django_hpc_job_controller, on tables laid out as the
seed's migrations 0001-0010 leave them, with a portal's subclass table beside."""

import io
import os
import pickle
from collections import OrderedDict
from datetime import datetime, timezone

import pytest
from django.apps.registry import Apps
from django.core.management import CommandError, call_command
from django.db import connection, models

from djangoapp.crypto import is_encrypted
from djangoapp.management.commands.hpc_import_django_hpc_job_controller import (
    NotPlainData,
    to_json,
    unpickle_plain,
)
from djangoapp.models import HpcCluster, HpcJob, JobStatus as S

LABEL = "django_hpc_job_controller"
T0 = datetime(2019, 8, 7, 14, 32, 5, 123456, tzinfo=timezone.utc)


def _seed_schema():
    """The seed's tables as its migration 0010 left them (written from its
    migrations, not imported from it), and a portal's job subclass table."""
    registry = Apps()

    def meta(label):
        return type("Meta", (), {"app_label": label, "apps": registry})

    class Cluster(models.Model):
        host_name = models.CharField(max_length=250)
        key = models.TextField(blank=True)
        username = models.CharField(max_length=32)
        password = models.CharField(max_length=1024, blank=True)
        client_path = models.CharField(max_length=2048, default="")
        Meta = type("Meta", (), {"app_label": LABEL, "apps": registry,
                                 "db_table": f"{LABEL}_hpccluster"})

    class Job(models.Model):
        cluster = models.ForeignKey(Cluster, null=True, blank=True, default=None,
                                    on_delete=models.CASCADE)
        job_status = models.IntegerField(null=True, blank=True, default=0)
        job_submitted_time = models.DateTimeField(null=True, blank=True, default=None)
        job_queued_time = models.DateTimeField(null=True, blank=True, default=None)
        job_finished_time = models.DateTimeField(null=True, blank=True, default=None)
        job_details = models.TextField(null=True, blank=True, default=None)
        job_parameters = models.BinaryField(null=True, blank=True, default=None)
        job_pending_time = models.DateTimeField(null=True, blank=True, default=None)
        job_submitting_time = models.DateTimeField(null=True, blank=True, default=None)
        job_running_time = models.DateTimeField(null=True, blank=True, default=None)
        Meta = type("Meta", (), {"app_label": LABEL, "apps": registry,
                                 "db_table": f"{LABEL}_hpcjob"})

    class Token(models.Model):
        token = models.UUIDField()
        used = models.BooleanField(default=False)
        cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE)
        is_file = models.BooleanField(default=False)
        timestamp = models.DateTimeField()
        Meta = type("Meta", (), {"app_label": LABEL, "apps": registry,
                                 "db_table": f"{LABEL}_websockettoken"})

    class PortalJob(models.Model):
        # What multi-table inheritance from the seed's HpcJob made.
        hpcjob_ptr = models.OneToOneField(Job, primary_key=True, on_delete=models.CASCADE)
        name = models.CharField(max_length=100)
        Meta = meta("portal")

    return [Cluster, Job, Token, PortalJob]


@pytest.fixture
def seed(transactional_db):
    schema = _seed_schema()
    with connection.schema_editor() as editor:
        for model in schema:
            editor.create_model(model)
    yield dict(zip(["Cluster", "Job", "Token", "PortalJob"], schema))
    with connection.schema_editor() as editor:
        for model in reversed(schema):
            editor.delete_model(model)


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    call_command("hpc_import_django_hpc_job_controller", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_clusters_and_jobs_keep_their_ids_states_times_and_plain_parameters(seed, tmp_path):
    Cluster, Job, Token, PortalJob = seed.values()
    ozstar = Cluster.objects.create(id=5, host_name="ozstar.example.org", username="portal",
                                    key="-----BEGIN KEY-----", password="pass",
                                    client_path="/home/portal/client")
    local = Cluster.objects.create(id=9, host_name="localhost", username="", key="",
                                   password="", client_path="/srv/client")
    Token.objects.create(token="12345678123456781234567812345678", cluster=ozstar,
                         timestamp=T0)
    pwned = tmp_path / "pwned"
    rows = {
        3: dict(cluster=ozstar, job_status=500, job_details="done",
                job_parameters=pickle.dumps({"script": "echo", "n": 3, "f": 1.5, "none": None,
                                             "nested": [1, (2, "3")], "ok": True}, protocol=3),
                job_pending_time=T0, job_submitted_time=T0, job_finished_time=T0),
        4: dict(cluster=ozstar, job_status=400,
                job_parameters=pickle.dumps('{"a json": "string"}', protocol=0)),
        7: dict(cluster=local, job_status=70,
                job_parameters=pickle.dumps(OrderedDict(a=1), protocol=2)),
        8: dict(job_status=0, job_parameters=pickle.dumps(Evil(pwned), protocol=5)),
        10: dict(job_status=None, job_details=None, job_parameters=None),
        11: dict(cluster=ozstar, job_status=50, job_running_time=T0,
                 job_parameters=pickle.dumps({1: "an int key"})),
        12: dict(job_status=777, job_parameters=b"\x80\x03garbage"),
        13: dict(job_status=10, job_parameters=pickle.dumps([b"raw", float("nan")])),
    }
    for pk, values in rows.items():
        Job.objects.create(id=pk, **values)
        PortalJob.objects.create(hpcjob_ptr_id=pk, name=f"portal job {pk}")

    out, err = run()

    assert "imported 2 clusters (disabled) and 8 jobs" in out
    assert "parameters: 2 converted to JSON, 5 not plain data" in out
    assert not pwned.exists()
    clusters = HpcCluster.objects.in_bulk()
    assert sorted(clusters) == [5, 9]
    assert clusters[5].credentials() == {"key": "-----BEGIN KEY-----", "password": "pass"}
    assert is_encrypted(clusters[5].key) and not clusters[5].enabled
    assert (clusters[5].host_name, clusters[5].username, clusters[5].client_path) == (
        "ozstar.example.org", "portal", "/home/portal/client")
    jobs = HpcJob.objects.in_bulk()
    assert sorted(jobs) == [3, 4, 7, 8, 10, 11, 12, 13]
    assert (jobs[3].job_status, jobs[3].cluster_id, jobs[3].job_details) == (
        S.COMPLETED, 5, "done")
    assert jobs[3].job_parameters == {"script": "echo", "n": 3, "f": 1.5, "none": None,
                                      "nested": [1, [2, "3"]], "ok": True}
    assert (jobs[3].job_pending_time, jobs[3].job_finished_time) == (T0, T0)
    assert jobs[4].job_parameters == '{"a json": "string"}'
    assert (jobs[10].job_status, jobs[10].job_details, jobs[10].job_parameters) == (
        S.DRAFT, "", None)
    assert jobs[11].job_status == S.RUNNING and jobs[11].job_running_time == T0
    assert jobs[12].job_status == S.ERROR and "unknown state 777" in jobs[12].job_details
    for pk in (7, 8, 11, 12, 13):
        assert jobs[pk].job_parameters is None
    assert "job 7: parameters not imported: the pickle names collections.OrderedDict" in err
    assert "job 8: parameters not imported: the pickle names posix.system" in err
    assert "job 11: parameters not imported: parameters has the key 1" in err
    assert "job 12: parameters not imported: the pickle cannot be read" in err
    assert "job 13: parameters not imported: parameters[0] is a bytes" in err
    assert "1 jobs were on a cluster in the seed (11)" in err
    # The portal's subclass rows point at the imported jobs by the same ids.
    with connection.cursor() as cursor:
        cursor.execute("SELECT p.name, j.job_status FROM portal_portaljob p JOIN "
                       "djangoapp_hpcjob j ON j.id = p.hpcjob_ptr_id ORDER BY j.id")
        assert list(cursor.fetchall())[:2] == [("portal job 3", 500), ("portal job 4", 400)]
    # New rows do not collide with imported ids (PostgreSQL's sequences moved on).
    assert HpcJob.objects.create().pk > 13
    assert HpcCluster.objects.create(host_name="new", client_path="/n").pk > 9


def test_active_jobs_can_be_ended_and_clusters_enabled(seed):
    Cluster, Job = seed["Cluster"], seed["Job"]
    cluster = Cluster.objects.create(host_name="localhost", username="", client_path="/c")
    Job.objects.create(id=1, cluster=cluster, job_status=50)
    out, err = run("--end-active", "--enable-clusters")
    job = HpcJob.objects.get(pk=1)
    assert job.job_status == S.ERROR and "while it was RUNNING" in job.job_details
    assert HpcCluster.objects.get().enabled
    assert "they ended in ERROR" in err


def test_a_dry_run_writes_nothing_and_a_second_import_is_refused(seed):
    seed["Job"].objects.create(id=1, job_status=0)
    out, _ = run("--dry-run")
    assert "would import 0 clusters (disabled) and 1 jobs" in out
    assert not HpcJob.objects.exists()
    run()
    with pytest.raises(CommandError, match="already has clusters or jobs"):
        run()


def test_missing_seed_tables_are_named(transactional_db):
    with pytest.raises(CommandError, match="no table django_hpc_job_controller_hpccluster"):
        run()


@pytest.mark.parametrize("value", [{"a": [1, 2.5, None, True]}, "text", 7, None, [[]]])
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_unpickles_under_every_protocol(value, protocol):
    assert to_json(unpickle_plain(pickle.dumps(value, protocol=protocol))) == value


@pytest.mark.parametrize("value", [{1, 2}, frozenset(), b"x", bytearray(b"x"),
                                   {"k": float("inf")}, {(1, 2): "tuple key"}])
def test_data_json_cannot_hold_is_reported(value):
    with pytest.raises(NotPlainData):
        to_json(unpickle_plain(pickle.dumps(value)))
