"""The agent's benchmark scripts keep working (run at a small size; no timing checked)."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))


def run(script, *args):
    done = subprocess.run([sys.executable, os.path.join(REPO, "bench", script), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_agent_state_bench_prints_its_figures():
    out = run("agent_state.py", "--jobs", "50")
    assert re.search(r"^agent_state_updates: \d+ updates/s$", out, re.M), out
    assert re.search(r"^agent_submitted: \d+ jobs/s$", out, re.M), out


def test_agent_files_bench_prints_its_figures():
    out = run("agent_files.py", "--entries", "250")
    assert re.search(r"^agent_file_list_250: [\d.]+ s$", out, re.M), out
