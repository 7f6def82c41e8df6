"""The Local scheduler and its job runner, with real short bash jobs in temp dirs
(hpc_agent.schedulers.local, hpc_agent.runner)."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import kill_agent
from hpc_agent import runner
from hpc_agent.config import AgentSettings
from hpc_agent.schedulers.base import InvalidParameters, JobState, submit_job
from hpc_agent.schedulers.local import Local
from hpc_agent.status import JobStatus as S


@pytest.fixture
def agent_settings(tmp_path):
    s = AgentSettings(str(tmp_path), {"HPC_JOB_WORKING_DIRECTORY": str(tmp_path / "jobs")})
    yield s
    # Leave no job behind, whatever the test did.
    kill_agent(str(tmp_path))


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


def control(job, name):
    """A file of the agent's for the job (outside its working directory)."""
    with open(os.path.join(job.control_dir(), name)) as f:
        return f.read()


def wait_for_file(directory, name, timeout=3.0):
    """Until the file exists with content: the runner's shell creates a file
    before it writes to it (``printf ... >pgid``)."""
    path = os.path.join(directory, name)
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and os.path.getsize(path)):
        assert time.monotonic() < deadline, f"{name} never appeared in {directory}"
        time.sleep(0.02)


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


def test_a_cancel_right_after_the_submit_cancels_even_before_the_runners_trap(agent_settings):
    # The runner may not have set its signal trap when submit() returns: the
    # SIGTERM then kills it before it starts the job, which is a cancel all
    # the same (it was reported as ERROR "runner vanished" in 2 of 5 tries).
    for ui_id in range(100, 120):
        job = Local(agent_settings, ui_id)
        job.submit({"script": "sleep 30"})
        job.cancel()
        state = wait_for_state(job, S.CANCELLED, timeout=5)
        assert state.status == S.CANCELLED, (ui_id, state)


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
    wait_for_file(job.control_dir(), "pgid")
    pgid = int(control(job, "pgid"))
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


# -- where the agent's files are -----------------------------------------------------

def test_the_agents_files_stay_out_of_the_jobs_working_directory(agent_settings):
    job = Local(agent_settings, 30)
    submit_job(job, {"script": "echo out; echo err >&2"})
    assert wait_for_state(job, S.COMPLETED).status == S.COMPLETED
    assert sorted(os.listdir(job.get_working_directory())) == ["hpc-job.err", "hpc-job.out"]
    assert job.control_dir() == os.path.join(agent_settings.BASE_DIR, "control", "30")
    assert {"job.sh", "runner.json", "pgid", "result.json"} <= set(os.listdir(job.control_dir()))


def test_delete_data_removes_the_working_directory_and_the_agents_files(agent_settings):
    job = Local(agent_settings, 31)
    submit_job(job, {"script": "true"})
    wait_for_state(job, S.COMPLETED)
    job.delete_data()
    assert not os.path.exists(job.get_working_directory())
    assert not os.path.exists(job.control_dir())


def start_stand_in(tmp_path, job, legacy_record):
    """A job as an agent before the control directory left it: its records in
    <working directory>/.hpc, its "runner" a process in a session of its own."""
    process = subprocess.Popen(["sleep", "30"], start_new_session=True)
    legacy = Path(job.get_working_directory(), ".hpc")
    legacy.mkdir(parents=True)
    (legacy / "runner.json").write_text(json.dumps(legacy_record(process)))
    return process, legacy


def test_a_job_started_with_the_old_layout_is_tracked_across_an_upgrade(agent_settings,
                                                                        tmp_path):
    job = Local(agent_settings, 32)
    process, legacy = start_stand_in(tmp_path, job, lambda p: {
        "pid": p.pid, "start": runner.process_start_time(p.pid), "pgid": p.pid + 1,
        "started": 1.0})
    assert job.control_dir() == str(legacy)
    assert job.status().status == S.RUNNING
    assert Local.find_submitted(agent_settings, [32]) == {32: str(process.pid)}
    job.cancel()  # SIGTERM to the runner, which stops its job
    assert process.wait(timeout=5) == -signal.SIGTERM
    (legacy / "result.json").write_text(json.dumps(
        {"exit_code": None, "signal": 15, "stopped": "cancelled", "started": 1.0,
         "finished": 2.0}))
    assert job.status() == JobState(S.CANCELLED, started=1.0)


def test_cancel_of_an_old_layout_job_whose_runner_vanished_stops_its_group(agent_settings,
                                                                           tmp_path):
    job = Local(agent_settings, 33)
    process, _ = start_stand_in(tmp_path, job, lambda p: {
        "pid": 2 ** 22 + 1, "start": 1, "pgid": p.pid, "started": 1.0})
    assert job.status().detail == "the job's runner process vanished (killed?)"
    job.cancel()
    assert process.wait(timeout=5) == -signal.SIGKILL


