"""The Local scheduler and its job runner, with real short bash jobs in temp dirs
(hpc_agent.schedulers.local, hpc_agent.runner)."""

import json
import os
import signal
import sys
import time

import pytest

from hpc_agent import runner
from hpc_agent.config import AgentSettings
from hpc_agent.schedulers.base import InvalidParameters
from hpc_agent.schedulers.local import Local
from hpc_agent.status import JobStatus as S


@pytest.fixture
def agent_settings(tmp_path):
    s = AgentSettings(str(tmp_path), {"HPC_JOB_WORKING_DIRECTORY": str(tmp_path / "jobs")})
    yield s
    # Leave no job behind, whatever the test did.
    jobs = tmp_path / "jobs"
    for info_path in jobs.glob("*/.hpc/runner.json") if jobs.exists() else []:
        info = json.loads(info_path.read_text())
        for kill, target in ((os.killpg, info["pgid"]), (os.kill, info["pid"])):
            try:
                kill(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def wait_for_state(job, wanted, timeout=3.0):
    """Poll the job's status until it is ``wanted`` (the runner works in 0.2 s steps)."""
    deadline = time.monotonic() + timeout
    while True:
        state = job.status()
        if state.status == wanted or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def alive(pid):
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:].split()[0] != b"Z"


def read(job, name):
    with open(os.path.join(job.get_working_directory(), name)) as f:
        return f.read()


def test_a_job_runs_and_completes_with_its_start_time(agent_settings):
    job = Local(agent_settings, 1)
    before = time.time()
    scheduler_id = job.submit({"script": "sleep 0.4; echo hello"})
    assert scheduler_id.isdigit()
    running = job.status()
    assert running.status == S.RUNNING
    done = wait_for_state(job, S.COMPLETED)
    assert done.status == S.COMPLETED and done.detail == ""
    assert before <= done.started <= time.time()
    assert read(job, "hpc-job.out") == "hello\n"


def test_the_script_runs_in_the_jobs_working_directory(agent_settings):
    job = Local(agent_settings, 2)
    job.submit({"script": 'pwd > where.txt; echo "$HPC_JOB_WORKING_DIRECTORY" >> where.txt'})
    assert wait_for_state(job, S.COMPLETED).status == S.COMPLETED
    workdir = os.path.realpath(job.get_working_directory())
    assert read(job, "where.txt").split() == [workdir, job.get_working_directory()]


def test_a_non_zero_exit_is_an_error_naming_the_exit_code(agent_settings):
    job = Local(agent_settings, 3)
    job.submit({"script": "echo oops >&2; exit 3"})
    state = wait_for_state(job, S.ERROR)
    assert (state.status, state.detail) == (S.ERROR, "exit code 3")
    assert state.started is not None
    assert read(job, "hpc-job.err") == "oops\n"


def test_a_job_killed_by_a_signal_is_an_error_naming_the_signal(agent_settings):
    job = Local(agent_settings, 4)
    job.submit({"script": "kill -KILL $$"})
    state = wait_for_state(job, S.ERROR)
    assert state.detail == "killed by signal 9 (SIGKILL)"


def test_cancel_stops_the_job_and_its_background_children(agent_settings):
    job = Local(agent_settings, 5)
    job.submit({"script": "sleep 60 & echo $! > child.pid; sleep 60"})
    deadline = time.monotonic() + 3
    while not os.path.exists(os.path.join(job.get_working_directory(), "child.pid")):
        assert time.monotonic() < deadline, "the job never started its child"
        time.sleep(0.02)
    child = int(read(job, "child.pid"))
    assert alive(child)
    job.cancel()
    state = wait_for_state(job, S.CANCELLED)
    assert state.status == S.CANCELLED and state.started is not None
    deadline = time.monotonic() + 2
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(child)


def test_cancel_of_a_finished_job_changes_nothing(agent_settings):
    job = Local(agent_settings, 6)
    job.submit({"script": "true"})
    assert wait_for_state(job, S.COMPLETED).status == S.COMPLETED
    job.cancel()
    assert job.status().status == S.COMPLETED


def test_a_job_over_its_walltime_is_stopped_as_wall_time_exceeded(agent_settings):
    job = Local(agent_settings, 7)
    start = time.monotonic()
    job.submit({"script": "sleep 30", "walltime_seconds": 1})
    state = wait_for_state(job, S.WALL_TIME_EXCEEDED)
    assert state.status == S.WALL_TIME_EXCEEDED
    assert "walltime" in state.detail
    assert 0.9 <= time.monotonic() - start < 3


def test_the_environment_parameter_reaches_the_script(agent_settings):
    job = Local(agent_settings, 8)
    job.submit({"script": 'printf "%s|%s" "$GREETING" "$OTHER" > env.txt',
                "environment": {"GREETING": "hello world; $(not run)", "OTHER": ""}})
    assert wait_for_state(job, S.COMPLETED).status == S.COMPLETED
    assert read(job, "env.txt") == "hello world; $(not run)|"


