"""Scheduler code written for the seed (django_hpc_job_controller) runs in the agent:
its module names, its Scheduler contract, its templates (hpc_agent.seedcompat,
hpc_agent.schedulers).  The portal under test is tests/seedportal/cluster."""

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import kill_agent
from hpc_agent.config import AgentSettings
from hpc_agent.schedulers import local as local_module
from hpc_agent.schedulers import slurm as slurm_module
from hpc_agent.schedulers.base import (
    InvalidParameters, JobState, Scheduler, SchedulerError, SubmissionFailed, job_state,
    submit_job)
from hpc_agent.status import TERMINAL
from hpc_agent.status import JobStatus as S
from scheduler_fakes import scripted
from seedportal.cluster import install

#: The seed's client/scheduler/status.py, name by name.
SEED_STATUSES = {"DRAFT": 0, "PENDING": 10, "SUBMITTING": 20, "SUBMITTED": 30, "QUEUED": 40,
                 "RUNNING": 50, "CANCELLING": 60, "CANCELLED": 70, "DELETING": 80,
                 "DELETED": 90, "ERROR": 400, "WALL_TIME_EXCEEDED": 401, "OUT_OF_MEMORY": 402,
                 "COMPLETED": 500}


def agent(tmp_path, scheduler_class="hpc_agent.schedulers.local.Local", portal=None, **more):
    """An agent directory's settings, with the seed-style portal installed if asked."""
    if portal:
        scheduler_class = install(tmp_path, portal)
    return AgentSettings(str(tmp_path), {"HPC_SCHEDULER_CLASS": scheduler_class,
                                         "HPC_JOB_WORKING_DIRECTORY": str(tmp_path / "jobs"),
                                         **more})


@pytest.fixture(autouse=True)
def no_job_left(tmp_path):
    yield
    kill_agent(str(tmp_path))


