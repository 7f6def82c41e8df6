"""Grid Engine against recorded outputs.

No daemon runs here: ``run`` is replaced by a script of answers taken from
tests/data/schedulers/sge (recorded from a real SoGE 8.1.9; see its README).
"""

import fnmatch
import re
from pathlib import Path

import pytest

from hpc_agent.config import AgentSettings
from hpc_agent.schedulers.base import InvalidParameters, JobSpec, JobState, SchedulerError
from hpc_agent.schedulers.sge import SGE, sge_live_state
from hpc_agent.status import JobStatus as S
from scheduler_fakes import scripted

DATA = Path(__file__).resolve().parents[3] / "data" / "schedulers" / "sge"
QSTAT = (DATA / "qstat.xml").read_text()
EMPTY_QSTAT = re.sub(r"(?s)<job_list.*?</job_list>\s*", "", QSTAT)
ACCOUNTING = (DATA / "qacct.txt").read_text() + (DATA / "qacct_handwritten.txt").read_text()
RECORDS = [block for block in re.split(r"(?m)^(?==+$)", ACCOUNTING) if block.strip()]


def qacct(records):
    """qacct -j: the records of a job number, or of job names matching a pattern."""
    def answer(argv):
        job = argv[2]
        key = "jobnumber" if job.isdigit() else "jobname"
        picked = [r for r in records
                  if fnmatch.fnmatchcase(re.search(rf"^{key}\s+(\S+)", r, re.M)[1], job)]
        if not picked:
            return 1, "", f"error: job {'id' if job.isdigit() else 'name'} {job} not found\n"
        return 0, "".join(picked), ""
    return answer


@pytest.fixture
def settings(tmp_path):
    return AgentSettings(tmp_path, {"HPC_JOB_WORKING_DIRECTORY": str(tmp_path / "jobs")})


@pytest.fixture
def fake():
    fake = scripted(SGE)
    fake.answers.update({"qstat": QSTAT, "qacct": qacct(RECORDS)})
    return fake


def test_submit_translates_parameters(fake, settings):
    fake.answers["qsub"] = "18.1-99:2\n"
    job = fake(settings, 5)
    assert job.submit({"script": "true", "name": "sweep", "walltime_seconds": 90,
                       "memory_mb": 100, "queue": "all.q", "account": "proj",
                       "array": "1-99:2%3"}) == "18.1-99:2"
    workdir = settings.HPC_JOB_WORKING_DIRECTORY + "/5"
    control = settings.HPC_CONTROL_DIRECTORY + "/5"
    assert fake.calls == [[
        "qsub", "-terse", "-N", "hpc-5.sweep", "-wd", workdir, "-o", "hpc-job-$TASK_ID.out",
        "-e", "hpc-job-$TASK_ID.err", "-S", "/bin/bash", "-l", "h_rt=90", "-l", "h_vmem=100M",
        "-q", "all.q", "-A", "proj", "-t", "1-99:2", "-tc", "3", f"{control}/job.sh"]]
    assert Path(control, "job.sh").read_text().endswith("\ntrue\n")


def test_a_list_that_is_one_run_becomes_one_range(fake, settings):
    spec = JobSpec.from_parameters({"script": "x", "array": "1,3,5"})
    assert fake(settings, 5).submit_arguments(spec)[-2:] == ["-t", "1-5:2"]


@pytest.mark.parametrize("parameters, message", [
    ({"array": "0-9"}, r"numbers tasks from 1: use '1-10:1'"),
    ({"array": 4}, r"numbers tasks from 1: use '1-4:1'"),
    ({"array": "1,2,5"}, r"'array' '1,2,5' cannot be expressed for Grid Engine"),
    ({"nodes": 2}, r"'nodes' cannot be honoured by Grid Engine"),
    ({"tasks": 4}, r"4 slots needs a parallel environment"),
])
def test_what_grid_engine_cannot_express_is_refused(fake, settings, parameters, message):
    with pytest.raises(InvalidParameters, match=message):
        fake(settings, 6).submit({"script": "true", **parameters})
    assert fake.calls == []


def test_a_site_parallel_environment_takes_multi_slot_jobs(fake, settings):
    class Site(fake):
        parallel_environment = "smp"

    args = Site(settings, 7).submit_arguments(JobSpec.from_parameters(
        {"script": "x", "tasks": 2, "cpus_per_task": 2, "memory_mb": 1000}))
    assert args[args.index("-pe"):args.index("-pe") + 3] == ["-pe", "smp", "4"]
    assert "h_vmem=250M" in args  # Grid Engine counts memory per slot


def test_live_jobs_in_one_qstat(fake, settings):
    states = fake.status_many(settings, [(410, "25"), (411, "26.1-9:2"), (412, "27.1-4:1"),
                                         (413, "28")])
    assert states == {
        410: JobState(S.QUEUED, "held"),
        411: JobState(S.QUEUED, "array: 5 QUEUED (held: 1,3,5,7,9)"),
        412: JobState(S.RUNNING, "array: 1 RUNNING, 3 QUEUED"),
        413: JobState(S.RUNNING),
    }
    assert fake.calls == [["qstat", "-xml", "-u", fake.calls[0][3]]]


