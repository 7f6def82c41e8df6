"""A running hpcd, a local agent and a connected cluster, for the benchmarks.

Uses the test suite's harness and settings (SQLite by default, or
PostgreSQL with HPC_TEST_DB=postgres) in a temporary directory.
"""

import contextlib
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests"), REPO]


@contextlib.contextmanager
def django_environment():
    """Django set up on a fresh test database in a temporary directory
    (SQLite by default, PostgreSQL with HPC_TEST_DB=postgres); yields the
    directory."""
    with tempfile.TemporaryDirectory(prefix="hpc-bench-") as tmp:
        os.environ.setdefault("HPC_TEST_SQLITE", os.path.join(tmp, "db.sqlite3"))
        os.environ["HPC_IPC_UNIX_SOCKET"] = os.path.join(tmp, "hpcd.sock")
        os.environ["DJANGO_SETTINGS_MODULE"] = "testsettings"
        import django

        django.setup()
        from django.core.management import call_command
        from django.db import connection

        if os.environ.get("HPC_TEST_DB") == "postgres":
            connection.creation.create_test_db(verbosity=0, autoclobber=True)
        call_command("migrate", verbosity=0)
        yield tmp


@contextlib.contextmanager
def local_cluster():
    with django_environment() as tmp:
        from djangoapp.models import HpcCluster
        from harness import Hpcd, kill_agent, make_agent_dir, wait_for

        daemon = Hpcd(tmp).start()
        agent = make_agent_dir(os.path.join(tmp, "agent"))
        try:
            cluster = HpcCluster.objects.create(host_name="localhost", client_path=agent)
            cluster.try_connect()
            wait_for(cluster.is_connected, what="the agent")
            yield cluster, daemon, agent
        finally:
            daemon.stop()
            kill_agent(agent)


def _status_mib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mib(pid):
    """Resident memory of a process now, MiB."""
    return _status_mib(pid, "VmRSS")


def peak_rss_mib(pid):
    """The most resident memory the process has had, MiB."""
    return _status_mib(pid, "VmHWM")


def _stat_seconds(pid, first):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[first]) + int(fields[first + 1])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User and system CPU time the process has used, seconds."""
    return _stat_seconds(pid, 11)


def children_cpu_seconds(pid):
    """User and system CPU time of the process's children that it has
    waited for (e.g. hpcd's agent launch commands), seconds."""
    return _stat_seconds(pid, 13)
