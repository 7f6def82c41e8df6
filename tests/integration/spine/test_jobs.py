"""A job's life through the public API, with the real hpcd and a real agent."""

import os
import time

import pytest

from djangoapp.models import HpcJob, JobStatus
from djangoapp.transitions import JobStateError
from harness import FINAL, job_dir, wait_for, wait_status
from hpcd.commands import PathRefused

def test_job_goes_through_every_phase_to_completed(local_cluster):
    job = HpcJob.objects.create()
    started = time.monotonic()
    assert job.submit({"script": "echo hi > out.txt"}) in (JobStatus.PENDING,
                                                           JobStatus.SUBMITTING)
    wait_status(job, FINAL)
    elapsed = time.monotonic() - started
    assert job.status == JobStatus.COMPLETED, job.job_details
    assert elapsed < 5, f"a trivial job took {elapsed:.1f} s to show COMPLETED"
    assert [(c.old_status, c.new_status) for c in job.history()] == [
        (JobStatus.DRAFT, JobStatus.PENDING), (JobStatus.PENDING, JobStatus.SUBMITTING),
        (JobStatus.SUBMITTING, JobStatus.SUBMITTED), (JobStatus.SUBMITTED, JobStatus.RUNNING),
        (JobStatus.RUNNING, JobStatus.COMPLETED)]
    assert [c.source for c in job.history()] == ["django", "hpcd", "agent", "agent", "agent"]
    times = [job.job_pending_time, job.job_submitting_time, job.job_submitted_time,
             job.job_running_time, job.job_finished_time]
    assert all(times) and times == sorted(times)
    assert job.job_queued_time is None  # the local scheduler has no queue
    assert job.remote_job_id
    assert job.cluster_id == local_cluster.pk


def test_failing_job_is_an_error_naming_the_exit_code(local_cluster):
    job = HpcJob.objects.create()
    job.submit({"script": "echo oops >&2; exit 3"})
    wait_status(job, FINAL)
    assert job.status == JobStatus.ERROR
    assert "exit code 3" in job.job_details


def test_invalid_parameters_are_an_error_saying_why(local_cluster):
    job = HpcJob.objects.create()
    job.submit({"script": "true", "walltime_seconds": "ten"})
    wait_status(job, FINAL)
    assert job.status == JobStatus.ERROR
    assert "walltime_seconds" in job.job_details


def test_files_are_listed_and_streamed(local_cluster):
    job = HpcJob.objects.create()
    job.submit({"script": "mkdir -p sub && echo hi > out.txt && head -c 3000000 /dev/urandom"
                          " > sub/big.bin"})
    wait_status(job, FINAL)
    files = {f["path"]: f for f in job.fetch_remote_file_list("/", True)}
    assert files["out.txt"] == {"path": "out.txt", "is_dir": False, "size": 3}
    assert files["sub"]["is_dir"] is True
    assert files["sub/big.bin"]["size"] == 3000000
    assert "sub/big.bin" not in {f["path"] for f in job.fetch_remote_file_list("/", False)}
    response = job.fetch_remote_file("out.txt")
    assert response["Content-Disposition"] == 'attachment; filename="out.txt"'
    assert b"".join(response.streaming_content) == b"hi\n"
    response = job.fetch_remote_file("sub/big.bin", force_download=False)
    assert "Content-Disposition" not in response
    with open(os.path.join(job_dir(local_cluster, job), "sub", "big.bin"), "rb") as f:
        assert b"".join(response.streaming_content) == f.read()


def test_paths_outside_the_job_directory_are_refused(local_cluster):
    first = HpcJob.objects.create()
    first.submit({"script": "echo mine > mine.txt"})
    wait_status(first, FINAL)
    # A sibling whose name starts with this job's id: a string-prefix check
    # (the seed's) lets "../<id>1/secret.txt" through.
    sibling = os.path.join(local_cluster.client_path, "jobs", f"{first.pk}1")
    os.makedirs(sibling)
    with open(os.path.join(sibling, "secret.txt"), "w") as f:
        f.write("not yours")
    os.symlink("/etc", os.path.join(job_dir(local_cluster, first), "etc-link"))
    for path in (f"../{first.pk}1/secret.txt", "../../../../etc/passwd", "/etc/passwd",
                 "etc-link/passwd", "missing.txt"):
        with pytest.raises(PathRefused):
            first.fetch_remote_file(path)
    for path in ("../../../../etc", f"../{first.pk}1", "etc-link"):
        with pytest.raises(PathRefused):
            first.fetch_remote_file_list(path, True)
    listed = {f["path"] for f in first.fetch_remote_file_list("/", True)}
    assert "mine.txt" in listed and "etc-link" not in listed


