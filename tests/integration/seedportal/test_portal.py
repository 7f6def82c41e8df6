"""A portal written for the seed, with only its import lines changed, against
a live hpcd and a local agent: tests/seedportal's Job is the HPC_JOB_CLASS."""

import os

import pytest

from djangoapp.models import HpcCluster, JobStatus as S
from djangoapp.transitions import JobStateError
from harness import FINAL, Hpcd, job_dir, wait_for
from seedportal.models import Job, SaveSeen, SentMail


@pytest.fixture
def portal(transactional_db, short_tmp, settings, agent_dir):
    """hpcd loading the portal's job class, its scan too slow to matter: only
    Django's notifications can make anything happen within a test."""
    settings.HPC_JOB_CLASS = "seedportal.Job"
    daemon = Hpcd(short_tmp, extra_env={"HPC_JOB_CLASS": "seedportal.Job",
                                        "HPC_DISPATCH_SCAN_SECONDS": "600"})
    settings.HPC_IPC_UNIX_SOCKET = daemon.socket_path
    daemon.start()
    cluster = HpcCluster.objects.create(host_name="localhost", client_path=agent_dir())
    cluster.try_connect()
    wait_for(cluster.is_connected, what="the agent to connect")
    yield cluster
    daemon.stop()


def wait_state(job, states, timeout=20.0):
    """The portal's ``status`` is text: wait on ``job_status``."""
    states = {states} if isinstance(states, S) else set(states)

    def reached():
        job.refresh_from_db()
        return job.job_status in states

    wait_for(reached, timeout=timeout, what=f"job {job.pk} to reach {states}")
    return job


def test_a_job_runs_and_the_owner_is_mailed_once_from_the_pre_save_receiver(portal):
    job = Job.objects.create(name="bilby run", description="a portal job")
    assert job.submit({"script": "echo hi > out.txt"}) == S.PENDING
    wait_state(job, FINAL)
    assert job.job_status == S.COMPLETED and job.status == "Completed"
    # hpcd saved each state through the model; the receiver saw the old row.
    (mail,) = wait_for(lambda: list(SentMail.objects.filter(job=job)), what="the mail")
    assert (mail.new_status, mail.row_status) == (S.COMPLETED, S.RUNNING)
    assert mail.subject == "Your job bilby run is Completed"
    saves = [(s.signal, s.job_status) for s in SaveSeen.objects.filter(job_id=job.pk)
             .exclude(signal="status_changed")]
    for state in (S.PENDING, S.SUBMITTING, S.SUBMITTED, S.RUNNING, S.COMPLETED):
        assert saves.count(("pre_save", state)) == 1 and saves.count(("post_save", state)) == 1
    changed = wait_for(lambda: [(s.job_status, s.update_fields) for s in SaveSeen.objects
                                .filter(job_id=job.pk, signal="status_changed")]
                       if SaveSeen.objects.filter(job_id=job.pk, signal="status_changed",
                                                  job_status=S.COMPLETED).exists() else None)
    assert changed == [(S.PENDING, "django"), (S.SUBMITTING, "hpcd"), (S.SUBMITTED, "agent"),
                       (S.RUNNING, "agent"), (S.COMPLETED, "agent")]
    with pytest.raises(JobStateError, match="only a DRAFT job"):
        job.submit({"script": "true"})


def test_cancel_reaches_the_agent_without_waiting_for_a_scan(portal):
    job = Job.objects.create(name="long")
    job.submit({"script": "sleep 300"})
    wait_state(job, S.RUNNING)
    assert job.cancel() == S.CANCELLING
    wait_state(job, FINAL)
    assert job.job_status == S.CANCELLED
    (mail,) = SentMail.objects.filter(job=job)
    assert (mail.new_status, mail.row_status) == (S.CANCELLED, S.CANCELLING)


def test_files_read_the_seeds_way_and_by_the_seeds_paths(portal):
    job = Job.objects.create(name="files")
    job.submit({"script": "mkdir sub && echo hi > out.txt && echo x > sub/a.txt"})
    wait_state(job, FINAL)
    files = job.fetch_remote_file_list("/", True)
    assert files.pop_uint() == 2003
    entries = [(files.pop_string(), files.pop_bool(), files.pop_ulong())
               for _ in range(files.pop_uint())]
    assert ("/out.txt", False, 3) in entries and ("/sub", True, 0) in entries
    assert ("/sub/a.txt", False, 2) in entries
    assert {f["path"] for f in job.fetch_remote_file_list("/sub", False)} == {"sub/a.txt"}
    response = job.fetch_remote_file("/out.txt")
    assert b"".join(response.streaming_content) == b"hi\n"
    assert os.path.exists(os.path.join(job_dir(portal, job), "out.txt"))
