"""The benchmarks that run a real hpcd and real agents keep working: each runs
at a tiny size and prints its figures (the figures are for the README, not
asserted)."""

import re

import pytest

from harness import run_bench


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
    assert re.search(r"^launch_storm_3_launch_cpu: [\d.]+ s \(all launch commands\)$", out,
                     re.M), out


def test_the_lookups_bench_runs_at_a_small_size(tmp_path):
    out = run_bench("lookups.py", ["--calls", "50", "--entries", "300"], tmp_path)
    assert re.search(r"^is_connected_median: [\d.]+ ms$", out, re.M), out
    assert re.search(r"^is_connected_queries: 0.00 per call$", out, re.M), out
    assert re.search(r"^file_list_300: [\d.]+ s$", out, re.M), out