# -- one bad record fails only its own job ----------------------------------------------

@pytest.mark.parametrize("content, reason", [
    ('{"exit_code": null, "signal": 999, "stopped": null, "started": 1.0}',
     "signal 999 is not a signal"),
    ("garbage", "not JSON"),
    ('["exit_code", 0]', "not a JSON object"),
    ('{"exit_code": null, "signal": null, "stopped": null, "started": 1.0}',
     "neither an exit code nor a signal"),
    ('{"exit_code": "0", "signal": null, "stopped": null, "started": 1.0}', "exit_code is '0'"),
    ('{"exit_code": 0, "signal": null, "stopped": "eaten", "started": 1.0}',
     "stopped is 'eaten'"),
    ('{"exit_code": 0, "signal": null, "stopped": null, "started": "today"}',
     "started is 'today'"),
])
def test_an_invalid_result_record_fails_only_its_own_job(agent_settings, content, reason):
    good, bad = Local(agent_settings, 40), Local(agent_settings, 41)
    ids = submit_job(good, {"script": "true"}), submit_job(bad, {"script": "true"})
    wait_for_state(good, S.COMPLETED)
    wait_for_state(bad, S.COMPLETED)
    Path(bad.control_dir(), "result.json").write_text(content)
    states = Local.status_many(agent_settings, [(40, ids[0]), (41, ids[1])])
    assert states[40].status == S.COMPLETED
    assert states[41].status == S.ERROR
    assert states[41].detail == f"the job runner's result record is invalid ({reason})"


@pytest.mark.parametrize("number, detail", [(9, "killed by signal 9 (SIGKILL)"),
                                            (40, "killed by signal 40")])
def test_a_signal_without_a_name_is_still_reported(agent_settings, number, detail):
    job = Local(agent_settings, 42)
    submit_job(job, {"script": "true"})
    wait_for_state(job, S.COMPLETED)
    Path(job.control_dir(), "result.json").write_text(json.dumps(
        {"exit_code": None, "signal": number, "stopped": None, "started": 1.0}))
    assert job.status() == JobState(S.ERROR, detail, 1.0)


def test_a_cancel_kills_a_job_whose_result_file_exists_while_it_runs(agent_settings):
    job = Local(agent_settings, 43)
    submit_job(job, {"script": "sleep 30"})
    wait_for_file(job.control_dir(), "pgid")
    pgid = int(control(job, "pgid"))
    Path(job.control_dir(), "result.json").write_text(
        '{"exit_code": 0, "signal": null, "stopped": null, "started": 1.0}')
    assert job.status().status == S.RUNNING  # the runner runs: its result is not in yet
    job.cancel()
    assert wait_for_state(job, S.CANCELLED).status == S.CANCELLED
    assert not alive(pgid)


def test_a_cancel_after_the_runner_died_with_a_garbage_result_kills_the_job(agent_settings):
    job = Local(agent_settings, 44)
    pid = int(submit_job(job, {"script": "sleep 30"}))
    wait_for_file(job.control_dir(), "pgid")
    pgid = int(control(job, "pgid"))
    os.kill(pid, signal.SIGKILL)
    Path(job.control_dir(), "result.json").write_text("garbage")
    assert wait_for_state(job, S.ERROR).detail.startswith("the job runner's result record")
    assert alive(pgid)
    job.cancel()
    deadline = time.monotonic() + 2
    while alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(pgid)


# -- starting jobs fast, exactly once, and for longer than the agent lives --------------

def test_the_id_is_on_record_when_submit_returns(agent_settings):
    job = Local(agent_settings, 50)
    job_id = submit_job(job, {"script": "sleep 1"})
    assert json.loads(control(job, "runner.json"))["pid"] == int(job_id)
    assert Local.find_submitted(agent_settings, [50, 51]) == {50: job_id}


def runner_without_go(tmp_path, recorded):
    """A runner whose agent died before saying go (after recording it, or not)."""
    control_dir, workdir = tmp_path / "bare" / "control", tmp_path / "bare" / "work"
    control_dir.mkdir(parents=True)
    workdir.mkdir()
    if recorded:
        (control_dir / "runner.json").write_text('{"pid": 1, "start": 1}')
    process = subprocess.Popen(
        ["hpc-runner", "--posix", "-c", runner.RUNNER, "hpc-runner", str(control_dir),
         str(workdir), "0", "0", str(workdir / "out"), str(workdir / "err"), "sleep", "10",
         "/bin/bash", "-c", "touch ran"], executable="/bin/bash", stdin=subprocess.PIPE)
    process.stdin.close()
    assert process.wait(timeout=10) == 0
    assert os.listdir(workdir) == []  # the job never ran
    return control_dir


