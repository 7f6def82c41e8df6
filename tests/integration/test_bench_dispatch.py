"""bench/dispatch.py keeps working: a tiny burst through a real hpcd and agent
in each mode (the figures are for the README, not asserted)."""

import os
import re
import subprocess
import sys

import pytest

from harness import REPO


@pytest.mark.parametrize("arguments", [
    ["--scheduler", "instant", "--via", "submit_many"],
    ["--scheduler", "instant", "--via", "submit", "--submitters", "4"],
    ["--scheduler", "local", "--via", "submit"],
])
def test_the_dispatch_bench_runs_at_a_small_size(arguments, tmp_path):
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env["HPC_TEST_SQLITE"] = str(tmp_path / "bench.sqlite3")
    if env.get("HPC_TEST_DB") == "postgres":
        env["HPC_TEST_DB_NAME"] = env.get("HPC_TEST_DB_NAME", "test_hpc") + "_bench"
    else:
        env.pop("HPC_TEST_DB_NAME", None)
    done = subprocess.run([sys.executable, os.path.join(REPO, "bench", "dispatch.py"),
                           "--jobs", "40", "--timeout", "120", *arguments],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^dispatch_\w+: \d+ jobs/s$", done.stdout, re.M), done.stdout
    assert re.search(r"^dispatch_\w+_errors: 0 jobs$", done.stdout, re.M), done.stdout