def test_the_memory_limit_makes_a_big_allocation_fail(agent_settings):
    job = Local(agent_settings, 9)
    allocate = f"{sys.executable} -c 'bytearray(500 * 1024 * 1024)'"
    job.submit({"script": f"{allocate} && echo allocated", "memory_mb": 100})
    state = wait_for_state(job, S.ERROR)
    assert state.status == S.ERROR and state.detail.startswith("exit code")
    assert "MemoryError" in read(job, "hpc-job.err")
    assert "allocated" not in read(job, "hpc-job.out")


def test_without_a_memory_limit_the_same_allocation_succeeds(agent_settings):
    job = Local(agent_settings, 10)
    job.submit({"script": f"{sys.executable} -c 'bytearray(200 * 1024 * 1024)'"})
    assert wait_for_state(job, S.COMPLETED).status == S.COMPLETED


def test_parameters_the_local_scheduler_cannot_honour_are_refused_by_name(agent_settings):
    job = Local(agent_settings, 11)
    with pytest.raises(InvalidParameters) as info:
        job.submit({"script": "true", "queue": "long", "account": "proj1", "array": 4,
                    "nodes": 2})
    for name in ("'queue'", "'account'", "'array'", "'nodes'"):
        assert name in str(info.value)
    assert not os.path.exists(job.control_dir())  # nothing was started


@pytest.mark.parametrize("parameter", [{"queue": "q"}, {"account": "a"}, {"array": "0-3"},
                                       {"nodes": 3}])
def test_each_unsupported_parameter_alone_is_refused(agent_settings, parameter):
    with pytest.raises(InvalidParameters, match=repr(next(iter(parameter)))):
        Local(agent_settings, 12).submit({"script": "true", **parameter})


def test_one_node_and_the_common_resource_requests_are_accepted(agent_settings):
    job = Local(agent_settings, 13)
    job.submit({"script": "true", "nodes": 1, "tasks": 1, "cpus_per_task": 2,
                "name": "my-job", "walltime_seconds": 60})
    assert wait_for_state(job, S.COMPLETED).status == S.COMPLETED


@pytest.mark.parametrize("parameters", [{}, {"script": ""}, {"script": "true", "bogus": 1},
                                        {"script": "true", "memory_mb": 0}, "echo"])
def test_invalid_parameters_are_refused_before_anything_runs(agent_settings, parameters):
    with pytest.raises(InvalidParameters):
        Local(agent_settings, 14).submit(parameters)


def test_find_submitted_finds_jobs_by_their_control_files_only(agent_settings):
    job = Local(agent_settings, 15)
    scheduler_id = job.submit({"script": "true"})
    os.makedirs(Local(agent_settings, 16).get_working_directory())  # a directory, never submitted
    assert Local.find_submitted(agent_settings, [15, 16, 17]) == {15: scheduler_id}


def test_status_many_reports_each_job(agent_settings):
    a, b = Local(agent_settings, 18), Local(agent_settings, 19)
    ida = a.submit({"script": "true"})
    idb = b.submit({"script": "exit 1"})
    wait_for_state(a, S.COMPLETED)
    wait_for_state(b, S.ERROR)
    states = Local.status_many(agent_settings, [(18, ida), (19, idb)])
    assert {k: v.status for k, v in states.items()} == {18: S.COMPLETED, 19: S.ERROR}


def test_a_job_whose_runner_never_started_is_an_error(agent_settings):
    job = Local(agent_settings, 20)
    os.makedirs(job.control_dir())
    state = job.status()
    assert state.status == S.ERROR and "never started" in state.detail


def test_a_runner_killed_with_sigkill_leaves_the_job_in_error_vanished(agent_settings):
    job = Local(agent_settings, 21)
    pid = int(job.submit({"script": "sleep 30"}))
    assert job.status().status == S.RUNNING
    os.kill(pid, signal.SIGKILL)
    state = wait_for_state(job, S.ERROR)
    assert state.status == S.ERROR and "vanished" in state.detail


def test_cancel_after_the_runner_vanished_kills_what_is_left_of_the_job(agent_settings):
    job = Local(agent_settings, 22)
    pid = int(job.submit({"script": "sleep 30"}))
    pgid = json.loads(read(job, ".hpc/runner.json"))["pgid"]
    os.kill(pid, signal.SIGKILL)
    wait_for_state(job, S.ERROR)
    assert alive(pgid)
    job.cancel()
    deadline = time.monotonic() + 2
    while alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(pgid)


def test_the_result_file_is_written_atomically(tmp_path):
    path = str(tmp_path / "result.json")
    runner.write_json(path, {"a": 1})
    runner.write_json(path, {"a": 2})
    assert json.loads(open(path).read()) == {"a": 2}
    assert os.listdir(tmp_path) == ["result.json"]


def test_process_start_time_identifies_a_live_process():
    assert runner.process_start_time(os.getpid()) == runner.process_start_time(os.getpid())
    assert runner.process_start_time(os.getpid()) > 0
    assert runner.process_start_time(2 ** 22 + 1) is None