def test_a_runner_never_told_to_go_runs_nothing_and_leaves_no_trace(tmp_path):
    """The agent died before recording the runner: it will submit the job again,
    so this runner must not run it."""
    assert os.listdir(runner_without_go(tmp_path, recorded=False)) == []


def test_a_recorded_runner_never_told_to_go_says_the_job_never_ran(tmp_path, agent_settings):
    control_dir = runner_without_go(tmp_path, recorded=True)
    result = json.loads((control_dir / "result.json").read_text())
    job = Local(agent_settings, 55)
    os.makedirs(job.control_dir())
    Path(job.control_dir(), "result.json").write_text(json.dumps(result))
    assert job.status() == JobState(
        S.ERROR, "the job never ran: the agent stopped while starting it; submit it again")


def test_a_runner_its_dead_agent_never_told_to_go_is_submitted_again(agent_settings):
    # The agent recorded the runner, then died (killed, or stopped by a
    # takeover) before saying go: the runner exits saying the job never ran.
    # A restarted agent asked whether the job was submitted must say no, so
    # that it submits it again; it said yes and the job ended as an ERROR
    # that had run zero times.
    job = Local(agent_settings, 60)
    job.prepare_working_directory()
    control_dir = job.new_control_dir()
    workdir = job.get_working_directory()
    process = subprocess.Popen(
        ["hpc-runner", "--posix", "-c", runner.RUNNER, "hpc-runner", control_dir, workdir,
         "0", "0", os.path.join(workdir, "out"), os.path.join(workdir, "err"), "sleep", "10",
         "/bin/bash", "-c", "echo ran >> ran"],
        executable="/bin/bash", stdin=subprocess.PIPE, cwd=control_dir,
        start_new_session=True)
    Path(control_dir, "runner.json").write_text(json.dumps(
        {"pid": process.pid, "start": runner.process_start_time(process.pid)}))
    process.stdin.close()  # the agent is gone
    assert Local.find_submitted(agent_settings, [60]) == {}
    process.wait(timeout=10)
    submit_job(job, {"script": "echo ran >> ran"})
    assert wait_for_state(job, S.COMPLETED).status == S.COMPLETED
    assert read(job, "ran") == "ran\n"


def test_a_runner_that_was_told_to_go_is_found_however_short_its_job(agent_settings):
    job = Local(agent_settings, 61)
    job_id = submit_job(job, {"script": "true"})
    assert wait_for_state(job, S.COMPLETED).status == S.COMPLETED
    assert Local.find_submitted(agent_settings, [61]) == {61: job_id}


def test_the_runner_and_the_job_have_sessions_and_groups_of_their_own(agent_settings):
    job = Local(agent_settings, 52)
    pid = int(submit_job(job, {"script": "sleep 30"}))
    wait_for_file(job.control_dir(), "pgid")
    pgid = int(control(job, "pgid"))
    assert os.getsid(pid) == pid != os.getsid(0)
    assert os.getpgid(pgid) == pgid != pid


def test_a_job_outlives_the_process_that_started_it(agent_settings):
    code = (f"from hpc_agent.config import AgentSettings\n"
            f"from hpc_agent.schedulers.base import submit_job\n"
            f"from hpc_agent.schedulers.local import Local\n"
            f"settings = AgentSettings({agent_settings.BASE_DIR!r}, "
            f"{{'HPC_JOB_WORKING_DIRECTORY': {agent_settings.HPC_JOB_WORKING_DIRECTORY!r}}})\n"
            f"print(submit_job(Local(settings, 53), {{'script': 'sleep 0.5; echo survived'}}))\n")
    started = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
    job = Local(agent_settings, 53, started.stdout.strip())
    assert wait_for_state(job, S.COMPLETED).status == S.COMPLETED
    assert read(job, "hpc-job.out") == "survived\n"


def test_the_job_gets_the_agents_environment_and_nothing_of_the_runners(agent_settings,
                                                                       monkeypatch, tmp_path):
    bash_env = tmp_path / "bash_env.sh"
    bash_env.write_text('echo sourced >> "$HPC_JOB_WORKING_DIRECTORY/bash_env.txt"\n')
    monkeypatch.setenv("FROM_AGENT", "yes")
    monkeypatch.setenv("BASH_ENV", str(bash_env))
    job = Local(agent_settings, 54)
    submit_job(job, {"script": "env -0 > env.bin; shopt -qo posix && echo posix > mode.txt"
                               " || echo normal > mode.txt", "environment": {"EXTRA": "1"}})
    assert wait_for_state(job, S.COMPLETED).status == S.COMPLETED
    env = dict(item.split("=", 1) for item in
               Path(job.get_working_directory(), "env.bin").read_text().split("\0") if item)
    assert (env["FROM_AGENT"], env["EXTRA"]) == ("yes", "1")
    assert env["HPC_JOB_WORKING_DIRECTORY"] == job.get_working_directory()
    assert not [name for name in env if name.lower().startswith("_hpc")]
    assert read(job, "mode.txt") == "normal\n"
    # BASH_ENV is the job's, as before: its bash reads it, the runner does not.
    assert read(job, "bash_env.txt") == "sourced\n"


