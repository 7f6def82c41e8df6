"""The README's path for a portal coming from django_hpc_job_controller, run on
a throwaway project: a seed-shaped app (laid out like the seed's migration
0010), a portal whose Job subclasses it, its rows imported, the portal's
class moved onto djangoapp.HpcJob, then the seed removed."""

import os
import subprocess
import sys
import textwrap

import pytest

from harness import REPO

SETTINGS = """
import os
SECRET_KEY = "x"
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth",
                  *os.environ["APPS"].split(",")]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
DATABASES = {"default": %r}
HPC_CREDENTIAL_KEYS = ["IE2SCdRIt7btCajHo6VUXWuVdSKiESEYkHqORPjDZSQ="]
HPC_JOB_CLASS = "portal.Job"
"""

SEED_MODELS = """
from django.db import models

class HpcCluster(models.Model):
    host_name = models.CharField(max_length=250)
    key = models.TextField(blank=True)
    username = models.CharField(max_length=32)
    password = models.CharField(max_length=1024, blank=True)
    client_path = models.CharField(max_length=2048, default="")

class HpcJob(models.Model):
    cluster = models.ForeignKey(HpcCluster, models.CASCADE, null=True, blank=True, default=None)
    job_status = models.IntegerField(null=True, blank=True, default=0)
    job_pending_time = models.DateTimeField(null=True, blank=True, default=None)
    job_submitting_time = models.DateTimeField(null=True, blank=True, default=None)
    job_submitted_time = models.DateTimeField(null=True, blank=True, default=None)
    job_queued_time = models.DateTimeField(null=True, blank=True, default=None)
    job_running_time = models.DateTimeField(null=True, blank=True, default=None)
    job_finished_time = models.DateTimeField(null=True, blank=True, default=None)
    job_details = models.TextField(null=True, blank=True, default=None)
    job_parameters = models.BinaryField(null=True, blank=True, default=None)
"""

PORTAL_MODELS = """
from django.db import models
from {parent} import HpcJob

class Job(HpcJob):
    name = models.CharField(max_length=100)
"""

MOVE = """
from django.db import migrations
from djangoapp.migration_operations import MoveJobClassToDjangoapp

class Migration(migrations.Migration):
    dependencies = [("portal", "0001_initial"), ("djangoapp", "0001_initial")]
    operations = [MoveJobClassToDjangoapp("Job")]
"""


@pytest.fixture
def database(tmp_path):
    if os.environ.get("HPC_TEST_DB") != "postgres":
        yield {"ENGINE": "django.db.backends.sqlite3", "NAME": str(tmp_path / "portal.db")}
        return
    import psycopg

    name = os.environ.get("HPC_TEST_DB_NAME", "test_hpc") + "_move"
    server = {"host": os.environ.get("HPC_TEST_PG_HOST", "127.0.0.1"),
              "port": os.environ.get("HPC_TEST_PG_PORT", "5432"),
              "user": os.environ.get("HPC_TEST_PG_USER", "postgres")}
    with psycopg.connect(dbname="postgres", autocommit=True, **server) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    yield {"ENGINE": "django.db.backends.postgresql", "NAME": name, "HOST": server["host"],
           "PORT": server["port"], "USER": server["user"]}
    with psycopg.connect(dbname="postgres", autocommit=True, **server) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_a_portal_moves_its_jobs_from_the_seed_keeping_ids(tmp_path, database):
    project = tmp_path / "project"
    write(project / "settings.py", SETTINGS % database)
    for app in ("django_hpc_job_controller", "portal"):
        write(project / app / "__init__.py", "")
        write(project / app / "migrations" / "__init__.py", "")
    write(project / "django_hpc_job_controller" / "models.py", SEED_MODELS)
    write(project / "portal" / "models.py",
          PORTAL_MODELS.format(parent="django_hpc_job_controller.models"))

    def manage(*args, apps):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(project), REPO]),
               "DJANGO_SETTINGS_MODULE": "settings", "APPS": apps}
        done = subprocess.run([sys.executable, "-m", "django", *args], cwd=project, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"manage.py {' '.join(args)}:\n{done.stderr[-3000:]}"
        return done.stdout

    # The portal as it ran on the seed, with jobs.
    seed = "django_hpc_job_controller,portal"
    manage("makemigrations", "django_hpc_job_controller", "portal", apps=seed)
    manage("migrate", apps=seed)
    manage("shell", "-c", textwrap.dedent("""
        import pickle
        from django_hpc_job_controller.models import HpcCluster
        from portal.models import Job
        cluster = HpcCluster.objects.create(host_name="localhost", client_path="/c")
        for i in range(3):
            Job.objects.create(name=f"job {i}", cluster=cluster, job_status=500,
                               job_parameters=pickle.dumps({"i": i}))
        Job.objects.filter(name="job 0").delete()
        """), apps=seed)

    # Steps 1-5 of the README.
    both = "django_hpc_job_controller,djangoapp,portal"
    write(project / "portal" / "models.py", PORTAL_MODELS.format(parent="djangoapp.models"))
    write(project / "portal" / "migrations" / "0002_move_job_to_djangoapp.py", MOVE)
    manage("migrate", "djangoapp", apps=both)
    assert "imported 1 clusters (disabled) and 2 jobs" in manage(
        "hpc_import_django_hpc_job_controller", apps=both)
    manage("migrate", apps=both)
    assert "No changes detected" in manage("makemigrations", "--check", "--dry-run", "portal",
                                           apps=both)

    first = project / "portal" / "migrations" / "0001_initial.py"
    first.write_text(first.read_text()
                     .replace("('django_hpc_job_controller', '0001_initial')",
                              "('djangoapp', '0001_initial')")
                     .replace("django_hpc_job_controller.hpcjob", "djangoapp.hpcjob"))
    alone = "djangoapp,portal"
    manage("migrate", apps=alone)
    assert "No changes detected" in manage("makemigrations", "--check", "--dry-run", "portal",
                                           apps=alone)
    out = manage("shell", "-v", "0", "-c", textwrap.dedent("""
        from portal.models import Job
        print(sorted((j.pk, j.name, j.job_status, j.job_parameters["i"], j.cluster_id)
                     for j in Job.objects.all()))
        print(Job.objects.create(name="new").pk)
        """), apps=alone)
    assert out.split("\n")[:2] == ["[(2, 'job 1', 500, 1, 1), (3, 'job 2', 500, 2, 1)]", "4"]
