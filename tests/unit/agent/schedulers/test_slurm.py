"""Slurm, and the batch scheduler machinery it carries, against recorded outputs.

No daemon runs here: ``run`` is replaced by a script of answers taken from
tests/data/schedulers/slurm (recorded from a real Slurm 22.05; see its README).
"""

import os
from pathlib import Path

import pytest

from hpc_agent.config import AgentSettings
from hpc_agent.schedulers.base import InvalidParameters, JobState, SchedulerError
from hpc_agent.schedulers.batch import (
    BatchScheduler, aggregate, array_indices, as_single_range, compact, parse_array)
from hpc_agent.schedulers.slurm import Slurm, slurm_state
from hpc_agent.status import JobStatus as S
from scheduler_fakes import scripted

DATA = Path(__file__).resolve().parents[3] / "data" / "schedulers" / "slurm"
SQUEUE = (DATA / "squeue.txt").read_text()
SACCT = (DATA / "sacct.txt").read_text()
JOBCOMP = (DATA / "sacct_jobcomp.txt").read_text()
DISABLED = (1, "", "sacct: error: Slurm accounting storage is disabled\n")

# The recorded jobs (tests/data/schedulers/README.md), by their tags' ui ids.
JOBS = {301: "18", 302: "19", 303: "20", 304: "24", 305: "25", 306: "26", 307: "27", 308: "28"}


@pytest.fixture
def settings(tmp_path):
    return AgentSettings(tmp_path, {"HPC_JOB_WORKING_DIRECTORY": str(tmp_path / "jobs")})


@pytest.fixture
def fake():
    """A Slurm whose commands answer from ``answers`` and are logged in ``calls``."""
    fake = scripted(Slurm, key=lambda argv: "sacct -c" if argv[:2] == ["sacct", "-c"]
                    else argv[0])
    fake.programs = classmethod(
        lambda cls: [" ".join(argv[:2]) if argv[1] == "-c" else argv[0] for argv in cls.calls])
    return fake


def test_submit_writes_the_script_and_translates_parameters(fake, settings):
    fake.answers["sbatch"] = "31\n"
    job = fake(settings, 7)
    job_id = job.submit({
        "script": "echo $GREETING\n", "name": "render", "nodes": 2, "tasks": 4,
        "cpus_per_task": 2, "memory_mb": 1500, "walltime_seconds": 61, "queue": "debug",
        "account": "proj", "array": "0-9%2", "environment": {"GREETING": "hi, 'you'"}})
    assert job_id == "31"
    workdir = settings.HPC_JOB_WORKING_DIRECTORY + "/7"
    control = settings.HPC_CONTROL_DIRECTORY + "/7"
    assert fake.calls == [[
        "sbatch", "--parsable", "--job-name=hpc-7.render", f"--chdir={workdir}",
        "--output=hpc-job-%a.out", "--error=hpc-job-%a.err", "--nodes=2", "--ntasks=4",
        "--cpus-per-task=2", "--partition=debug", "--account=proj", "--mem=1500M",
        "--time=2", "--array=0-9%2", f"{control}/job.sh"]]
    script = Path(control, "job.sh").read_text()
    assert script.startswith("#!/bin/bash\n")
    assert "export GREETING='hi, '\"'\"'you'\"'\"''\n" in script
    assert f"cd {workdir} || exit 1\n" in script
    assert script.endswith("echo $GREETING\n")


def test_a_plain_job_writes_plain_output_names(fake, settings):
    fake.answers["sbatch"] = "32;cluster\n"
    assert fake(settings, 8).submit({"script": "true"}) == "32"
    assert "--output=hpc-job.out" in fake.calls[0] and "--job-name=hpc-8" in fake.calls[0]


def test_site_hooks_change_the_script_and_the_options(fake, settings):
    class Site(fake):
        def build_script(self, spec):
            return super().build_script(spec).replace("cd ", "module load x\ncd ", 1)

        def submit_arguments(self, spec):
            return super().submit_arguments(spec) + ["--qos=long"]

    fake.answers["sbatch"] = "33\n"
    Site(settings, 9).submit({"script": "true"})
    assert fake.calls[0][-2] == "--qos=long"
    assert "module load x\ncd " in Path(Site(settings, 9).script_path()).read_text()


