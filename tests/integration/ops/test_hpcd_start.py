"""`twistd hpcd` at start: --version, the system checks, the metrics extra, JSON logs."""

import json
import os
import subprocess
import sys

import hpc_agent
from harness import Hpcd

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def run_hpcd(workdir, *args, env=None, timeout=60):
    """``twistd --nodaemon hpcd ARGS`` expected to stop by itself."""
    daemon = Hpcd(workdir)
    full_env = {**daemon.environment(), **(env or {})}
    return subprocess.run([TWISTD, "--nodaemon", "--pidfile=", "hpcd", *args], env=full_env,
                          cwd=workdir, capture_output=True, text=True, timeout=timeout)


def test_version(short_tmp):
    result = run_hpcd(short_tmp, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"hpcd (hpc-job-controller) {hpc_agent.__version__}"


def test_hpcd_refuses_to_start_on_a_settings_error_and_says_which(transactional_db,
                                                                    short_tmp):
    result = run_hpcd(short_tmp, env={"HPC_JOB_CLASS": "myapp.models.Nope"})
    assert result.returncode == 1
    assert "hpcd: not starting: the settings have errors." in result.stderr
    assert "(hpc.E001) HPC_JOB_CLASS = 'myapp.models.Nope' cannot be imported" in result.stderr


def test_hpcd_refuses_a_socket_in_a_missing_directory_naming_runtimedirectory(
        transactional_db, short_tmp):
    missing = os.path.join(short_tmp, "run", "hpcd", "hpcd.sock")
    result = run_hpcd(short_tmp, env={"HPC_IPC_UNIX_SOCKET": missing})
    assert result.returncode == 1
    assert "(hpc.E003)" in result.stderr and "RuntimeDirectory=hpcd" in result.stderr


def test_metrics_without_prometheus_client_is_refused_naming_the_extra(transactional_db,
                                                                      short_tmp):
    shadow = os.path.join(short_tmp, "shadow", "prometheus_client")
    os.makedirs(shadow)
    with open(os.path.join(shadow, "__init__.py"), "w") as f:
        f.write("raise ImportError('No module named prometheus_client (test shadow)')\n")
    env = Hpcd(short_tmp).environment()
    result = run_hpcd(short_tmp, env={
        "HPC_METRICS_ENDPOINT": "tcp:0:interface=127.0.0.1",
        "PYTHONPATH": os.pathsep.join([os.path.dirname(shadow), env["PYTHONPATH"]])})
    assert result.returncode == 1
    assert ("hpcd: not starting: HPC_METRICS_ENDPOINT is set ('tcp:0:interface=127.0.0.1') "
            "but prometheus_client is not installed: pip install "
            "'hpc-job-controller[metrics]'") in result.stderr


def test_bad_log_format_is_a_usage_error(short_tmp):
    result = run_hpcd(short_tmp, "--log-format", "xml")
    assert result.returncode != 0
    assert "--log-format must be one of text, json, not 'xml'" in result.stdout + result.stderr


def test_json_log_lines(transactional_db, short_tmp):
    daemon = Hpcd(short_tmp, args=["--log-format", "json"]).start()
    try:
        pass
    finally:
        daemon.stop()
    records = [json.loads(line) for line in daemon.log().splitlines()]
    texts = [r["text"] for r in records]
    assert any(t.startswith(f"hpcd {hpc_agent.__version__} starting, pid ") for t in texts)
    listening = next(r for r in records if r["text"].startswith("hpcd listening"))
    assert listening["namespace"] == "hpcd.service" and listening["level"] == "info"
    assert listening["path"] == daemon.socket_path
