"""Slurm against the real single-node Slurm 22.05, run as hpcuser.

Every job is submitted at the start of the module, so the slow one (a time
limit of one minute, which slurmctld enforces 60-95 s later) runs while the
others are checked; the module takes about as long as that one job.
"""

import time

import pytest

pytestmark = pytest.mark.slurm

#: Jobs submitted once for the module: name -> (ui number, parameters).
JOBS = {
    "completed": (1, {"script": "echo done"}),
    "failed": (2, {"script": "exit 3", "name": "fails"}),
    "array": (3, {"script": '[ "$SLURM_ARRAY_TASK_ID" = 2 ] && exit 3; exit 0', "array": 4}),
    "timeout": (4, {"script": "sleep 300", "walltime_seconds": 60}),
    "cancelled": (5, {"script": "sleep 300"}),
}
ENDED = ("COMPLETED", "ERROR", "CANCELLED", "WALL_TIME_EXCEEDED", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def jobs(slurm):
    results = slurm(*[("submit", slurm.ui(n), params) for n, params in JOBS.values()])
    assert all("error" not in r for r in results), results
    return {name: (slurm.ui(n), r["value"]) for (name, (n, _)), r in zip(JOBS.items(), results)}


def wait_for(slurm, jobs, names, statuses=ENDED, timeout=150, **request):
    """Poll like the agent until these jobs are in one of ``statuses``."""
    deadline = time.monotonic() + timeout
    while True:
        states, spawned = slurm.one("status_many", [jobs[n] for n in names], **request)
        # One squeue for every job (unless hidden), and at most one accounting query.
        programs = [argv["argv"][0] for argv in spawned]
        assert programs in ([["sacct"]] if request.get("hide_live_view")
                            else (["squeue"], ["squeue", "sacct"]))
        found = {n: states.get(str(jobs[n][0])) for n in names}
        if all(s and s["status"] in statuses for s in found.values()):
            return found
        assert time.monotonic() < deadline, f"still {found}"
        time.sleep(1)


def test_completed_failed_and_array_jobs_end_in_their_real_states(slurm, jobs):
    states = wait_for(slurm, jobs, ["completed", "failed", "array"])
    assert states["completed"]["status"] == "COMPLETED"
    assert states["completed"]["started"] is not None
    assert (states["failed"]["status"], states["failed"]["detail"]) == ("ERROR", "exit code 3")
    assert states["array"]["status"] == "ERROR"
    assert states["array"]["detail"] == "array: 3 COMPLETED, 1 FAILED (exit code 3: 2)"


def test_a_cancelled_job_is_cancelled(slurm, jobs):
    wait_for(slurm, jobs, ["cancelled"], statuses=("RUNNING",))
    slurm.one("cancel", *jobs["cancelled"])
    assert wait_for(slurm, jobs, ["cancelled"])["cancelled"]["status"] == "CANCELLED"


def test_find_submitted_finds_jobs_by_tag_after_a_crash(slurm, jobs):
    ui_ids = [jobs["failed"][0], jobs["array"][0], slurm.ui(99)]
    found, spawned = slurm.one("find_submitted", ui_ids)
    assert found == {str(jobs["failed"][0]): jobs["failed"][1],
                     str(jobs["array"][0]): jobs["array"][1]}
    # One squeue; accounting only for the tag it did not find there.
    assert [argv["argv"][0] for argv in spawned] == ["squeue", "sacct"]


@pytest.mark.parametrize("accounting", ["sacct", "jobcomp"])
def test_jobs_that_ended_unwatched_are_found_in_accounting(slurm, jobs, accounting):
    """As if the jobs had left squeue (MinJobAge) while no agent was polling."""
    if accounting == "sacct" and slurm.accounting != "slurmdbd":
        pytest.skip("this Slurm has no slurmdbd")
    names = ["completed", "failed", "array"]
    wait_for(slurm, jobs, names)
    hidden = {"hide_live_view": "squeue", "attributes": {"accounting": accounting}}
    # slurmdbd receives end records a moment after the controller has them.
    states = wait_for(slurm, jobs, names, timeout=30, **hidden)
    assert states["completed"]["status"] == "COMPLETED"
    assert states["failed"]["detail"] == "exit code 3"
    expected = "array: 3 COMPLETED, 1 FAILED (exit code 3" + (": 2)" if accounting == "sacct"
                                                              else ")")
    assert states["array"]["detail"] == expected
    found, _ = slurm.one("find_submitted", [jobs["failed"][0]], **hidden)
    assert found == {str(jobs["failed"][0]): jobs["failed"][1]}


def test_recorded_outputs_have_the_shape_of_real_ones(slurm, jobs, same_shape):
    """The unit tests' fake answers look like what this Slurm prints today."""
    names = ["completed", "failed", "array"]
    wait_for(slurm, jobs, names)
    _, spawned = slurm.one("status_many", [jobs[n] for n in names])
    same_shape("squeue", "slurm/squeue.txt", spawned[0]["stdout"])
    if slurm.accounting == "slurmdbd":
        _, spawned = slurm.one("status_many", [jobs[n] for n in names],
                               hide_live_view="squeue")
        same_shape("sacct", "slurm/sacct.txt", spawned[-1]["stdout"])
        same_shape("sacct", "slurm/sacct_handwritten.txt", spawned[-1]["stdout"])
    _, spawned = slurm.one("status_many", [jobs[n] for n in names], hide_live_view="squeue",
                           attributes={"accounting": "jobcomp"})
    assert spawned[-1]["argv"][:2] == ["sacct", "-c"]
    same_shape("sacct", "slurm/sacct_jobcomp.txt", spawned[-1]["stdout"])


def test_a_job_over_its_time_limit_exceeds_its_wall_time(slurm, jobs):
    # Submitted with the others at the start of the module: 60-95 s.
    state = wait_for(slurm, jobs, ["timeout"], timeout=170)["timeout"]
    assert (state["status"], state["detail"]) == ("WALL_TIME_EXCEEDED", "time limit reached")