def wait_until_ended(job, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        state = job.status()
        state = job_state(state) if not isinstance(state, JobState) else state
        if state.status in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


# -- the seed's module names ------------------------------------------------------

def test_the_seeds_module_names_resolve_once_the_scheduler_class_is_loaded(tmp_path):
    agent(tmp_path, "scheduler.local.Local").scheduler_class()
    from scheduler.local import Local
    from scheduler.scheduler import Scheduler as SeedScheduler
    from scheduler.slurm import Slurm
    from scheduler.status import JobStatus

    assert SeedScheduler is Scheduler
    assert issubclass(Local, local_module.Local) and issubclass(Slurm, slurm_module.Slurm)
    assert (Local.local_template, Slurm.slurm_template) == (
        "settings/local.sh.template", "settings/slurm.sh.template")
    assert repr(Slurm) == "<class 'scheduler.slurm.Slurm'>"
    assert JobStatus is S
    # The seed's modules imported these next to their classes.
    assert importlib.import_module("scheduler.slurm").JobStatus is S


def test_job_status_has_the_seeds_names_and_numbers_and_acts_as_an_int(tmp_path):
    agent(tmp_path).scheduler_class()
    from scheduler.status import JobStatus

    assert {name: getattr(JobStatus, name) for name in SEED_STATUSES} == SEED_STATUSES
    assert JobStatus.RUNNING > JobStatus.QUEUED and JobStatus.ERROR + 0 == 400
    assert json.dumps([JobStatus.COMPLETED]) == "[500]"


@pytest.mark.parametrize("dotted, expected", [
    ("scheduler.local.Local", "scheduler.local.Local"),
    ("scheduler.slurm.Slurm", "scheduler.slurm.Slurm"),
    ("hpc_agent.schedulers.slurm.Slurm", "hpc_agent.schedulers.slurm.Slurm"),
])
def test_the_scheduler_class_setting_takes_the_seeds_values(tmp_path, dotted, expected):
    cls = agent(tmp_path, dotted).scheduler_class()
    assert f"{cls.__module__}.{cls.__qualname__}" == expected


def test_a_sites_scheduler_file_in_a_settings_directory_is_found(tmp_path):
    """As the seed's settings named it: settings.<file>.<class>, with a settings.py
    of the agent's own next to the settings/ package."""
    settings = agent(tmp_path, portal="slurm")
    (tmp_path / "settings.py").write_text("HPC_JOB_TAG_PREFIX = 'x'\n")
    cls = settings.scheduler_class()
    assert cls.__name__ == "PortalSlurm" and issubclass(cls, slurm_module.Slurm)
    assert cls.__module__ == "settings.portal_slurm"


def test_a_settings_directory_without_init_is_found_too(tmp_path):
    (tmp_path / "settings").mkdir()
    (tmp_path / "settings" / "mine.py").write_text(
        "from scheduler.local import Local\n\nclass Mine(Local):\n    pass\n")
    (tmp_path / "settings.py").write_text("HPC_JOB_TAG_PREFIX = 'x'\n")
    cls = agent(tmp_path, "settings.mine.Mine").scheduler_class()
    assert cls.__name__ == "Mine"


def test_a_file_next_to_the_agents_settings_is_found(tmp_path):
    (tmp_path / "site_sched_next_to_settings.py").write_text(
        "from scheduler.slurm import Slurm\n\nclass SiteSlurm(Slurm):\n    pass\n")
    cls = agent(tmp_path, "site_sched_next_to_settings.SiteSlurm").scheduler_class()
    assert cls.__name__ == "SiteSlurm"


@pytest.mark.parametrize("dotted, message", [
    ("nosuchmodule.Thing", "cannot import 'nosuchmodule'"),
    ("hpc_agent.config.AgentSettings", "has no scheduler class 'AgentSettings'"),
    ("Local", "dotted path"),
])
def test_a_wrong_scheduler_class_is_refused_saying_what_is_wrong(tmp_path, dotted, message):
    with pytest.raises(ValueError, match=message):
        agent(tmp_path, dotted).scheduler_class()


def test_no_package_named_scheduler_or_settings_is_installed():
    """The names exist only inside an agent that installed them."""
    code = ("import importlib.util, sys\n"
            "print([n for n in ('scheduler', 'settings') if importlib.util.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", check=True)
    assert out.stdout.strip() == "[]"


# -- the Scheduler contract ---------------------------------------------------------

class Recording(Scheduler):
    """A seed-style direct subclass of the base class."""

    returns = "42"
    seen = None

    def submit(self, job_parameters):
        Recording.seen = (job_parameters, os.path.isdir(self.get_working_directory()))
        return self.returns


def test_submit_gets_the_parameters_as_the_portal_passed_them_in_a_prepared_directory(tmp_path):
    settings = agent(tmp_path)
    parameters = '{"b": 1,   "a": "x"}'
    assert submit_job(Recording(settings, 3, None), parameters) == "42"
    assert Recording.seen == (parameters, True)


@pytest.mark.parametrize("returned", [None, "", False])
def test_no_id_from_submit_means_the_submission_failed(tmp_path, returned):
    job = Recording(agent(tmp_path), 3, None)
    job.returns = returned
    with pytest.raises(SubmissionFailed, match="Recording returned no job id"):
        submit_job(job, {})


def test_an_integer_id_becomes_a_string(tmp_path):
    job = Recording(agent(tmp_path), 3, None)
    job.returns = 1234
    assert submit_job(job, {}) == "1234"


@pytest.mark.parametrize("value, expected", [
    (JobState(S.RUNNING, "x"), JobState(S.RUNNING, "x")),
    ((S.RUNNING, "Job is running"), JobState(S.RUNNING, "Job is running")),
    ((500, None), JobState(S.COMPLETED, "")),
    (S.QUEUED, JobState(S.QUEUED)),
    ((None, None), None),
    (None, None),
])
def test_status_may_answer_in_the_seeds_shape(value, expected):
    assert job_state(value) == expected


@pytest.mark.parametrize("value", ["RUNNING", (999, "x"), (S.RUNNING, "a", "b"), (True, "")])
def test_a_status_answer_of_no_known_shape_is_an_error_naming_it(value):
    state = job_state(value, "Site.status()")
    assert state.status == S.ERROR and state.detail.startswith(f"Site.status() returned {value!r}")


def test_a_job_state_unpacks_as_the_seeds_pair():
    status, info = JobState(S.ERROR, "exit code 3", 12.0)
    assert (status, info) == (S.ERROR, "exit code 3")


def test_the_file_send_hooks_have_the_seeds_signatures_and_defaults(tmp_path):
    job = Scheduler(agent(tmp_path), 3, None)
    assert job.file_send_start("out/a.txt", {"archive": True}) == ("out/a.txt", False)
    assert job.file_send_start("out/a.txt") == ("out/a.txt", False)
    assert job.file_send_end("out/a.txt", {"archive": True}) is None


# -- status: a subclass's own status() wins over the batch poll ---------------------

def test_a_status_override_is_asked_job_by_job_instead_of_the_batch_poll(tmp_path):
    fake = scripted(slurm_module.Slurm)

    class Site(fake):
        def status(self):
            if self.ui_id == 2:
                raise RuntimeError("sacct exploded")
            return (S.QUEUED, f"waiting {self.job_id}") if self.ui_id == 1 else (None, None)

    states = Site.status_many(agent(tmp_path), [(1, "11"), (2, "12"), (3, "13")])
    assert states == {1: JobState(S.QUEUED, "waiting 11")}  # 2 failed, 3 undecided
    assert fake.calls == []  # no squeue: the batch poll was not used


def test_a_status_override_may_call_the_built_in_status(tmp_path):
    fake = scripted(slurm_module.Slurm)
    fake.answers["squeue"] = "11|N/A|RUNNING|0|None|2026-11-25T14:51:25|hpc-1\n"

    class Site(fake):
        def status(self):
            status, info = super().status()
            return status, f"site: {info or 'fine'}"

    assert Site.status_many(agent(tmp_path), [(1, "11")]) == {1: JobState(S.RUNNING,
                                                                          "site: fine")}
    assert [argv[0] for argv in fake.calls] == ["squeue"]


def test_without_an_override_the_batch_poll_is_used(tmp_path):
    fake = scripted(slurm_module.Slurm)
    fake.answers["squeue"] = ("11|N/A|RUNNING|0|None|2026-11-25T14:51:25|hpc-1\n"
                              "12|N/A|PENDING|0|Priority|N/A|hpc-2\n")
    states = fake.status_many(agent(tmp_path), [(1, "11"), (2, "12")])
    assert {k: v.status for k, v in states.items()} == {1: S.RUNNING, 2: S.QUEUED}
    assert [argv[0] for argv in fake.calls] == ["squeue"]


# -- the seed's Local, with the portal's template -----------------------------------

def test_a_seed_style_local_job_runs_from_its_template(tmp_path):
    settings = agent(tmp_path, portal="local")
    cls = settings.scheduler_class()
    job = cls(settings, 7, None)
    os.makedirs(job.get_working_directory())
    Path(job.get_working_directory(), "left.over").write_text("from an earlier attempt")
    parameters = '{"name": "portal test",   "value": 3}'
    job_id = submit_job(job, parameters)
    assert job_id.isdigit()

    job = cls(settings, 7, job_id)
    state = job_state(wait_until_ended(job))
    assert state == JobState(S.COMPLETED, "portal job finished", state.started)
    workdir = Path(job.get_working_directory())
    # Emptied first; the job's output under the seed's names; no agent files.
    assert sorted(os.listdir(workdir)) == ["log.err", "log.out", "parameters.json",
                                           "result.txt"]
    assert (workdir / "parameters.json").read_text() == parameters
    assert (workdir / "result.txt").read_text() == parameters
    assert (workdir / "log.out").read_text() == "portal job 7\n"
    assert (workdir / "log.err").read_text() == "100% done\n"
    script = Path(job.get_local_script_file_path())
    assert script.parent == Path(settings.HPC_CONTROL_DIRECTORY, "7")
    assert "# Job 7 of the seed-style test portal" in script.read_text()
    assert cls.status_many(settings, [(7, job_id)])[7].detail == "portal job finished"


def test_the_seeds_local_ignores_what_its_submit_hook_returns(tmp_path):
    settings = agent(tmp_path, portal="local")
    base = settings.scheduler_class()

    class Noisy(base):
        def submit(self, job_parameters):
            super().submit(job_parameters)
            return "not-an-id"

    job_id = submit_job(Noisy(settings, 8, None), "{}")
    record = json.loads(Path(settings.HPC_CONTROL_DIRECTORY, "8", "runner.json").read_text())
    assert job_id == str(record["pid"])


def test_a_missing_template_is_refused_naming_its_path(tmp_path):
    from hpc_agent.seedcompat import Local

    with pytest.raises(InvalidParameters, match="settings/local.sh.template cannot be read"):
        submit_job(Local(agent(tmp_path), 9, None), "{}")


def test_a_template_key_the_class_does_not_give_is_named(tmp_path):
    (tmp_path / "t.sh").write_text("echo %(ui_job_id)s %(where)s\n")

    class Site(local_module.Local):
        local_template = "t.sh"

    with pytest.raises(InvalidParameters, match=r"uses %\(where\)s"):
        submit_job(Site(agent(tmp_path), 9, None), "{}")


# -- the seed's Slurm, with the portal's template (the real Slurm: tests/integration) --

@pytest.fixture
def portal_slurm(tmp_path):
    settings = agent(tmp_path, portal="slurm")
    fake = scripted(settings.scheduler_class())
    fake.answers["sbatch"] = "77\n"
    return settings, fake


def test_a_seed_style_slurm_job_is_submitted_from_its_template(portal_slurm):
    settings, fake = portal_slurm
    job = fake(settings, 5, None)
    parameters = '{"a": [1, 2]}'
    assert submit_job(job, parameters) == "77"
    script = f"{settings.HPC_CONTROL_DIRECTORY}/5/5.sh"
    # Only the tag on the command line (it wins over the template's name),
    # submitted from the working directory as the seed did with cd.
    assert fake.calls == [["sbatch", "--parsable", "--job-name=hpc-5.portal_5", script]]
    assert fake.cwds == [job.get_working_directory()]
    assert job.get_slurm_script_file_path() == script
    text = Path(script).read_text()
    for line in ("#SBATCH -o slurm-%j.out", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --mem-per-cpu=64M", "#SBATCH --time=01:02:07",
                 "#SBATCH --job-name=portal_5",
                 "# Job 5 of the seed-style test portal, run by Slurm."):
        assert line + "\n" in text
    assert Path(job.get_working_directory(), "parameters.json").read_text() == parameters
    assert os.listdir(job.get_working_directory()) == ["parameters.json"]


def test_the_seeds_template_keys_and_attributes(portal_slurm):
    settings, fake = portal_slurm
    job = fake(settings, 5, None)
    assert job.generate_template_dict() == {
        "nodes": 1, "tasks_per_node": 1, "mem": 64, "wt_hours": 1, "wt_minutes": 2,
        "wt_seconds": 7, "job_name": "portal_5", "ui_job_id": 5,
        "parameter_file": f"{job.get_working_directory()}/parameters.json"}
    plain = slurm_module.Slurm(settings, 6, None)
    assert (plain.nodes, plain.tasks_per_node, plain.memory, plain.walltime,
            plain.job_name) == (1, 1, 100, 60, "hpc-6")


def test_a_refused_seed_style_submission_is_an_error_and_an_outage_may_pass(portal_slurm):
    settings, fake = portal_slurm
    fake.answers["sbatch"] = (1, "", "sbatch: error: Batch job submission failed: "
                                     "Requested node configuration is not available\n")
    with pytest.raises(InvalidParameters, match="node configuration is not available"):
        submit_job(fake(settings, 5, None), "{}")
    fake.answers["sbatch"] = (1, "", "sbatch: error: Unable to contact slurm controller\n")
    with pytest.raises(SchedulerError):
        submit_job(fake(settings, 5, None), "{}")


def test_a_seed_style_submit_returning_none_fails_the_job(portal_slurm):
    settings, fake = portal_slurm

    class Careful(fake):
        def submit(self, job_parameters):
            return None  # as the seed's Slurm did when sbatch failed

    with pytest.raises(SubmissionFailed):
        submit_job(Careful(settings, 5, None), "{}")


def test_the_portals_status_override_is_used_against_squeue(portal_slurm):
    settings, fake = portal_slurm
    fake.answers["squeue"] = "77|N/A|COMPLETED|0|None|2026-11-25T14:51:25|hpc-5.portal_5\n"
    assert fake.status_many(settings, [(5, "77")])[5] == JobState(S.COMPLETED,
                                                                 "portal job finished")


def test_the_plain_seed_slurm_uses_the_seeds_default_template(tmp_path):
    (tmp_path / "settings").mkdir()
    (tmp_path / "settings" / "slurm.sh.template").write_text(
        "#!/bin/bash\n#SBATCH --time=%(wt_hours)02d:%(wt_minutes)02d:%(wt_seconds)02d\nhostname\n")
    settings = agent(tmp_path, "scheduler.slurm.Slurm")
    fake = scripted(settings.scheduler_class())
    fake.answers["sbatch"] = "78\n"
    assert submit_job(fake(settings, 4, None), "anything") == "78"
    assert fake.calls[0][2] == "--job-name=hpc-4"
    assert "#SBATCH --time=00:01:00\n" in Path(fake.calls[0][-1]).read_text()


def test_a_class_with_its_own_submit_entry_point_still_submits(portal_slurm):
    """The seed told sites to override _submit for work before or after submission."""
    settings, fake = portal_slurm

    class OwnEntry(fake):
        def _submit(self, job_parameters):
            os.makedirs(self.get_working_directory(), exist_ok=True)
            return self.submit(job_parameters)

    assert submit_job(OwnEntry(settings, 6, None), "{}") == "77"
    assert os.path.isfile(f"{settings.HPC_CONTROL_DIRECTORY}/6/6.sh")


def test_another_agent_directory_replaces_the_first_on_the_import_path(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for path in (first, second):
        path.mkdir()
        agent(path).scheduler_class()
    assert str(second) in sys.path and str(first) not in sys.path
