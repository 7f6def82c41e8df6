"""SGE against the real single-host Son of Grid Engine 8.1.9, run as hpcuser.

Every job is submitted at the start of the module; finished jobs leave qstat
at once and reach qacct a few seconds later, so each check polls like the
agent until the state is decided.
"""

import time

import pytest

pytestmark = pytest.mark.sge

JOBS = {
    "completed": (1, {"script": "echo done"}),
    "failed": (2, {"script": "exit 3", "name": "fails"}),
    "array": (3, {"script": '[ "$SGE_TASK_ID" = 2 ] && exit 3; exit 0', "array": "1-4"}),
    "timeout": (4, {"script": "sleep 120", "walltime_seconds": 3}),
    # One task at a time: cancelling while task 1 runs leaves 2-3 never started.
    "cancelled": (5, {"script": "sleep 120", "array": "1-3%1"}),
}
ENDED = ("COMPLETED", "ERROR", "CANCELLED", "WALL_TIME_EXCEEDED", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def jobs(sge):
    results = sge(*[("submit", sge.ui(n), params) for n, params in JOBS.values()])
    assert all("error" not in r for r in results), results
    return {name: (sge.ui(n), r["value"]) for (name, (n, _)), r in zip(JOBS.items(), results)}


def wait_for(sge, jobs, names, statuses=ENDED, timeout=90):
    """Poll like the agent until these jobs are in one of ``statuses``."""
    deadline = time.monotonic() + timeout
    while True:
        states, spawned = sge.one("status_many", [jobs[n] for n in names])
        # One qstat for every job; qacct only for those that left it.
        programs = [argv["argv"][0] for argv in spawned]
        assert programs[0] == "qstat" and set(programs[1:]) <= {"qacct"}
        assert programs.count("qstat") == 1 and len(programs) <= 1 + len(names)
        found = {n: states.get(str(jobs[n][0])) for n in names}
        if all(s and s["status"] in statuses for s in found.values()):
            return found
        assert time.monotonic() < deadline, f"still {found}"
        time.sleep(1)


def test_an_array_job_id_carries_its_task_range(jobs):
    assert jobs["array"][1].endswith(".1-4:1")
    assert "." not in jobs["completed"][1]


def test_jobs_end_in_their_real_states(sge, jobs):
    states = wait_for(sge, jobs, ["completed", "failed", "array", "timeout"])
    assert states["completed"]["status"] == "COMPLETED"
    assert states["completed"]["started"] is not None
    assert (states["failed"]["status"], states["failed"]["detail"]) == ("ERROR", "exit code 3")
    assert states["array"]["status"] == "ERROR"
    assert states["array"]["detail"] == "array: 3 COMPLETED, 1 FAILED (exit code 3: 2)"
    assert states["timeout"]["status"] == "WALL_TIME_EXCEEDED"


def test_a_cancelled_array_is_cancelled_including_tasks_that_never_started(sge, jobs):
    wait_for(sge, jobs, ["cancelled"], statuses=("RUNNING",))
    sge.one("cancel", *jobs["cancelled"])
    state = wait_for(sge, jobs, ["cancelled"])["cancelled"]
    assert state["status"] == "CANCELLED"
    assert state["detail"] == ("array: 3 CANCELLED (deleted before it started: 2-3; "
                               "deleted while running: 1)")


def test_find_submitted_finds_jobs_by_tag_live_and_in_accounting(sge, jobs):
    wait_for(sge, jobs, ["failed", "array"])
    found, spawned = sge.one("find_submitted",
                             [jobs["failed"][0], jobs["array"][0], sge.ui(99)])
    assert found == {str(jobs["failed"][0]): jobs["failed"][1],
                     str(jobs["array"][0]): jobs["array"][1]}
    assert [argv["argv"] for argv in spawned][1:] == [
        ["qacct", "-j", f"hpc-{jobs['failed'][0]}*"], ["qacct", "-j", f"hpc-{jobs['array'][0]}*"],
        ["qacct", "-j", f"hpc-{sge.ui(99)}*"]]


def test_find_submitted_gives_a_running_array_its_whole_task_range(sge):
    ui_id = sge.ui(10)
    job_id, _ = sge.one("submit", ui_id, {"script": "sleep 60", "array": "1-3%1"})
    try:
        found, _ = sge.one("find_submitted", [ui_id])
        assert found == {str(ui_id): job_id}
    finally:
        sge.one("cancel", ui_id, job_id)


def test_recorded_outputs_have_the_shape_of_real_ones(sge, jobs, same_shape):
    """The unit tests' fake answers look like what this Grid Engine prints today."""
    ui_id = sge.ui(11)
    job_id, _ = sge.one("submit", ui_id, {"script": "sleep 60", "array": "1-4%1"})
    try:
        wait_for(sge, {"live": (ui_id, job_id)}, ["live"], statuses=("RUNNING",))
        _, spawned = sge.one("status_many", [(ui_id, job_id)])
        same_shape("qstat", "sge/qstat.xml", spawned[0]["stdout"])
    finally:
        sge.one("cancel", ui_id, job_id)
    wait_for(sge, jobs, ["array", "timeout"])
    _, spawned = sge.one("status_many", [jobs["array"], jobs["timeout"]])
    real = "".join(argv["stdout"] for argv in spawned[1:])
    same_shape("qacct", "sge/qacct.txt", real)
    same_shape("qacct", "sge/qacct_handwritten.txt", real)
