"""The job parameters every built-in scheduler takes (hpc_agent.schedulers.base.JobSpec)
and where the agent keeps a job's files (Scheduler's directories)."""

import json
import os
from pathlib import Path

import pytest

from hpc_agent.config import AgentSettings
from hpc_agent.schedulers.base import InvalidParameters, JobSpec, Scheduler


@pytest.mark.parametrize("field, good", [
    ("name", "render-1.a_b+c"), ("queue", "debug"), ("account", "proj1"),
    ("array", "0-9:2,11%3"),
])
def test_a_trailing_newline_is_refused_in_every_checked_name(field, good):
    assert getattr(JobSpec.from_parameters({"script": "x", field: good}), field) == good
    for bad in (good + "\n", good + "\r\n", "\n" + good, good + "\nrm -rf /"):
        with pytest.raises(InvalidParameters, match=repr(field)):
            JobSpec.from_parameters({"script": "x", field: bad})


@pytest.mark.parametrize("name", ["PATH\n", "A B", "1X", "X-Y", "", "X\0"])
def test_environment_names_must_be_whole_shell_names(name):
    with pytest.raises(InvalidParameters, match="'environment'"):
        JobSpec.from_parameters({"script": "x", "environment": {name: "v"}})
    assert JobSpec.from_parameters({"script": "x", "environment": {"_OK_1": "v\n"}}
                                   ).environment == {"_OK_1": "v\n"}


@pytest.fixture
def settings(tmp_path):
    return AgentSettings(str(tmp_path), {"HPC_JOB_WORKING_DIRECTORY": str(tmp_path / "jobs")})


def test_the_control_directory_is_outside_the_working_directory(settings, tmp_path):
    job = Scheduler(settings, 12, None)
    assert job.control_dir() == str(tmp_path / "control" / "12")
    assert not job.control_dir().startswith(job.get_working_directory())
    custom = AgentSettings(str(tmp_path), {"HPC_CONTROL_DIRECTORY": "/var/tmp/x"})
    assert Scheduler(custom, 12, None).control_dir() == "/var/tmp/x/12"


def test_a_job_from_before_the_control_directory_keeps_its_old_one(settings):
    job = Scheduler(settings, 13, None)
    legacy = Path(job.get_working_directory(), ".hpc")
    legacy.mkdir(parents=True)
    assert job.control_dir() == str(legacy)
    # A new submission gets the new place, which is read from then on.
    assert job.new_control_dir() == job.own_control_dir() == job.control_dir()


def test_a_new_control_directory_starts_empty(settings):
    job = Scheduler(settings, 14, None)
    Path(job.new_control_dir(), "cancelled").write_text("")
    assert os.listdir(job.new_control_dir()) == []


def test_the_working_directory_is_emptied_only_when_asked(settings):
    job = Scheduler(settings, 15, None)
    Path(job.prepare_working_directory(), "keep").write_text("x")
    assert os.listdir(job.prepare_working_directory()) == ["keep"]
    assert os.listdir(job.prepare_working_directory(empty=True)) == []


def test_a_symlink_where_the_working_directory_goes_is_replaced(settings, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text(json.dumps("keep me"))
    job = Scheduler(settings, 16, None)
    os.makedirs(settings.HPC_JOB_WORKING_DIRECTORY)
    os.symlink(elsewhere, job.get_working_directory())
    path = job.prepare_working_directory(empty=True)
    assert not os.path.islink(path) and os.listdir(path) == []
    assert (elsewhere / "precious").exists()


def test_the_scripted_fake_takes_what_the_real_run_takes():
    import inspect

    from hpc_agent.schedulers.batch import BatchScheduler
    from scheduler_fakes import scripted

    assert inspect.signature(scripted(BatchScheduler).run) == inspect.signature(
        BatchScheduler.run)