# -- who may read a job's files -----------------------------------------------------------

def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    def set_umask(value):
        previous.append(os.umask(value))
    previous = []
    yield set_umask
    for value in previous[:1]:
        os.umask(value)


def test_job_directories_are_private_by_default(agent_settings, umask):
    umask(0o022)
    job = Local(agent_settings, 60)
    submit_job(job, {"script": "true"})
    assert mode_of(job.get_working_directory()) == 0o700
    assert mode_of(agent_settings.HPC_JOB_WORKING_DIRECTORY) == 0o700
    assert mode_of(job.control_dir()) == 0o700
    assert mode_of(agent_settings.HPC_CONTROL_DIRECTORY) == 0o700


def test_a_site_can_share_job_directories_with_its_group(tmp_path, umask):
    umask(0o077)
    settings = AgentSettings(str(tmp_path), {"HPC_JOB_WORKING_DIRECTORY": str(tmp_path / "jobs"),
                                             "HPC_JOB_DIRECTORY_MODE": 0o750})
    job = Local(settings, 61)
    try:
        submit_job(job, {"script": "true"})
        assert mode_of(job.get_working_directory()) == 0o750
        assert mode_of(settings.HPC_JOB_WORKING_DIRECTORY) == 0o750
        assert mode_of(job.control_dir()) == 0o700  # the agent's files stay its own
    finally:
        wait_for_state(job, S.COMPLETED)


@pytest.mark.parametrize("mode", [0o777, 0o757, 0o600, "0700", 0o1700, True])
def test_unusable_or_world_writable_directory_modes_are_refused(tmp_path, mode):
    with pytest.raises(ValueError, match="HPC_JOB_DIRECTORY_MODE"):
        AgentSettings(str(tmp_path), {"HPC_JOB_DIRECTORY_MODE": mode})


def test_the_local_submit_benchmark_runs():
    """bench/local_submit.py at a small size, so it keeps working (not a timing)."""
    bench = Path(__file__).resolve().parents[3] / "bench" / "local_submit.py"
    out = subprocess.run([sys.executable, str(bench), "--jobs", "3"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert [line.split(":")[0] for line in out.splitlines()] == [
        "local_submit", "local_submit_each", "local_all_finished"]
    assert "still running" not in out


def session_members(sid):
    """Live processes of a session (a runner's session id is its pid)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != b"Z":
                members.append(int(entry))
    return members


@pytest.mark.parametrize("script, wanted", [
    ("sleep 30 & echo started", S.COMPLETED),  # a background child outliving the script
    ("sleep 30", S.CANCELLED),
])
def test_the_runner_leaves_no_process_behind(agent_settings, script, wanted):
    """Nor its walltime and grace timers: nothing is left of its session."""
    job = Local(agent_settings, 56)
    pid = int(submit_job(job, {"script": script, "walltime_seconds": 60}))
    wait_for_file(job.control_dir(), "pgid")
    if wanted == S.CANCELLED:
        job.cancel()
    assert wait_for_state(job, wanted).status == wanted
    deadline = time.monotonic() + 2
    while session_members(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session_members(pid) == []


def test_a_stopped_job_is_not_an_ended_one(agent_settings):
    job = Local(agent_settings, 57)
    submit_job(job, {"script": "sleep 0.5; echo done"})
    wait_for_file(job.control_dir(), "pgid")
    pgid = int(control(job, "pgid"))
    os.killpg(pgid, signal.SIGSTOP)
    time.sleep(0.3)  # a stop the runner must not take for an end
    assert job.status().status == S.RUNNING
    os.killpg(pgid, signal.SIGCONT)
    assert wait_for_state(job, S.COMPLETED).status == S.COMPLETED
    assert read(job, "hpc-job.out") == "done\n"


def test_a_stopped_job_is_cancelled_at_once(agent_settings):
    job = Local(agent_settings, 58)
    submit_job(job, {"script": "sleep 30"})
    wait_for_file(job.control_dir(), "pgid")
    os.killpg(int(control(job, "pgid")), signal.SIGSTOP)
    job.cancel()
    assert wait_for_state(job, S.CANCELLED).status == S.CANCELLED