def test_jobs_gone_from_qstat_are_read_from_qacct(fake, settings):
    fake.answers["qstat"] = EMPTY_QSTAT
    jobs = [(401, "16"), (402, "17"), (403, "18.1-4:1"), (404, "19"), (405, "20"),
            (406, "21"), (420, "30"), (421, "31")]
    states = fake.status_many(settings, jobs)
    assert {ui: (s.status, s.detail) for ui, s in states.items()} == {
        401: (S.COMPLETED, ""),
        402: (S.ERROR, "exit code 3"),
        403: (S.ERROR, "array: 3 COMPLETED, 1 FAILED (exit code 3: 2)"),
        404: (S.WALL_TIME_EXCEEDED, "time limit exceeded"),
        405: (S.ERROR, "exit code 1"),
        406: (S.CANCELLED, "deleted while running"),
        420: (S.OUT_OF_MEMORY, "h_vmem limit exceeded"),
        421: (S.ERROR, "Grid Engine could not run the job: opening input/output file "
                       "(failed 26)"),
    }
    assert states[401].started is not None
    assert [argv[0] for argv in fake.calls] == ["qstat"] + ["qacct"] * len(jobs)


def test_a_job_not_yet_in_qacct_is_left_undecided(fake, settings):
    fake.answers["qstat"] = EMPTY_QSTAT
    assert fake.status_many(settings, [(450, "99")]) == {}


def test_an_array_missing_task_records_waits_for_them(fake, settings):
    fake.answers.update({"qstat": EMPTY_QSTAT, "qacct": qacct(
        [r for r in RECORDS if not re.search(r"^taskid\s+4\s*$", r, re.M)])})
    assert fake.status_many(settings, [(403, "18.1-4:1")]) == {}


def test_a_job_deleted_before_it_started_is_cancelled_by_its_marker(fake, settings):
    fake.answers.update({"qstat": QSTAT, "qdel": "hpcuser has deleted job 25\n"})
    fake(settings, 410, "25").cancel()
    fake.answers["qstat"] = EMPTY_QSTAT
    assert fake.status_many(settings, [(410, "25")]) == {
        410: JobState(S.CANCELLED, "deleted before it started")}
    assert fake.calls[0] == ["qdel", "25"]


def test_a_reused_job_number_is_told_apart_by_the_tag(fake, settings):
    fake.answers["qstat"] = EMPTY_QSTAT
    assert fake.status_many(settings, [(999, "16")]) == {}


def test_cancel_tolerates_a_vanished_job_but_not_a_dead_qmaster(fake, settings):
    fake.answers["qdel"] = (1, 'denied: job "99" does not exist\n', "")
    fake(settings, 1, "99.1-3:1").cancel()
    assert fake.calls == [["qdel", "99"]]
    fake.answers["qdel"] = (1, "", "error: commlib error: got select error (Connection refused)\n")
    with pytest.raises(SchedulerError, match="commlib error"):
        fake(settings, 1, "99").cancel()


def test_find_submitted_live_and_in_accounting(fake, settings):
    fake.answers["qstat"] = lambda argv: (
        QSTAT if argv[1] == "-xml" else "job_number: 27\njob-array tasks:            1-4:1\n")
    found = fake.find_submitted(settings, [412, 413, 403, 402, 499])
    assert found == {412: "27.1-4:1", 413: "28", 403: "18.1-4:1", 402: "17"}
    assert ["qacct", "-j", "hpc-402*"] in fake.calls


@pytest.mark.parametrize("code, expected", [
    ("qw", JobState(S.QUEUED)), ("hqw", JobState(S.QUEUED, "held")),
    ("r", JobState(S.RUNNING)), ("t", JobState(S.RUNNING)), ("Rr", JobState(S.RUNNING)),
    ("s", JobState(S.RUNNING, "suspended")), ("S", JobState(S.RUNNING, "suspended")),
    ("dr", JobState(S.RUNNING, "being deleted")),
    ("Eqw", JobState(S.QUEUED, "Grid Engine error state (Eqw): see qstat -j")),
])
def test_qstat_state_codes(code, expected):
    assert sge_live_state(code) == expected


def test_a_job_cancelled_by_an_agent_before_the_control_directory_keeps_its_marker(
        fake, settings):
    """The marker of a job submitted by the previous agent goes where its files are."""
    legacy = Path(settings.HPC_JOB_WORKING_DIRECTORY, "410", ".hpc")
    legacy.mkdir(parents=True)
    fake.answers.update({"qstat": QSTAT, "qdel": "hpcuser has deleted job 25\n"})
    fake(settings, 410, "25").cancel()
    assert (legacy / "cancelled").exists()
    fake.answers["qstat"] = EMPTY_QSTAT
    assert fake.status_many(settings, [(410, "25")]) == {
        410: JobState(S.CANCELLED, "deleted before it started")}
