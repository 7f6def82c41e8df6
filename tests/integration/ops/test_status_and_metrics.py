"""Operating hpcd: `manage.py hpc_status`, /metrics and /healthz, and its log,
against the real daemon and a real localhost agent."""

import io
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from django.core.management import CommandError, call_command

import hpc_agent
from djangoapp.models import HpcCluster, HpcJob, JobStatus
from harness import (FINAL, REPO, TESTS, Hpcd, RawWebsocket, database_environment, wait_for,
                     wait_status, websocket_port)

prometheus = pytest.importorskip("prometheus_client.parser",
                                 reason="prometheus_client is not installed (the test extra)")


def status_json(**options):
    out = io.StringIO()
    call_command("hpc_status", "--json", stdout=out, **options)
    return json.loads(out.getvalue())


def manage(*args, env=None):
    """``django-admin ARGS`` in a process of its own, on the test's database."""
    full_env = dict(os.environ, DJANGO_SETTINGS_MODULE="testsettings",
                    PYTHONPATH=os.pathsep.join([TESTS, REPO]), **database_environment(),
                    **(env or {}))
    admin = os.path.join(os.path.dirname(sys.executable), "django-admin")
    return subprocess.run([admin, *args], env=full_env, capture_output=True, text=True,
                          timeout=60)


def test_hpc_status_shows_the_live_daemon_its_clusters_and_jobs(local_cluster, hpcd):
    done = HpcJob.objects.create()
    done.submit({"script": "true"})
    wait_status(done, FINAL)
    sleeper = HpcJob.objects.create()
    sleeper.submit({"script": "sleep 300"})
    wait_status(sleeper, JobStatus.RUNNING)
    try:
        data = status_json()
        assert data["hpcd"]["answering"] is True
        assert data["hpcd"]["version"] == hpc_agent.__version__
        assert data["hpcd"]["pid"] == hpcd.process.pid
        assert 0 < data["hpcd"]["uptime_seconds"] < 600
        (cluster,) = data["clusters"]
        assert cluster["id"] == local_cluster.pk and cluster["online"] is True
        assert cluster["agent_version"] == hpc_agent.__version__
        assert cluster["since_seconds"] is not None and cluster["last_error"] is None
        assert cluster["jobs"] == {"COMPLETED": 1, "RUNNING": 1}
        assert cluster["oldest_open_job"]["id"] == sleeper.pk
        assert cluster["oldest_open_job"]["state"] == "RUNNING"
        assert data["transfers"] == []
        assert data["backlog"]["PENDING"] == 0 and data["backlog"]["in_flight"] == 0

        # The plain table, and the exit status a health probe reads.
        result = manage("hpc_status", env={"HPC_IPC_UNIX_SOCKET": hpcd.socket_path})
        assert result.returncode == 0, result.stderr
        assert f"hpcd: answering; version {hpc_agent.__version__}" in result.stdout
        row = next(line for line in result.stdout.splitlines()
                   if line.startswith(f"{local_cluster.pk} "))
        assert "localhost" in row and "online" in row and "RUNNING 1, COMPLETED 1" in row
        assert f"job {sleeper.pk} RUNNING for" in row
    finally:
        sleeper.cancel()
        wait_status(sleeper, FINAL)


def test_hpc_status_with_hpcd_down_says_so_and_exits_1(transactional_db, short_tmp):
    cluster = HpcCluster.objects.create(host_name="localhost", client_path="/nowhere",
                                        status_detail="the agent was launched but did not "
                                                      "connect within 60 s")
    job = HpcJob.objects.create()
    job.submit({"script": "true"})  # PENDING: nothing dispatches it
    missing = os.path.join(short_tmp, "no-hpcd.sock")
    result = manage("hpc_status", env={"HPC_IPC_UNIX_SOCKET": missing})
    assert result.returncode == 1
    assert "hpcd: NOT ANSWERING: cannot reach hpcd" in result.stdout
    assert "hpcd is not answering" in result.stderr
    assert "unknown" in result.stdout  # cluster state: hpcd would know, it is down
    result = manage("hpc_status", "--json", env={"HPC_IPC_UNIX_SOCKET": missing})
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["hpcd"]["answering"] is False and "cannot reach hpcd" in data["hpcd"]["error"]
    assert data["clusters"][0]["id"] == cluster.pk
    assert data["clusters"][0]["last_error"].startswith("the agent was launched")
    assert data["backlog"]["PENDING"] == 1


