"""A portal's Slurm class written for the seed (tests/seedportal/cluster) against the
real Slurm, run as hpcuser: the seed's module names, its %-template, its submit and
status overrides, with this project's job tag on top."""

import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


def test_a_seed_style_portal_job_runs_on_the_real_slurm(seed_slurm):
    ui = seed_slurm.ui(1)
    parameters = '{"greeting": "hello",  "n": 3}'  # a JSON string, odd spacing kept
    job_id, spawned = seed_slurm.one("_submit", ui, parameters)
    workdir = Path(seed_slurm.directory, "jobs", str(ui))
    assert [(call["argv"][0], call["cwd"]) for call in spawned] == [("sbatch", str(workdir))]

    deadline = time.monotonic() + 120
    while True:
        # The portal overrides status(): it is asked job by job.
        states, _ = seed_slurm.one("status_many", [(ui, job_id)])
        state = states.get(str(ui))
        if state and state["status"] not in ("QUEUED", "RUNNING"):
            break
        assert time.monotonic() < deadline, f"still {state}"
        time.sleep(1)
    assert (state["status"], state["detail"]) == ("COMPLETED", "portal job finished")

    assert sorted(os.listdir(workdir)) == [
        "parameters.json", "result.txt", f"slurm-{job_id}.err", f"slurm-{job_id}.out"]
    assert (workdir / "parameters.json").read_text() == parameters
    assert (workdir / "result.txt").read_text() == parameters
    out = (workdir / f"slurm-{job_id}.out").read_text()
    # The tag on sbatch's command line wins over the template's --job-name;
    # the template's other #SBATCH lines apply (Slurm counts time in minutes).
    assert f"job name: hpc-{ui}.portal_{ui}\n" in out
    assert "memory per cpu: 64\n" in out
    assert "time limit: 1:03:00\n" in out
    found, _ = seed_slurm.one("find_submitted", [ui, seed_slurm.ui(2)])
    assert found == {str(ui): job_id}

