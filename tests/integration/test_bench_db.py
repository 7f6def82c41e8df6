"""The database benchmarks keep working: each runs at a small size and prints
its figure (the figures themselves are for the README, not asserted)."""

import os
import re
import subprocess
import sys

import pytest

from harness import REPO


@pytest.mark.parametrize("script, arguments, figure", [
    ("state_fanin.py", ["--changes", "300", "--batch", "40"], r"state_changes: \d+ changes/s"),
    ("state_fanin.py", ["--changes", "90", "--order", "jobs"], r"state_changes: \d+ changes/s"),
    ("submit_many.py", ["--jobs", "300", "--single", "5"], r"submit_many: \d+ jobs/s"),
])
def test_the_bench_script_runs_at_a_small_size(script, arguments, figure, tmp_path):
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env["HPC_TEST_SQLITE"] = str(tmp_path / "bench.sqlite3")
    if env.get("HPC_TEST_DB") == "postgres":
        # Its own database: the benchmark creates it afresh and drops it.
        env["HPC_TEST_DB_NAME"] = env.get("HPC_TEST_DB_NAME", "test_hpc") + "_bench"
    else:
        env.pop("HPC_TEST_DB_NAME", None)
    done = subprocess.run([sys.executable, os.path.join(REPO, "bench", script), *arguments],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(rf"^{figure}$", done.stdout, re.M), done.stdout