def test_refused_parameters_name_the_parameter_and_leave_nothing_on_disk(fake, settings):
    with pytest.raises(InvalidParameters, match="'array' range '5-3' is empty"):
        fake(settings, 10).submit({"script": "true", "array": "5-3"})
    assert not Path(settings.HPC_JOB_WORKING_DIRECTORY).exists()
    assert fake.calls == []


def test_a_scheduler_refusal_is_invalid_parameters_but_an_outage_may_pass(fake, settings):
    fake.answers["sbatch"] = (1, "", "sbatch: error: invalid partition specified: nope\n")
    with pytest.raises(InvalidParameters, match="refused the job: .*invalid partition"):
        fake(settings, 11).submit({"script": "true", "queue": "nope"})
    fake.answers["sbatch"] = (1, "", "sbatch: error: Batch job submission failed: "
                                     "Unable to contact slurm controller (connect failure)\n")
    with pytest.raises(SchedulerError, match="Unable to contact"):
        fake(settings, 11).submit({"script": "true"})


def test_one_poll_is_one_squeue_and_decides_every_recorded_state(fake, settings):
    fake.answers.update({"squeue": SQUEUE, "sacct": SACCT})
    states = fake.status_many(settings, list(JOBS.items()))
    assert states == {
        301: JobState(S.COMPLETED, "", states[301].started),
        302: JobState(S.ERROR, "exit code 3", states[302].started),
        303: JobState(S.ERROR, "array: 3 COMPLETED, 1 FAILED (exit code 3: 2)",
                      states[303].started),
        304: JobState(S.QUEUED, "JobHeldUser"),
        305: JobState(S.QUEUED, "array: 5 QUEUED (JobHeldUser: 1,3,5,7,9)"),
        306: JobState(S.CANCELLED, ""),
        307: JobState(S.WALL_TIME_EXCEEDED, "time limit reached", states[307].started),
        308: JobState(S.RUNNING, "", states[308].started),
    }
    assert states[301].started and states[308].started
    # The ended array is checked in accounting, for elements already purged.
    assert fake.programs() == ["squeue", "sacct"]
    assert fake.calls[1][-1] == "--jobs=20"


def test_a_job_gone_from_squeue_is_looked_up_in_sacct_once_for_all(fake, settings):
    fake.answers.update({"squeue": "", "sacct": SACCT})
    states = fake.status_many(settings, list(JOBS.items()) + [(399, "999")])
    assert states[302] == JobState(S.ERROR, "exit code 3", states[302].started)
    assert states[306] == JobState(S.CANCELLED, "cancelled by uid 1001")
    assert states[303].detail == "array: 3 COMPLETED, 1 FAILED (exit code 3: 2)"
    assert states[305] == JobState(S.QUEUED, "array: 5 QUEUED")
    assert 399 not in states  # in neither: undecided, not guessed
    assert fake.programs() == ["squeue", "sacct"]
    assert fake.calls[1][-1] == "--jobs=" + ",".join(list(JOBS.values()) + ["999"])


def test_squeue_is_fresher_than_a_lagging_accounting(fake, settings):
    lagging = SACCT.replace("19|FAILED|3:0", "19|RUNNING|0:0").replace(
        "20_2|FAILED|3:0", "20_2|RUNNING|0:0")
    fake.answers.update({"squeue": SQUEUE, "sacct": lagging})
    states = fake.status_many(settings, [(303, "20")])
    assert states[303].detail == "array: 3 COMPLETED, 1 FAILED (exit code 3: 2)"


def test_without_slurmdbd_the_completion_file_is_read_and_remembered(fake, settings):
    fake.answers.update({"squeue": "", "sacct": DISABLED, "sacct -c": JOBCOMP})
    states = fake.status_many(settings, [(301, "18"), (302, "19"), (303, "20"), (307, "27")])
    assert states[301].status == S.COMPLETED
    assert states[302].detail == "exit code 3"
    # Elements matched by tag (the file has no indices): counted, not listed.
    assert states[303] == JobState(S.ERROR, "array: 3 COMPLETED, 1 FAILED (exit code 3)",
                                   states[303].started)
    assert states[307].status == S.WALL_TIME_EXCEEDED
    fake.calls.clear()
    fake.status_many(settings, [(301, "18")])
    assert fake.programs() == ["squeue", "sacct -c"]