def test_cancel_kills_the_jobs_whole_process_group(local_cluster):
    job = HpcJob.objects.create()
    job.submit({"script": "sleep 300 & echo $! > child.pid; sleep 300"})
    wait_status(job, JobStatus.RUNNING)
    pid_file = os.path.join(job_dir(local_cluster, job), "child.pid")
    child = int(wait_for(lambda: os.path.exists(pid_file) and open(pid_file).read().strip()))
    assert job.cancel() == JobStatus.CANCELLING
    wait_status(job, FINAL)
    assert job.status == JobStatus.CANCELLED
    wait_for(lambda: not os.path.exists(f"/proc/{child}"), timeout=5,
             what="the job's background process to die")
    assert job.cancel() == JobStatus.CANCELLED  # again: nothing to do


def test_cancelling_a_finished_job_is_refused(local_cluster):
    job = HpcJob.objects.create()
    job.submit({"script": "true"})
    wait_status(job, FINAL)
    with pytest.raises(JobStateError, match="cannot be cancelled"):
        job.cancel()


def test_delete_removes_the_working_directory(local_cluster):
    job = HpcJob.objects.create()
    job.submit({"script": "echo data > data.txt"})
    wait_status(job, FINAL)
    assert os.path.exists(os.path.join(job_dir(local_cluster, job), "data.txt"))
    assert job.delete_job() == JobStatus.DELETING
    wait_status(job, JobStatus.DELETED)
    assert not os.path.exists(job_dir(local_cluster, job))


def test_deleting_a_running_job_is_refused(local_cluster):
    job = HpcJob.objects.create()
    job.submit({"script": "sleep 30"})
    wait_status(job, JobStatus.RUNNING)
    with pytest.raises(JobStateError, match="cancel it first"):
        job.delete_job()
    job.cancel()
    wait_status(job, JobStatus.CANCELLED)


def test_many_jobs_run_concurrently(local_cluster):
    jobs = [HpcJob.objects.create() for _ in range(20)]
    for i, job in enumerate(jobs):
        job.submit({"script": f"echo {i} > n.txt"})
    for job in jobs:
        wait_status(job, FINAL, timeout=60)
        assert job.status == JobStatus.COMPLETED, job.job_details


def test_a_download_abandoned_half_way_costs_nothing(local_cluster, hpcd):
    job = HpcJob.objects.create()
    job.submit({"script": "head -c 50000000 /dev/zero > big.bin; echo small > small.txt"})
    wait_status(job, FINAL)
    response = job.fetch_remote_file("big.bin")
    chunks = iter(response.streaming_content)
    assert next(chunks)
    response.close()  # what Django does when the browser goes away
    assert b"".join(job.fetch_remote_file("small.txt").streaming_content) == b"small\n"
    wait_for(lambda: "the Django process stopped reading" in hpcd.log(), timeout=10)
    assert hpcd.process.poll() is None


def test_the_agent_reports_its_status_and_stops_on_request(local_cluster):
    import subprocess
    import sys

    from harness import agent_pid

    job = HpcJob.objects.create()
    job.submit({"script": "true"})
    wait_status(job, FINAL)
    path = local_cluster.client_path

    def agent(*args):
        return subprocess.run([sys.executable, "-m", "hpc_agent", *args, path],
                              capture_output=True, text=True, check=True).stdout

    report = agent("status")
    assert f"running, pid {agent_pid(path)}" in report
    assert "1 COMPLETED" in report and "0 updates waiting" in report
    pid = agent_pid(path)
    assert f"asked agent pid {pid} to stop" in agent("stop")
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or agent_pid(path) != pid,
             timeout=10, what="the agent to stop")
    assert "not running" in agent("status") or agent_pid(path) != pid


def test_files_over_four_gibibytes_keep_their_size(local_cluster):
    """The seed's 32-bit sizes could not describe a file over 4 GiB."""
    job = HpcJob.objects.create()
    job.submit({"script": "truncate -s 5G sparse.bin"})
    wait_status(job, FINAL)
    size = 5 * 2**30
    assert {"path": "sparse.bin", "is_dir": False, "size": size} in \
        job.fetch_remote_file_list("/", True)
    response = job.fetch_remote_file("sparse.bin")
    assert response["Content-Length"] == str(size)
    assert set(next(iter(response.streaming_content))) == {0}
    response.close()


def test_cluster_level_files_are_read_only_from_allowed_roots(local_cluster):
    job = HpcJob.objects.create()
    job.submit({"script": "echo shared > shared.txt"})
    wait_status(job, FINAL)
    path = os.path.join(job_dir(local_cluster, job), "shared.txt")
    response = local_cluster.fetch_remote_file(path)
    assert b"".join(response.streaming_content) == b"shared\n"
    listed = local_cluster.fetch_remote_file_list(job_dir(local_cluster, job), True)
    assert {"path": f"{job.pk}/shared.txt", "is_dir": False, "size": 7} in listed
    for outside in ("/etc/passwd", "/", local_cluster.client_path + "/settings.py"):
        with pytest.raises(PathRefused):
            local_cluster.fetch_remote_file(outside)
