"""A migrated database and nothing else, for the benchmarks that only write it.

Uses the test suite's settings: SQLite in a temporary directory by default,
PostgreSQL with HPC_TEST_DB=postgres (the test database HPC_TEST_DB_NAME,
created afresh).  No hpcd runs: a notification to it fails at once, as it
may in production.
"""

import contextlib
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests"), REPO]


@contextlib.contextmanager
def database():
    with tempfile.TemporaryDirectory(prefix="hpc-bench-") as tmp:
        os.environ.setdefault("HPC_TEST_SQLITE", os.path.join(tmp, "db.sqlite3"))
        os.environ["HPC_IPC_UNIX_SOCKET"] = os.path.join(tmp, "no-hpcd.sock")
        os.environ["DJANGO_SETTINGS_MODULE"] = "testsettings"
        import django

        django.setup()
        from django.core.management import call_command
        from django.db import connection

        postgres = os.environ.get("HPC_TEST_DB") == "postgres"
        old_name = connection.settings_dict["NAME"]
        if postgres:
            connection.creation.create_test_db(verbosity=0, autoclobber=True)
        else:
            call_command("migrate", verbosity=0)
        try:
            yield connection.vendor
        finally:
            if postgres:
                connection.creation.destroy_test_db(old_name, verbosity=0)