def test_older_jobs_with_the_same_tag_are_not_counted_from_the_completion_file(fake, settings):
    fake.answers.update({"squeue": "", "sacct": DISABLED, "sacct -c": JOBCOMP})
    states = fake.status_many(settings, [(303, "22")])  # as if 20 and 21 were older
    assert states[303].detail == "array: 1 COMPLETED, 1 FAILED (exit code 3)"


def test_an_unknown_sacct_failure_raises(fake, settings):
    fake.answers.update({"squeue": "", "sacct": (1, "", "sacct: error: Problem talking to "
                                                        "the database: Connection refused\n")})
    with pytest.raises(SchedulerError, match="Problem talking to the database"):
        fake.status_many(settings, [(301, "18")])


def test_status_of_one_job_raises_while_it_cannot_be_decided(fake, settings):
    fake.answers.update({"squeue": SQUEUE, "sacct": ""})
    assert fake(settings, 304, "24").status() == JobState(S.QUEUED, "JobHeldUser")
    with pytest.raises(SchedulerError, match="neither queued nor in accounting"):
        fake(settings, 399, "999").status()


@pytest.mark.parametrize("row, expected", [
    ("40|OUT_OF_MEMORY|0:125", (S.OUT_OF_MEMORY, "out of memory")),
    ("41|NODE_FAIL|0:0", (S.ERROR, "node failure")),
    ("42|PREEMPTED|0:0", (S.ERROR, "preempted")),
    ("43|FAILED|0:9", (S.ERROR, "killed by signal 9")),
    ("44|CANCELLED by 0|0:0", (S.CANCELLED, "cancelled by uid 0")),
    ("45|SUSPENDED|0:0", (S.RUNNING, "suspended")),
    ("46|BOOT_FAIL|0:0", (S.ERROR, "node boot failure")),
    ("47|DEADLINE|0:0", (S.ERROR, "deadline reached")),
])
def test_end_states_map_onto_job_states(fake, settings, row, expected):
    rows = (DATA / "sacct_handwritten.txt").read_text()
    assert row in rows
    fake.answers.update({"squeue": "", "sacct": rows})
    job_id = row.split("|")[0]
    state = fake.status_many(settings, [(1, job_id)])[1]
    assert (state.status, state.detail) == expected


def test_an_unknown_state_leaves_the_job_undecided():
    assert slurm_state("SOMETHING_NEW") is None
    assert slurm_state("PENDING", reason="QOSMaxJobsPerUserLimit") == JobState(
        S.QUEUED, "QOSMaxJobsPerUserLimit")


def test_find_submitted_finds_jobs_by_tag_live_then_in_accounting(fake, settings):
    fake.answers.update({"squeue": SQUEUE, "sacct": SACCT})
    assert fake.find_submitted(settings, [302, 308]) == {302: "19", 308: "28"}
    assert fake.programs() == ["squeue"]
    fake.calls.clear()
    fake.answers["squeue"] = ""
    assert fake.find_submitted(settings, [303, 306, 399]) == {303: "20", 306: "26"}
    assert fake.programs() == ["squeue", "sacct"]
    assert fake.calls[1][-1] == "--starttime=now-30days"


def test_find_submitted_in_the_completion_file_takes_an_arrays_own_id(fake, settings):
    fake.answers.update({"squeue": "", "sacct": DISABLED, "sacct -c": JOBCOMP})
    assert fake.find_submitted(settings, [303, 302]) == {303: "20", 302: "19"}


def test_cancel_tolerates_a_job_that_already_ended(fake, settings):
    fake.answers["scancel"] = (1, "", "scancel: error: Kill job error on job id 18: "
                                      "Job/step already completing or completed\n")
    fake(settings, 301, "18").cancel()
    assert fake.calls == [["scancel", "18"]]
    fake.answers["scancel"] = (1, "", "scancel: error: Unable to contact slurm controller\n")
    with pytest.raises(SchedulerError, match="Unable to contact"):
        fake(settings, 301, "18").cancel()


def test_run_bounds_commands_in_time_and_reports_missing_ones():
    class Quick(BatchScheduler):
        command_timeout = 0.2

    with pytest.raises(SchedulerError, match="sleep did not answer within 0.2 s"):
        Quick.run(["sleep", "5"])
    with pytest.raises(SchedulerError, match="cannot run no-such-command"):
        Quick.run(["no-such-command"])


