"""A job's directory as an attacker's playground: FIFOs, symlinks out, a
directory swapped for a symlink while files are fetched, names with newlines
(issue 9, items 2, 3 and 10).  A real agent serves every request."""

import os

import pytest

from djangoapp import models
from djangoapp.models import HpcJob, JobStatus
from harness import FINAL, job_dir, wait_status
from hpcd.commands import PathRefused


def finished_job(cluster, script):
    job = HpcJob.objects.create(cluster=cluster)
    job.submit({"script": script})
    wait_status(job, FINAL, timeout=30)
    assert job.status == JobStatus.COMPLETED, job.job_details
    return job


def content(response):
    return b"".join(response.streaming_content)


def test_fifos_are_refused_at_once_and_never_block_the_agent(still_serves):
    job = finished_job(still_serves, "mkfifo pipe && echo hi > out.txt && "
                                     "{ mknod zero c 1 5 2>/dev/null || true; }")
    # More fetches than the agent has file workers: each would hold one for good.
    for _ in range(6):
        with pytest.raises(PathRefused):
            job.fetch_remote_file("pipe")
    if os.path.exists(os.path.join(job_dir(still_serves, job), "zero")):  # made as root
        with pytest.raises(PathRefused):
            job.fetch_remote_file("zero")  # a device: endless bytes
    assert "pipe" not in {f["path"] for f in job.fetch_remote_file_list("/", True)}
    assert content(job.fetch_remote_file("out.txt")) == b"hi\n"


def test_paths_out_of_the_job_directory_are_refused(still_serves):
    job = finished_job(still_serves, "ln -s ../.. up && ln -s / root && "
                                     "ln -s ../../settings.py settings-link")
    for path in ("../../settings.py", "/etc/passwd", "up/settings.py", "root/etc/passwd",
                 "settings-link", "a\0b", "..", "../" * 40 + "etc/passwd"):
        with pytest.raises(PathRefused):
            job.fetch_remote_file(path)
    listed = {f["path"] for f in job.fetch_remote_file_list("/", True)}
    assert not any("settings.py" in p or p.startswith("root/") for p in listed), listed


def test_a_directory_swapped_for_a_symlink_while_fetching_never_leaks(still_serves):
    """The job flips ``d`` between a symlink to its own directory ``a`` and one
    to the agent's directory, as fast as it can, while Django fetches
    ``d/settings.py``: only the job's own file may ever come back."""
    job = HpcJob.objects.create(cluster=still_serves)
    job.submit({"script": "mkdir a && echo inside > a/settings.py && touch started && "
                          "end=$((SECONDS + 4)); while [ $SECONDS -lt $end ]; do "
                          "ln -sfn a d.new && mv -T d.new d; "
                          "ln -sfn ../.. d.new && mv -T d.new d; done"})
    wait_status(job, {JobStatus.RUNNING, *FINAL}, timeout=30)
    served, refused = [], 0
    while job.status == JobStatus.RUNNING:
        try:
            served.append(content(job.fetch_remote_file("d/settings.py")))
        except PathRefused:
            refused += 1
        job.refresh_from_db()
    assert set(served) <= {b"inside\n"}, served[:3]
    assert served or refused  # the race really ran


def test_newlines_in_names(still_serves):
    """A file name with a newline downloads with a proper Content-Disposition;
    a job, queue, account or environment name ending in one fails only its
    job (``$`` matched before a trailing newline: fullmatch everywhere)."""
    job = finished_job(still_serves, "printf data > \"$(printf 'a\\nb.txt')\"")
    assert "a\nb.txt" in {f["path"] for f in job.fetch_remote_file_list("/", True)}
    response = job.fetch_remote_file("a\nb.txt")
    disposition = response["Content-Disposition"]
    assert "\n" not in disposition and "\r" not in disposition
    assert content(response) == b"data"
    jobs = {}
    for field, value in (("name", "ok\n"), ("queue", "ok\n"), ("account", "ok\n"),
                         ("environment", {"OK\nEVIL": "x"})):
        jobs[field] = HpcJob.objects.create(cluster=still_serves)
        jobs[field].submit({"script": "true", field: value})
    for field, job in jobs.items():
        wait_status(job, FINAL, timeout=30)
        assert job.status == JobStatus.ERROR and field in job.job_details


@pytest.mark.skipif(not hasattr(models, "ParametersRefused"),
                    reason="submit()'s size check (ParametersRefused) comes with the Django "
                           "side of issue 9 item 8, in another branch")
def test_huge_parameters_are_refused_at_submit(still_serves):
    """Parameters over the frame limit left a job in SUBMITTING for good
    (issue 9 item 8); submit() refuses them."""
    from hpc_agent import wire

    job = HpcJob.objects.create(cluster=still_serves)
    with pytest.raises(models.ParametersRefused):
        job.submit({"script": "true", "blob": "x" * (wire.MAX_CONTROL_MESSAGE + 1)})
    job.refresh_from_db()
    assert job.status == JobStatus.DRAFT


def test_a_job_that_forges_its_result_record_fails_alone(still_serves):
    """A job writes a nonsense result record (signal 999) where its runner
    keeps it and kills the runner, so the agent reads the forgery (issue 9
    item 7): that job ends in ERROR saying why, and the others' polls go on."""
    bystander = HpcJob.objects.create(cluster=still_serves)
    bystander.submit({"script": "sleep 2; echo fine > out.txt"})
    job = HpcJob.objects.create(cluster=still_serves)
    job.submit({"script": "c=$(ls -d ../../control/*/ | grep \"/$(basename \"$PWD\")/$\"); "
                          "echo '{\"exit_code\": null, \"signal\": 999, \"stopped\": null, "
                          "\"started\": 1.0}' > \"$c/result.json\"; kill -9 $PPID; sleep 5"})
    wait_status(job, FINAL, timeout=30)
    assert job.status == JobStatus.ERROR
    assert "result record is invalid" in job.job_details, job.job_details
    wait_status(bystander, FINAL, timeout=30)
    assert bystander.status == JobStatus.COMPLETED, bystander.job_details
