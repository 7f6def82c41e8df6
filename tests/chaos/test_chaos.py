"""A short chaos run: nothing is lost, doubled, stuck or moved backwards.

Some dozens of short jobs go through a real hpcd and a real agent on a
PostgreSQL of the run's own (tests/chaos_kit.py), about 5% of them cancelled,
while one fault of each kind strikes: kill -9 of hpcd and of the agent, a
few seconds of SIGSTOP of each, PostgreSQL stopped and restarted ``-m
immediate``, and (as root, with iproute2) a network cut between hpcd's and
the agent's namespaces.  The run is a process of its own, since its Django
works on the private PostgreSQL; its seed is in the output, for replay with
``python tests/chaos_kit.py --seed N``.  The long run is bench/chaos.py.
"""

import json
import os
import subprocess
import sys

import pytest

from chaos_kit import PROBLEMS, Namespaces, _pg_program

KIT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "chaos_kit.py")


def postgres_unavailable():
    try:
        _pg_program("initdb")
        _pg_program("pg_ctl")
    except RuntimeError as e:
        return str(e)
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "initdb refuses root and there is no postgres user to run it as"
    return None


@pytest.mark.timeout(240)
def test_a_short_chaos_run_loses_nothing(tmp_path):
    why = postgres_unavailable()
    if why:
        pytest.skip(f"the chaos run needs a PostgreSQL of its own: {why}")
    report = tmp_path / "verdict.json"
    command = [sys.executable, KIT, "--jobs", "40", "--rate", "3", "--hold", "2-4",
               "--drain", "90", "--json", str(report)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        output, _ = process.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        process.terminate()  # the run stops what it started
        output, _ = process.communicate(timeout=30)
    assert report.exists(), f"the run did not finish (exit {process.returncode}):\n{output}"
    result = json.loads(report.read_text())
    assert result["jobs"] == 40, output
    problems = {name: result[name] for name in PROBLEMS}
    assert problems == dict.fromkeys(PROBLEMS, 0), output
    kinds = set(result["recovery"])
    assert {"hpcd_kill", "agent_kill", "hpcd_stop", "agent_stop",
            "postgres_restart"} <= kinds, output
    if Namespaces.unavailable() is None:
        assert "network_cut" in kinds, output
    assert process.returncode == 0, output
