"""The app's system checks (djangoapp/checks.py), each on a bad setting."""

import io
import os

import pytest
from django.core import checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from djangoapp import checks as hpc_checks


@pytest.fixture
def good(settings, tmp_path):
    """Settings that pass: a private socket directory."""
    os.chmod(tmp_path, 0o700)
    settings.HPC_IPC_UNIX_SOCKET = str(tmp_path / "hpcd.sock")
    return settings


def found(**kwargs):
    return {m.id: m for m in checks.run_checks(**kwargs) if m.id.startswith("hpc.")}


def test_good_settings_pass(good):
    assert found() == {}


@pytest.mark.parametrize("name", ["djangoapp.models.HpcJob", "testjobs.models.LabeledJob",
                                  "testjobs.LabeledJob", "djangoapp.HpcJob"])
def test_job_class_accepts_a_dotted_path_or_app_label_and_model(good, name):
    good.HPC_JOB_CLASS = name
    assert found() == {}
    assert hpc_checks.resolve_job_class(name).__name__ == name.rsplit(".", 1)[1]


def test_job_class_that_cannot_be_imported_is_an_error(good):
    good.HPC_JOB_CLASS = "myapp.models.MyJob"
    message = found()["hpc.E001"]
    assert message.level == checks.ERROR
    assert "'myapp.models.MyJob' cannot be imported" in message.msg
    assert "subclass of djangoapp.models.HpcJob" in message.hint


def test_job_class_that_is_not_a_job_is_an_error(good):
    good.HPC_JOB_CLASS = "djangoapp.models.HpcCluster"
    assert "not djangoapp.models.HpcJob or a subclass" in found()["hpc.E002"].msg


def test_socket_in_a_world_writable_directory_is_an_error(good, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    good.HPC_IPC_UNIX_SOCKET = str(shared / "hpcd.sock")
    message = found()["hpc.E004"]
    assert message.level == checks.ERROR
    assert "writable by other users" in message.msg and "/run/hpcd/hpcd.sock" in message.hint


def test_missing_socket_directory_is_an_error_for_hpcd_and_a_warning_elsewhere(
        good, tmp_path, monkeypatch):
    good.HPC_IPC_UNIX_SOCKET = str(tmp_path / "missing" / "hpcd.sock")
    warning = found()["hpc.W003"]
    assert warning.level == checks.WARNING and "RuntimeDirectory=hpcd" in warning.hint
    monkeypatch.setattr(hpc_checks, "IN_HPCD", True)
    error = found()["hpc.E003"]
    assert error.level == checks.ERROR and "RuntimeDirectory=hpcd" in error.hint


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_sqlite_without_immediate_transactions_is_a_warning(good, tmp_path):
    databases = {alias: dict(db) for alias, db in good.DATABASES.items()}
    databases["other"] = {"ENGINE": "django.db.backends.sqlite3",
                          "NAME": str(tmp_path / "x.sqlite3")}
    good.DATABASES = databases
    message = found()["hpc.W001"]
    assert "database 'other' is SQLite without" in message.msg
    assert "'transaction_mode': 'IMMEDIATE'" in message.hint


def test_unknown_setting_names_are_warnings_with_a_suggestion(good):
    good.HPC_WEBSOCKET_PROT = 8001
    good.HPC_SCHEDULER_CLASS = "hpc_agent.schedulers.slurm.Slurm"
    messages = [m for m in checks.run_checks() if m.id == "hpc.W002"]
    by_name = {m.msg.split()[2].rstrip(":"): m for m in messages}
    assert by_name["HPC_WEBSOCKET_PROT"].hint == "Did you mean HPC_WEBSOCKET_PORT?"
    assert "agent setting" in by_name["HPC_SCHEDULER_CLASS"].hint


def test_manage_py_check_fails_on_an_error(good):
    good.HPC_JOB_CLASS = "nope.Nope"
    with pytest.raises(SystemCheckError, match="hpc.E001"):
        call_command("check", stdout=io.StringIO(), stderr=io.StringIO())
