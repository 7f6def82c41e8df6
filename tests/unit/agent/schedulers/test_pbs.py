"""PBS Pro and Torque against outputs written from their documented formats.

No PBS server can run where this project is tested: the answers come from
tests/data/schedulers/pbs, written by hand from the vendors' reference guides
(see its README), not recorded from a real server.
"""

import json
from pathlib import Path

import pytest

from hpc_agent.config import AgentSettings
from hpc_agent.schedulers.base import InvalidParameters, JobSpec, JobState, SchedulerError
from hpc_agent.schedulers.pbs import PBS, Torque, parse_text
from hpc_agent.status import JobStatus as S
from scheduler_fakes import scripted

DATA = Path(__file__).resolve().parents[3] / "data" / "schedulers" / "pbs"
JSON = (DATA / "qstat_json.txt").read_text()
TEXT = (DATA / "qstat_text.txt").read_text()
TORQUE = (DATA / "torque_qstat.txt").read_text()


@pytest.fixture
def settings(tmp_path):
    return AgentSettings(tmp_path, {"HPC_JOB_WORKING_DIRECTORY": str(tmp_path / "jobs")})


@pytest.fixture
def pbs():
    return scripted(PBS)


@pytest.fixture
def torque():
    return scripted(Torque)


def arguments(cls, settings, **parameters):
    return cls(settings, 1).submit_arguments(JobSpec.from_parameters({"script": "x", **parameters}))


def test_pbs_pro_submission(pbs, settings):
    pbs.answers["qsub"] = "108[].pbs01\n"
    assert pbs(settings, 3).submit({
        "script": "true", "nodes": 2, "tasks": 4, "cpus_per_task": 2, "memory_mb": 2048,
        "walltime_seconds": 3725, "queue": "workq", "account": "proj",
        "array": "0-6:2%2"}) == "108[].pbs01"
    workdir = settings.HPC_JOB_WORKING_DIRECTORY + "/3"
    assert pbs.calls == [[
        "qsub", "-N", "hpc-3", "-S", "/bin/bash",
        "-o", f"{workdir}/hpc-job-^array_index^.out", "-e", f"{workdir}/hpc-job-^array_index^.err",
        "-l", "select=2:ncpus=4:mpiprocs=2:mem=2048mb", "-l", "place=scatter",
        "-l", "walltime=01:02:05", "-q", "workq", "-A", "proj", "-J", "0-6:2%2",
        f"{settings.HPC_CONTROL_DIRECTORY}/3/job.sh"]]


def test_torque_submission(torque, settings):
    args = arguments(torque, settings, nodes=2, tasks=2, cpus_per_task=3, memory_mb=100,
                     array="1-9:4%2")
    assert args[args.index("-l"):] == ["-l", "nodes=2:ppn=3", "-l", "mem=200mb",
                                       "-t", "1,5,9%2"]
    assert "-o" in args and args[args.index("-o") + 1].endswith("/hpc-job.out")


@pytest.mark.parametrize("parameters, message", [
    ({"nodes": 2, "tasks": 3}, r"'tasks' \(3\) must be a multiple of 'nodes' \(2\)"),
    ({"array": "1,2,5"}, r"'array' '1,2,5' cannot be expressed for PBS"),
])
def test_what_pbs_cannot_express_is_refused(pbs, settings, parameters, message):
    with pytest.raises(InvalidParameters, match=message):
        arguments(pbs, settings, **parameters)


def test_a_colon_in_the_job_directory_is_refused(pbs, tmp_path):
    odd = AgentSettings(tmp_path, {"HPC_JOB_WORKING_DIRECTORY": str(tmp_path / "a:b")})
    with pytest.raises(InvalidParameters, match="host:path"):
        arguments(pbs, odd)


def test_one_qstat_json_gives_every_state(pbs, settings):
    pbs.answers["qstat"] = JSON
    jobs = [(601, "100.pbs01"), (602, "101.pbs01"), (603, "102.pbs01"), (604, "103.pbs01"),
            (605, "104.pbs01"), (606, "105.pbs01"), (607, "106.pbs01"), (608, "107.pbs01"),
            (609, "108[].pbs01"), (610, "109.pbs01"), (611, "110.pbs01")]
    states = pbs.status_many(settings, jobs)
    assert {ui: (s.status, s.detail) for ui, s in states.items()} == {
        601: (S.QUEUED, ""),
        602: (S.QUEUED, "held"),
        603: (S.RUNNING, ""),
        604: (S.COMPLETED, ""),
        605: (S.ERROR, "exit code 3"),
        606: (S.WALL_TIME_EXCEEDED, "walltime exceeded"),
        607: (S.ERROR, "killed by signal 15"),
        608: (S.CANCELLED, "deleted before it started"),
        609: (S.RUNNING, "array: 1 COMPLETED, 1 FAILED (exit code 2: 1), 1 RUNNING, 1 QUEUED"),
        610: (S.OUT_OF_MEMORY, "memory limit exceeded"),
    }
    assert states[604].started is not None
    assert pbs.calls == [["qstat", "-f", "-x", "-t", "-F", "json", *(j for _, j in jobs)]]


