"""State changes reach Django's model signals as the seed's job.save() made
them, and the app's own job_status_changed after each commit."""

import pytest
from django.db.models.signals import pre_save

from djangoapp import transitions
from djangoapp.models import HpcJob, JobStatus as S
from djangoapp.signals import job_status_changed
from djangoapp.transitions import model_receivers
from seedportal.models import Job, SaveSeen, SentMail
from testjobs.models import LabeledJob


@pytest.fixture(autouse=True)
def no_hpcd(settings, tmp_path):
    settings.HPC_IPC_UNIX_SOCKET = str(tmp_path / "no-hpcd.sock")


@pytest.fixture
def received():
    """job_status_changed as a receiver saw it, for any sender."""
    seen = []

    def receiver(sender, job, old, new, detail, source, **kwargs):
        seen.append((sender, job.pk, old, new, detail, source, type(job)))

    job_status_changed.connect(receiver)
    yield seen
    job_status_changed.disconnect(receiver)


def test_the_path_follows_the_receivers_connected_for_the_class():
    assert model_receivers(Job)  # the portal's pre_save and post_save
    assert not model_receivers(LabeledJob) and not model_receivers(HpcJob)

    def receiver(sender, **kwargs):
        pass

    pre_save.connect(receiver, sender=LabeledJob)
    try:
        assert model_receivers(LabeledJob)
    finally:
        pre_save.disconnect(receiver, sender=LabeledJob)
    assert not model_receivers(LabeledJob)


def test_a_change_is_saved_through_the_model_with_the_old_row_in_place(db, settings):
    settings.HPC_JOB_CLASS = "seedportal.Job"
    job = Job.objects.create(name="analysis", job_status=S.RUNNING)
    SaveSeen.objects.all().delete()
    assert transitions.apply(job.pk, S.COMPLETED, "agent", "exit 0") == (True, S.RUNNING)
    (mail,) = SentMail.objects.all()
    assert (mail.new_status, mail.row_status) == (S.COMPLETED, S.RUNNING)
    assert mail.subject == "Your job analysis is Completed"
    assert [(s.signal, s.job_status) for s in SaveSeen.objects.all()] == [
        ("pre_save", S.COMPLETED), ("post_save", S.COMPLETED)]
    assert set(SaveSeen.objects.first().update_fields.split(",")) == {
        "job_status", "job_details", "job_finished_time"}
    assert [(c.old_status, c.new_status) for c in job.history()] == [(S.RUNNING, S.COMPLETED)]


def test_a_refused_change_saves_nothing_through_the_model(db, settings):
    settings.HPC_JOB_CLASS = "seedportal.Job"
    job = Job.objects.create(name="done", job_status=S.COMPLETED)
    SaveSeen.objects.all().delete()
    assert transitions.apply(job.pk, S.RUNNING, "agent") == (False, S.COMPLETED)
    assert not SaveSeen.objects.exists() and not job.history().exists()


def test_cancel_and_submit_in_django_fire_the_receivers_on_the_callers_instance(db, settings):
    settings.HPC_JOB_CLASS = "seedportal.Job"
    job = Job.objects.create(name="mine")
    job.description = "set in memory, not saved by the transition"
    job.submit({"script": "true"})
    assert job.cancel() == S.CANCELLED
    assert [(m.new_status, m.row_status) for m in SentMail.objects.all()] == [
        (S.CANCELLED, S.PENDING)]
    assert Job.objects.get(pk=job.pk).description == ""  # update_fields only


def test_a_failing_receiver_stops_the_caller_unless_robust(db, settings, caplog):
    settings.HPC_JOB_CLASS = "seedportal.Job"
    job = Job.objects.create(name="x", job_status=S.RUNNING)

    def broken(sender, **kwargs):
        raise RuntimeError("mail server down")

    pre_save.connect(broken, sender=Job)
    try:
        with pytest.raises(RuntimeError):
            transitions.apply(job.pk, S.COMPLETED, "agent")
        assert Job.objects.get(pk=job.pk).job_status == S.RUNNING
        assert transitions.apply(job.pk, S.COMPLETED, "agent", robust=True) == (True, S.RUNNING)
    finally:
        pre_save.disconnect(broken, sender=Job)
    assert Job.objects.get(pk=job.pk).job_status == S.COMPLETED
    assert "stored without it" in caplog.text
    assert [(c.old_status, c.new_status) for c in job.history()] == [(S.RUNNING, S.COMPLETED)]


def test_job_status_changed_is_sent_after_the_commit(db, received,
                                                     django_capture_on_commit_callbacks):
    job = HpcJob.objects.create()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        job.submit({"script": "true"})
    assert received == []  # not before the commit
    for callback in callbacks:
        if callback.__name__ == "<lambda>":
            callback()
    assert received == [(HpcJob, job.pk, S.DRAFT, S.PENDING, "", "django", HpcJob)]


def test_job_status_changed_is_sent_on_both_paths_with_the_job(db, settings, received,
                                                               django_capture_on_commit_callbacks):
    settings.HPC_JOB_CLASS = "seedportal.Job"
    portal = Job.objects.create(name="p", job_status=S.RUNNING)
    with django_capture_on_commit_callbacks(execute=True):
        transitions.apply(portal.pk, S.COMPLETED, "agent", "fine")
    settings.HPC_JOB_CLASS = "testjobs.LabeledJob"
    labeled = LabeledJob.objects.create(job_status=S.RUNNING)
    with django_capture_on_commit_callbacks(execute=True):
        transitions.apply(labeled.pk, S.ERROR, "hpcd", "bad")
    assert received == [
        (Job, portal.pk, S.RUNNING, S.COMPLETED, "fine", "agent", Job),
        (LabeledJob, labeled.pk, S.RUNNING, S.ERROR, "bad", "hpcd", LabeledJob)]


def test_a_failing_job_status_changed_receiver_is_logged(db, caplog,
                                                         django_capture_on_commit_callbacks):
    def broken(sender, **kwargs):
        raise RuntimeError("nope")

    job_status_changed.connect(broken)
    try:
        job = HpcJob.objects.create(job_status=S.RUNNING)
        with django_capture_on_commit_callbacks(execute=True):
            assert transitions.apply(job.pk, S.COMPLETED, "agent")[0]
    finally:
        job_status_changed.disconnect(broken)
    assert "job_status_changed receiver" in caplog.text