def test_run_drops_variables_that_would_change_the_output(monkeypatch):
    monkeypatch.setenv("SQUEUE_PARTITION", "other")
    monkeypatch.setenv("KEEP_ME", "1")
    output = Slurm.call(["env"])
    assert "KEEP_ME=1" in output and "SQUEUE_PARTITION" not in output


def test_arrays_fold_into_one_state_with_a_compact_detail():
    ok, failed = JobState(S.COMPLETED), JobState(S.ERROR, "exit code 3")
    elements = [(i, failed if i in (4, 7) else ok) for i in range(10)]
    assert aggregate(elements) == JobState(
        S.ERROR, "array: 8 COMPLETED, 2 FAILED (exit code 3: 4,7)")
    assert aggregate([(0, ok), (1, JobState(S.RUNNING))]).status == S.RUNNING
    assert aggregate([(0, failed), (1, JobState(S.QUEUED))]).status == S.QUEUED
    assert aggregate([(0, ok), (1, JobState(S.CANCELLED))]).status == S.CANCELLED
    assert aggregate([(0, JobState(S.WALL_TIME_EXCEEDED)), (1, JobState(S.CANCELLED))]
                     ).status == S.WALL_TIME_EXCEEDED
    assert aggregate([(0, ok), (1, ok)]) == JobState(S.COMPLETED, "array: 2 COMPLETED")


def test_array_syntax_helpers():
    assert parse_array("1-99:2%3") == ([(1, 99, 2)], 3)
    assert parse_array("[1,3,5-7]") == ([(1, 1, 1), (3, 3, 1), (5, 7, 1)], None)
    assert array_indices(parse_array("0-4:2,7")[0]) == [0, 2, 4, 7]
    assert as_single_range([1, 3, 5]) == (1, 5, 2)
    assert as_single_range([1, 2, 5]) is None
    assert compact([9, 1, 2, 3, 7]) == "1-3,7,9"
    with pytest.raises(InvalidParameters, match="more than"):
        array_indices(parse_array("0-1000000")[0])


def test_an_array_waits_until_accounting_knows_every_element(fake, settings):
    """slurmdbd hears of an array's elements one by one: 2 of 4 decide nothing."""
    fake.answers["sbatch"] = "40\n"
    fake(settings, 9).submit({"script": "true", "array": "0-3"})
    fake.answers["squeue"] = ""
    partial = ("40_0|COMPLETED|0:0|2026-11-25T10:00:00|hpc-9\n"
               "40_1|FAILED|3:0|2026-11-25T10:00:00|hpc-9\n")
    fake.answers["sacct"] = partial
    assert fake.status_many(settings, [(9, "40")]) == {}
    fake.answers["sacct"] = partial + ("40_2|COMPLETED|0:0|2026-11-25T10:00:00|hpc-9\n"
                                       "40_3|COMPLETED|0:0|2026-11-25T10:00:00|hpc-9\n")
    state = fake.status_many(settings, [(9, "40")])[9]
    assert state.status == S.ERROR
    assert state.detail == "array: 3 COMPLETED, 1 FAILED (exit code 3: 1)"


def test_an_array_submitted_by_an_agent_before_the_control_directory_is_still_read(
        fake, settings):
    """Its element list sits in <working directory>/.hpc, where that agent put it."""
    legacy = Path(settings.HPC_JOB_WORKING_DIRECTORY, "9", ".hpc")
    legacy.mkdir(parents=True)
    (legacy / "array").write_text("0-3")
    fake.answers["squeue"] = ""
    fake.answers["sacct"] = "40_0|COMPLETED|0:0|2026-11-25T10:00:00|hpc-9\n"
    assert fake.status_many(settings, [(9, "40")]) == {}  # 1 of 4 elements decides nothing


def test_the_agents_files_for_a_job_are_not_in_its_working_directory(fake, settings):
    fake.answers["sbatch"] = "41\n"
    job = fake(settings, 10)
    job.submit({"script": "true", "array": "0-1"})
    assert os.listdir(job.get_working_directory()) == []
    assert sorted(os.listdir(job.control_dir())) == ["array", "job.sh"]