def test_a_signal_after_our_cancel_is_a_cancellation(pbs, settings):
    pbs.answers.update({"qstat": JSON, "qdel": ""})
    pbs(settings, 607, "106.pbs01").cancel()
    assert pbs.status_many(settings, [(607, "106.pbs01")])[607].status == S.CANCELLED


def test_unknown_ids_are_undecided_but_a_server_failure_raises(pbs, settings):
    pbs.answers["qstat"] = (153, "{}", "qstat: Unknown Job Id 110.pbs01\n")
    assert pbs.status_many(settings, [(611, "110.pbs01")]) == {}
    pbs.answers["qstat"] = (1, "", "Connection refused\nqstat: cannot connect to server pbs01\n")
    with pytest.raises(SchedulerError, match="cannot connect"):
        pbs.status_many(settings, [(611, "110.pbs01")])


def test_json_that_does_not_parse_is_asked_again_as_text(pbs, settings):
    broken = JSON.replace('"PBS_O_HOME": "/home/hpcuser"', '"PBS_O_HOME": "/home/"hpc"user"')
    with pytest.raises(ValueError):
        json.loads(broken)
    pbs.answers["qstat"] = lambda argv: broken if "json" in argv else TEXT
    states = pbs.status_many(settings, [(605, "104.pbs01")])
    assert states[605] == JobState(S.ERROR, "exit code 3", states[605].started)
    assert [("-F" in argv) for argv in pbs.calls] == [True, False]
    assert pbs.json_output  # only this time


def test_a_qstat_without_json_is_remembered(pbs, settings):
    pbs.answers["qstat"] = lambda argv: (
        (2, "", "qstat: invalid option -- 'F'\nusage: ...\n") if "-F" in argv else TEXT)
    assert pbs.status_many(settings, [(605, "104.pbs01")])[605].detail == "exit code 3"
    pbs.calls.clear()
    pbs.status_many(settings, [(605, "104.pbs01")])
    assert pbs.calls == [["qstat", "-f", "-x", "-t", "104.pbs01"]]


def test_the_text_format_joins_continued_values():
    jobs = parse_text(TEXT)
    assert jobs["104.pbs01"]["variable_list"].endswith("PBS_O_QUEUE=workq,PBS_O_HOST=login01")
    assert jobs["104.pbs01"]["submit_arguments"].startswith("-N hpc-605.fail -S /bin/bash -o ")
    assert jobs["106.pbs01"]["exit_status"] == "271"


def test_torque_completed_jobs_and_subjobs(torque, settings):
    torque.answers["qstat"] = TORQUE
    states = torque.status_many(settings, [(701, "200.torque01"), (702, "201.torque01"),
                                           (703, "202.torque01"), (704, "203[].torque01")])
    assert {ui: (s.status, s.detail) for ui, s in states.items()} == {
        701: (S.COMPLETED, ""),
        702: (S.WALL_TIME_EXCEEDED, "walltime exceeded"),
        703: (S.RUNNING, ""),
        704: (S.ERROR, "array: 1 COMPLETED, 1 FAILED (exit code 1: 2)"),
    }
    # Torque's -x means XML, and it has no JSON.
    assert torque.calls == [["qstat", "-f", "-t", "200.torque01", "201.torque01",
                             "202.torque01", "203[].torque01"]]


def test_find_submitted_selects_the_users_jobs_then_reads_their_names(pbs, settings):
    pbs.answers.update({"qselect": "100.pbs01\n104.pbs01\n108[].pbs01\n", "qstat": JSON})
    assert pbs.find_submitted(settings, [601, 605, 609, 699]) == {
        601: "100.pbs01", 605: "104.pbs01", 609: "108[].pbs01"}
    assert pbs.calls[0][:3] == ["qselect", "-x", "-u"]


def test_cancel_tolerates_finished_jobs(pbs, settings):
    pbs.answers["qdel"] = (35, "", "qdel: Job has finished 103.pbs01\n")
    pbs(settings, 604, "103.pbs01").cancel()
    pbs.answers["qdel"] = (1, "", "qdel: cannot connect to server pbs01 (errno=111)\n")
    with pytest.raises(SchedulerError, match="cannot connect"):
        pbs(settings, 604, "103.pbs01").cancel()
