"""The benchmarks that run a real hpcd and real agents keep working: each runs
at a tiny size and prints its figures (the figures are for the README, not
asserted)."""

import os
import re
import subprocess
import sys

import pytest

from harness import REPO


def run_bench(script, arguments, tmp_path):
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env["HPC_TEST_SQLITE"] = str(tmp_path / "bench.sqlite3")
    if env.get("HPC_TEST_DB") == "postgres":
        env["HPC_TEST_DB_NAME"] = env.get("HPC_TEST_DB_NAME", "test_hpc") + "_bench"
    else:
        env.pop("HPC_TEST_DB_NAME", None)
    done = subprocess.run([sys.executable, os.path.join(REPO, "bench", script), *arguments],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("arguments", [
    ["--scheduler", "instant", "--via", "submit_many"],
    ["--scheduler", "instant", "--via", "submit", "--submitters", "4"],
    ["--scheduler", "local", "--via", "submit"],
])
def test_the_dispatch_bench_runs_at_a_small_size(arguments, tmp_path):
    out = run_bench("dispatch.py", ["--jobs", "40", "--timeout", "120", *arguments], tmp_path)
    assert re.search(r"^dispatch_\w+: \d+ jobs/s$", out, re.M), out
    assert re.search(r"^dispatch_\w+_errors: 0 jobs$", out, re.M), out


def test_the_launch_storm_bench_runs_at_a_small_size(tmp_path):
    out = run_bench("launch_storm.py", ["--agents", "3", "--timeout", "120"], tmp_path)
    assert re.search(r"^launch_storm_3: [\d.]+ s until all online$", out, re.M), out
    assert re.search(r"^agent_start_cpu: [\d.]+ s \(median of 3\)$", out, re.M), out


def test_the_lookups_bench_runs_at_a_small_size(tmp_path):
    out = run_bench("lookups.py", ["--calls", "50", "--entries", "300"], tmp_path)
    assert re.search(r"^is_connected_median: [\d.]+ ms$", out, re.M), out
    assert re.search(r"^is_connected_queries: 0.00 per call$", out, re.M), out
    assert re.search(r"^file_list_300: [\d.]+ s$", out, re.M), out