def test_hpc_status_raises_for_call_command_callers(db, settings, short_tmp):
    settings.HPC_IPC_UNIX_SOCKET = os.path.join(short_tmp, "nobody.sock")
    with pytest.raises(CommandError, match="hpcd is not answering") as raised:
        call_command("hpc_status", stdout=io.StringIO())
    assert raised.value.returncode == 1


# -- metrics and health ------------------------------------------------------------

@pytest.fixture
def metered_hpcd(transactional_db, short_tmp, settings):
    daemon = Hpcd(short_tmp, extra_env={
        "HPC_METRICS_ENDPOINT": "tcp:0:interface=127.0.0.1",
        "HPC_METRICS_JOB_COUNT_SECONDS": "0.2",
        "HPC_LOG_WARNINGS_PER_SECOND": "2",
    })
    settings.HPC_IPC_UNIX_SOCKET = daemon.socket_path
    daemon.start()
    match = re.search(r"hpcd metrics at http://127\.0\.0\.1:(\d+)/metrics", daemon.log())
    assert match, daemon.log()  # it says where, before READY=1
    daemon.metrics_url = f"http://127.0.0.1:{match.group(1)}"
    yield daemon
    daemon.stop()


def get(url):
    """``(status, body)`` of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(daemon):
    """``{(name, frozenset(labels.items())): value}`` from /metrics."""
    status, text = get(daemon.metrics_url + "/metrics")
    assert status == 200
    samples = {}
    for family in prometheus.text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0)


def test_metrics_count_jobs_events_transfers_and_refusals(metered_hpcd, agent_dir):
    daemon = metered_hpcd
    cluster = HpcCluster.objects.create(host_name="localhost", client_path=agent_dir())
    cluster.try_connect()
    wait_for(cluster.is_connected, what="the agent to connect")
    jobs = [HpcJob.objects.create() for _ in range(4)]
    for job in jobs[:3]:
        job.submit({"script": "head -c 5000 /dev/zero > out.bin"})
    jobs[3].submit({"script": "exit 3"})
    for job in jobs:
        wait_status(job, FINAL)
    assert [j.status for j in jobs] == [JobStatus.COMPLETED] * 3 + [JobStatus.ERROR]
    body = b"".join(jobs[0].fetch_remote_file("out.bin").streaming_content)
    assert len(body) == 5000
    # Refused connections: one without a token, 12 with a wrong one.
    port = websocket_port(daemon)
    assert RawWebsocket(port, "/agent").status == 401
    for _ in range(12):
        assert RawWebsocket(port, "/agent", token="Bearer not-a-token").status == 403

    c = str(cluster.pk)
    # The job counts are refreshed every 0.2 s here: wait for a count made
    # after the last job ended.
    samples = wait_for(lambda: (s := scrape(daemon)) and value(
        s, "hpcd_jobs", cluster=c, state="COMPLETED") == 3 and value(
        s, "hpcd_jobs", cluster=c, state="ERROR") == 1 and s, timeout=10,
        what="the job counts in /metrics")
    assert value(samples, "hpcd_clusters", state="online") == 1
    assert value(samples, "hpcd_clusters", state="offline") == 0
    assert value(samples, "hpcd_agents_connected") == 1
    assert value(samples, "hpcd_dispatched_total", action="submit") == 4
    assert value(samples, "hpcd_dispatch_seconds_count", action="submit") == 4
    assert value(samples, "hpcd_dispatch_seconds_bucket", action="submit", le="+Inf") == 4
    assert value(samples, "hpcd_dispatch_failures_total", action="submit") == 0
    assert value(samples, "hpcd_state_changes_total", state="COMPLETED") == 3
    assert value(samples, "hpcd_state_changes_total", state="ERROR") == 1
    assert value(samples, "hpcd_state_changes_total", state="SUBMITTED") == 4
    assert value(samples, "hpcd_transfer_bytes_total") == 5000
    assert value(samples, "hpcd_transfers_total", outcome="ok") == 1
    assert value(samples, "hpcd_transfers_active") == 0
    assert value(samples, "hpcd_refused_connections_total",
                 reason="a bearer token is required") == 1
    assert value(samples, "hpcd_refused_connections_total",
                 reason="invalid, used or expired token") == 12
    assert value(samples, "hpcd_db_task_run_seconds_count", task="apply_updates") >= 1
    assert value(samples, "hpcd_state_update_seconds_count") >= 1
    assert value(samples, "hpcd_db_tasks", state="waiting") >= 0
    assert value(samples, "hpcd_info", version=hpc_agent.__version__) == 1

    # The log: one line per job event, none per AMP connection, and the 13
    # refusals rate-limited to 2 lines a second with the rest counted.
    log = wait_for(lambda: "suppressed" in daemon.log() and daemon.log(), timeout=5,
                   what="the suppressed-warnings line")
    for job in jobs:
        assert f"cluster {c} job {job.pk}: submit sent to the agent" in log
        assert re.search(f"cluster {c} job {job.pk}: the agent answered the submit in "
                         r"[\d.]+ s \(scheduler id \S+\)", log)
        assert f"cluster {c} job {job.pk}: SUBMITTED -> RUNNING" in log
    assert "connection established" not in log and "connection lost" not in log
    refused = len(re.findall(r"\] refused an agent connection from", log))
    suppressed = sum(int(n) for n in re.findall(
        r"(\d+) more like this suppressed in \d+ s, the last: refused an agent connection",
        log))
    assert refused < 13 and refused + suppressed == 13, log


def test_healthz_checks_the_database_and_the_unix_socket(metered_hpcd):
    assert get(metered_hpcd.metrics_url + "/healthz") == (
        200, "ok: database and Unix socket answer\n")
    # A tmp cleaner (or a second hpcd) removed the socket: Django cannot reach hpcd.
    os.unlink(metered_hpcd.socket_path)
    status, body = get(metered_hpcd.metrics_url + "/healthz")
    assert status == 503
    assert body.startswith(f"unix socket {metered_hpcd.socket_path}: ")


# -- /healthz with the database gone ------------------------------------------------------

PG_BIN = "/usr/lib/postgresql/15/bin"


@pytest.fixture
def private_postgres():
    """A PostgreSQL of this test's own, on a free port, that the test may stop."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run a private PostgreSQL as the postgres user")
    if not os.path.exists(os.path.join(PG_BIN, "initdb")):
        pytest.skip(f"no PostgreSQL server binaries in {PG_BIN} (Debian's postgresql-15)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (the postgres extra)")
    import shutil

    from harness import free_port

    import pathlib
    import tempfile

    # Not under pytest's tmp_path: the postgres user must reach it.
    top = pathlib.Path(tempfile.mkdtemp(prefix="hpc-pg-"))
    os.chmod(top, 0o755)
    shutil.chown(top, "postgres", "postgres")
    data = top / "data"
    data.mkdir(mode=0o700)
    shutil.chown(data, "postgres", "postgres")
    port = free_port()

    def as_postgres(*command):
        result = subprocess.run(["runuser", "-u", "postgres", "--", *command],
                                capture_output=True, text=True, timeout=120)
        if result.returncode:
            raise subprocess.CalledProcessError(result.returncode, command, result.stdout,
                                                result.stderr)

    as_postgres(f"{PG_BIN}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres",
                "--no-sync")
    as_postgres(f"{PG_BIN}/pg_ctl", "-D", str(data), "-w", "-l", str(top / "pg.log"), "-o",
                f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off", "start")
    server = {"port": port, "stop": lambda: as_postgres(
        f"{PG_BIN}/pg_ctl", "-D", str(data), "-w", "-m", "immediate", "stop")}
    try:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE hpc_health")
        yield server
    finally:
        try:
            server["stop"]()
        except subprocess.CalledProcessError:
            pass  # stopped by the test already
        shutil.rmtree(top, ignore_errors=True)


def test_healthz_answers_503_when_the_database_is_gone(private_postgres, short_tmp):
    env = {"HPC_TEST_DB": "postgres", "HPC_TEST_PG_HOST": "127.0.0.1",
           "HPC_TEST_PG_PORT": str(private_postgres["port"]), "HPC_TEST_DB_NAME": "hpc_health",
           "HPC_METRICS_ENDPOINT": "tcp:0:interface=127.0.0.1",
           "HPC_IPC_UNIX_SOCKET": os.path.join(short_tmp, "hpcd.sock")}
    migrate = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "django-admin"), "migrate", "-v0"],
        env=dict(os.environ, DJANGO_SETTINGS_MODULE="testsettings",
                 PYTHONPATH=os.pathsep.join([TESTS, REPO]), **env),
        capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stderr
    daemon = Hpcd(short_tmp, extra_env=env)
    daemon.start()
    try:
        url = "http://127.0.0.1:{}/healthz".format(
            re.search(r"hpcd metrics at http://127\.0\.0\.1:(\d+)/", daemon.log()).group(1))
        assert get(url)[0] == 200
        private_postgres["stop"]()
        status, body = get(url)
        assert status == 503, body
        assert body.startswith("database: "), body
        assert "unix socket" not in body  # that one still works
    finally:
        daemon.stop()
