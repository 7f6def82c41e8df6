"""The database benchmarks keep working: each runs at a small size and prints
its figure (the figures themselves are for the README, not asserted)."""

import re

import pytest

from harness import run_bench


@pytest.mark.parametrize("script, arguments, figure", [
    ("state_fanin.py", ["--changes", "300", "--batch", "40"], r"state_changes: \d+ changes/s"),
    ("state_fanin.py", ["--changes", "90", "--order", "jobs"], r"state_changes: \d+ changes/s"),
    ("submit_many.py", ["--jobs", "300", "--single", "5"], r"submit_many: \d+ jobs/s"),
])
def test_the_bench_script_runs_at_a_small_size(script, arguments, figure, tmp_path):
    out = run_bench(script, arguments, tmp_path)
    assert re.search(rf"^{figure}$", out, re.M), out
