"""The job API as portals written for the seed use it: their subclasses' own
attribute names, the seed's names for states and file lists, submit()'s cost
and its notification, submit_many(), and the cluster calls' new shapes."""

import socket

import pytest

from djangoapp import ipc, protocol
from djangoapp.models import (
    CommandResult,
    FileList,
    HpcCluster,
    HpcJob,
    HpcJobStatusChange,
    JobStatus as S,
    WebsocketToken,
    get_job_model,
)
from djangoapp.transitions import JobStateError
from seedportal.models import Job, SentMail
from testjobs.models import LabeledJob


@pytest.fixture(autouse=True)
def no_hpcd(settings, tmp_path):
    """Nothing listens here: a notification to hpcd fails at once, as it may."""
    settings.HPC_IPC_UNIX_SOCKET = str(tmp_path / "no-hpcd.sock")


@pytest.fixture
def calls(monkeypatch):
    """Every ipc.call and ipc.tell, recorded; hpcd answers nothing (an empty dict)."""
    made = []

    def call(command, /, timeout=None, **arguments):
        made.append((command, timeout, arguments))
        return {}

    monkeypatch.setattr(ipc, "call", call)
    monkeypatch.setattr(ipc, "tell", call)
    return made


# -- names a subclass defines ---------------------------------------------------------

def test_a_subclass_with_its_own_status_submits_cancels_and_refuses_twice(
        db, settings, calls, django_capture_on_commit_callbacks):
    settings.HPC_JOB_CLASS = "seedportal.Job"
    job = Job.objects.create(name="first", description="d")
    with django_capture_on_commit_callbacks(execute=True):
        assert job.submit({"script": "true"}) == S.PENDING
    assert job.status == "Pending"  # the portal's own property, untouched
    with pytest.raises(JobStateError, match="job .* is PENDING; only a DRAFT job"):
        job.submit({"script": "true"})
    with django_capture_on_commit_callbacks(execute=True):
        assert job.cancel() == S.CANCELLED
    assert str(job) == f"job {job.pk} (CANCELLED)"
    with pytest.raises(JobStateError, match="only a finished job|cannot"):
        Job.objects.create(name="x", job_status=S.RUNNING).delete_job()


def test_cancelling_a_sent_job_of_a_subclass_tells_hpcd_at_once(
        db, settings, calls, django_capture_on_commit_callbacks):
    """A job class with its own ``status`` waited for the 30 s scan."""
    settings.HPC_JOB_CLASS = "seedportal.Job"
    job = Job.objects.create(name="running", job_status=S.RUNNING)
    with django_capture_on_commit_callbacks(execute=True):
        assert job.cancel() == S.CANCELLING
    assert [(c, a) for c, _, a in calls] == [
        (protocol.Notify, {"job_id": job.pk, "status": S.CANCELLING})]


def test_job_status_display_and_display_name_are_the_seeds():
    assert HpcJob(job_status=S.WALL_TIME_EXCEEDED).job_status_display == "Wall Time Exceeded"
    assert S.display_name(S.OUT_OF_MEMORY) == "Out of Memory"
    assert S.display_name(500) == "Completed"
    assert S.display_name(12345) == "Unknown"
    assert HpcJob(job_status=S.DRAFT).status == S.DRAFT  # unchanged where not overridden


@pytest.mark.parametrize("name", ["seedportal.Job", "seedportal.models.Job"])
def test_hpc_job_class_takes_the_short_form_and_a_dotted_path(settings, name):
    settings.HPC_JOB_CLASS = name
    assert get_job_model() is Job


def test_a_job_of_another_class_than_hpc_job_class_is_refused_at_submit(db, settings, calls):
    settings.HPC_JOB_CLASS = "seedportal.Job"
    job = HpcJob.objects.create()
    with pytest.raises(TypeError, match="get_job_model"):
        job.submit({"script": "true"})
    assert HpcJob.objects.get(pk=job.pk).job_status == S.DRAFT


# -- submit ---------------------------------------------------------------------------

def test_submit_makes_three_queries_whatever_the_database_holds(
        db, calls, django_assert_num_queries):
    """Choose a cluster, one compare-and-set, one history row."""
    for i in range(30):
        HpcCluster.objects.create(host_name=f"h{i}", client_path="/a", online=i % 2 == 0)
    HpcJob.objects.bulk_create([HpcJob(job_status=S.PENDING) for _ in range(50)])
    job = HpcJob.objects.create()
    with django_assert_num_queries(3):
        job.submit({"script": "true"})
    assert job.cluster.online


def test_submit_of_a_new_job_is_one_transaction(transactional_db, calls, monkeypatch):
    """The row, the cluster's choice and the change commit together (one
    commit, not two): a failure half-way leaves no DRAFT row behind."""
    from djangoapp import transitions

    def fail(*args, **kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(transitions, "apply", fail)
    with pytest.raises(RuntimeError):
        HpcJob().submit({"script": "true"})
    assert not HpcJob.objects.exists()
    assert calls == []


def test_a_refused_submit_inside_a_callers_transaction_leaves_it_usable(db, calls):
    from django.db import transaction

    job = HpcJob.objects.create(job_status=S.PENDING)
    with transaction.atomic():
        with pytest.raises(JobStateError):
            job.submit({"script": "true"})
        HpcJob.objects.create()  # no TransactionManagementError
    assert HpcJob.objects.count() == 2


def test_submit_of_a_job_with_a_cluster_keeps_it_and_asks_no_one(
        db, calls, monkeypatch, django_assert_num_queries):
    chosen = HpcCluster.objects.create(host_name="mine", client_path="/a", online=False)
    HpcCluster.objects.create(host_name="other", client_path="/b", online=True)

    def refuse(self, parameters):
        raise AssertionError("choose_cluster must not be asked")

    monkeypatch.setattr(HpcJob, "choose_cluster", refuse)
    job = HpcJob.objects.create()
    job.cluster = chosen
    with django_assert_num_queries(2):
        job.submit({"script": "true"})
    assert HpcJob.objects.get(pk=job.pk).cluster_id == chosen.pk


def test_submit_tells_hpcd_with_the_short_notification_timeout(
        db, settings, calls, django_capture_on_commit_callbacks):
    settings.HPC_IPC_NOTIFY_TIMEOUT = 0.25
    job = HpcJob.objects.create()
    with django_capture_on_commit_callbacks(execute=True):
        job.submit({"script": "true"})
    assert calls == [(protocol.Notify, 0.25, {"job_id": job.pk, "status": S.PENDING})]


def test_submit_tells_hpcd_the_cluster_so_that_it_needs_no_lookup(
        db, calls, django_capture_on_commit_callbacks):
    cluster = HpcCluster.objects.create(host_name="h", client_path="/a", online=True)
    job = HpcJob.objects.create()
    with django_capture_on_commit_callbacks(execute=True):
        job.submit({"script": "true"})
    assert [(c, a) for c, _, a in calls] == [
        (protocol.Notify, {"job_id": job.pk, "status": S.PENDING, "cluster_id": cluster.pk})]


def test_a_hung_hpcd_costs_submit_only_the_notification_timeout(
        db, settings, short_tmp, django_capture_on_commit_callbacks):
    """hpcd accepts connections (the kernel does) but never answers."""
    path = f"{short_tmp}/hung.sock"
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(path)
    hung.listen(8)
    settings.HPC_IPC_UNIX_SOCKET = path
    settings.HPC_IPC_TIMEOUT = 600.0  # would stall the test run if it applied
    settings.HPC_IPC_NOTIFY_TIMEOUT = 0.2
    try:
        job = HpcJob.objects.create()
        with django_capture_on_commit_callbacks(execute=True):
            assert job.submit({"script": "true"}) == S.PENDING
    finally:
        hung.close()
    assert HpcJob.objects.get(pk=job.pk).job_status == S.PENDING


# -- submit_many ----------------------------------------------------------------------

def test_submit_many_inserts_new_jobs_pending_with_one_notification(
        db, calls, django_capture_on_commit_callbacks):
    cluster = HpcCluster.objects.create(host_name="h", client_path="/a", online=True)
    jobs = [HpcJob() for _ in range(1200)]
    with django_capture_on_commit_callbacks(execute=True):
        submitted = HpcJob.objects.submit_many((job, {"n": i}) for i, job in enumerate(jobs))
    assert submitted == jobs and all(job.pk for job in jobs)
    rows = HpcJob.objects.filter(pk__in=[j.pk for j in jobs])
    assert {(r.job_status, r.cluster_id) for r in rows} == {(S.PENDING, cluster.pk)}
    assert sorted(r.job_parameters["n"] for r in rows) == list(range(1200))
    assert HpcJobStatusChange.objects.filter(new_status=S.PENDING).count() == 1200
    assert calls == [(protocol.Notify, 0.5, {"job_id": 0})]


def test_submit_many_of_a_subclass_fills_both_tables(db, settings, calls):
    settings.HPC_JOB_CLASS = "testjobs.LabeledJob"
    jobs = [LabeledJob(label=f"l{i}") for i in range(700)]
    LabeledJob.objects.submit_many((job, "seed-style json string") for job in jobs)
    loaded = LabeledJob.objects.in_bulk([j.pk for j in jobs])
    assert len(loaded) == 700
    assert {(j.label, j.job_status, j.job_parameters) for j in loaded.values()} == {
        (f"l{i}", S.PENDING, "seed-style json string") for i in range(700)}
    new = LabeledJob.objects.create(label="after")  # the id sequence moved on
    assert new.pk > max(loaded)


def test_submit_many_of_saved_drafts_updates_them(db, calls, django_assert_max_num_queries):
    cluster = HpcCluster.objects.create(host_name="h", client_path="/a")
    jobs = [HpcJob.objects.create() for _ in range(40)]
    jobs[0].cluster = cluster
    with django_assert_max_num_queries(6):
        HpcJob.objects.submit_many((job, {"i": job.pk}) for job in jobs)
    rows = HpcJob.objects.in_bulk([j.pk for j in jobs])
    assert all(r.job_status == S.PENDING and r.job_parameters == {"i": r.pk}
               for r in rows.values())
    assert rows[jobs[0].pk].cluster_id == cluster.pk
    assert all(rows[j.pk].cluster_id is None for j in jobs[1:])


def test_submit_many_is_all_or_nothing(db, calls):
    draft = HpcJob.objects.create()
    running = HpcJob.objects.create(job_status=S.RUNNING)
    with pytest.raises(JobStateError, match=f"job {running.pk} is RUNNING"):
        HpcJob.objects.submit_many([(HpcJob(), {}), (draft, {}), (running, {})])
    assert HpcJob.objects.count() == 2
    assert HpcJob.objects.get(pk=draft.pk).job_status == S.DRAFT
    assert calls == []


def test_submit_many_saves_each_job_through_the_model_when_receivers_listen(db, settings,
                                                                           calls):
    settings.HPC_JOB_CLASS = "seedportal.Job"
    jobs = [Job(name=f"j{i}") for i in range(3)] + [Job.objects.create(name="saved")]
    Job.objects.submit_many((job, {"i": i}) for i, job in enumerate(jobs))
    assert {j.job_status for j in Job.objects.all()} == {S.PENDING}
    from seedportal.models import SaveSeen

    assert SaveSeen.objects.filter(signal="pre_save", job_status=S.PENDING).count() == 4
    assert not SentMail.objects.exists()


# -- clusters ---------------------------------------------------------------------------

def test_is_connected_builds_the_token_from_hpcds_answer_without_a_query(
        db, monkeypatch, django_assert_num_queries):
    from django.utils import timezone

    cluster = HpcCluster.objects.create(host_name="h", client_path="/a")
    row, _ = WebsocketToken.objects.issue(cluster.pk, "agent", 60)
    row = WebsocketToken.objects.get(pk=row.pk)
    monkeypatch.setattr(ipc, "call", lambda command, **kw: {
        "token_id": row.pk, "token_purpose": row.purpose, "token_created": row.created,
        "token_expires": row.expires, "token_used_at": timezone.now()})
    with django_assert_num_queries(0):
        token = cluster.is_connected()
        assert (token.pk, token.cluster, token.purpose, token.created) == (
            row.pk, cluster, "agent", row.created)
        assert not token._state.adding
    assert token.token_hash == row.token_hash  # the one field left to load


def test_is_connected_asks_hpcd_again_only_once_its_sessions_stamp_moved(
        db, monkeypatch, settings, tmp_path, django_assert_num_queries):
    from djangoapp import models
    from hpcd.stamp import SessionsStamp

    settings.HPC_IPC_UNIX_SOCKET = str(tmp_path / "hpcd.sock")
    monkeypatch.setattr(models, "_online_answers", {})
    cluster = HpcCluster.objects.create(host_name="h", client_path="/a")
    row, _ = WebsocketToken.objects.issue(cluster.pk, "agent", 60)
    asked = []
    monkeypatch.setattr(ipc, "call", lambda command, **kw: asked.append(command) or {
        "token_id": row.pk, "token_purpose": "agent", "token_created": row.created})
    stamp = SessionsStamp(settings.HPC_IPC_UNIX_SOCKET)
    stamp.open()
    try:
        with django_assert_num_queries(0):
            assert [cluster.is_connected().pk for _ in range(3)] == [row.pk] * 3
        assert len(asked) == 1
        stamp.bump()  # a session came or went
        monkeypatch.setattr(ipc, "call", lambda command, **kw: asked.append(command) or {
            "token_id": 0})
        assert cluster.is_connected() is None and cluster.is_connected() is None
        assert len(asked) == 2
    finally:
        stamp.close()
        ipc._close_stamp()
    assert cluster.is_connected() is None  # no stamp: hpcd is asked each time
    assert len(asked) == 3


def test_is_connected_with_an_older_hpcds_answer_loads_the_token(db, monkeypatch):
    cluster = HpcCluster.objects.create(host_name="h", client_path="/a")
    row, _ = WebsocketToken.objects.issue(cluster.pk, "agent", 60)
    monkeypatch.setattr(ipc, "call", lambda command, **kw: {
        "token_id": row.pk, "token_purpose": None, "token_created": None,
        "token_expires": None, "token_used_at": None})
    assert cluster.is_connected() == row
    monkeypatch.setattr(ipc, "call", lambda command, **kw: {"token_id": 0})
    assert cluster.is_connected() is None


def test_a_file_list_reads_as_dicts_and_as_the_seeds_message(db, monkeypatch):
    cluster = HpcCluster.objects.create(host_name="h", client_path="/a")
    job = HpcJob.objects.create(cluster=cluster)
    monkeypatch.setattr(ipc, "call", lambda command, **kw: {
        "files": [["out.txt", False, 3], ["sub", True, 0], ["sub/big.bin", False, 2**33]]})
    files = job.fetch_remote_file_list("/", True)
    assert files == [{"path": "out.txt", "is_dir": False, "size": 3},
                     {"path": "sub", "is_dir": True, "size": 0},
                     {"path": "sub/big.bin", "is_dir": False, "size": 2**33}]
    assert isinstance(files, FileList)
    assert files.pop_uint() == 2003  # GET_FILE_TREE
    count = files.pop_uint()
    read = [(files.pop_string(), files.pop_bool(), files.pop_ulong()) for _ in range(count)]
    assert read == [("/out.txt", False, 3), ("/sub", True, 0), ("/sub/big.bin", False, 2**33)]
    with pytest.raises(IndexError):
        files.pop_string()
    assert len(files) == 3  # reading moved a cursor, nothing else


def test_a_file_list_read_out_of_order_says_how_to_read_it():
    files = FileList([{"path": "a", "is_dir": False, "size": 1}])
    files.pop_uint()
    with pytest.raises(TypeError, match="uint here, not a string"):
        files.pop_string()


@pytest.mark.parametrize("extra", [None, {"archive": "tar"}])
def test_extra_params_go_to_hpcd_only_when_given(db, monkeypatch, extra):
    cluster = HpcCluster.objects.create(host_name="h", client_path="/a")
    job = HpcJob.objects.create(cluster=cluster)
    sent = []

    def open_stream(command, **arguments):
        sent.append(arguments)
        return {"size": 2, "name": "x.tar"}, iter([b"ab"])

    monkeypatch.setattr(ipc, "open_stream", open_stream)
    job.fetch_remote_file("/x.tar", extra_params=extra)
    cluster.fetch_remote_file("/abs/x.tar", None, True, extra)
    expected = {} if extra is None else {"extra_params": extra}
    assert sent == [{"cluster_id": cluster.pk, "job_id": job.pk, "path": "/x.tar", **expected},
                    {"cluster_id": cluster.pk, "job_id": None, "path": "/abs/x.tar",
                     **expected}]


def test_a_command_result_unpacks_like_paramikos_exec_command():
    result = CommandResult(3, b"one\ntwo\n", b"oops\n")
    assert (result.exit_status, result.stdout, result.stderr) == (3, b"one\ntwo\n", b"oops\n")
    stdin, stdout, stderr = result
    assert stdout.read() == b"one\ntwo\n" and stderr.read() == b"oops\n"
    assert stdout.channel.recv_exit_status() == 3 and stdout.channel.exit_status_ready()
    assert list(CommandResult(0, b"a\nb", b"")) [1].readlines() == ["a\n", "b"]
    assert [line for line in list(result)[1]] == ["one\n", "two\n"]
    stdin.close()
    with pytest.raises(OSError, match="stdin="):
        stdin.write(b"late")
    _, killed, _ = CommandResult(None, b"", b"", signal="KILL")
    assert killed.channel.recv_exit_status() == -1


def test_exec_command_takes_paramikos_arguments(monkeypatch):
    from djangoapp.models import ClusterShell

    sent = []

    def call(command, /, timeout=None, **arguments):
        sent.append(arguments)
        return {"shell_id": 7} if command is protocol.OpenShell else {
            "exit_status": 0, "signal": None, "stdout": b"hi\n", "stderr": b""}

    monkeypatch.setattr(ipc, "call", call)
    shell = ClusterShell(HpcCluster(pk=1))
    _, stdout, _ = shell.exec_command("echo $A", timeout=None, environment={"A": "x y"},
                                      get_pty=False)
    assert stdout.read() == b"hi\n"
    assert sent[-1]["command"] == "export A='x y'; echo $A"
    assert sent[-1]["timeout_seconds"] == 60.0
    with pytest.raises(ValueError):
        shell.exec_command("true", environment={"A;rm": "x"})


def test_protocol_optional_json_is_left_out_when_absent():
    from djangoapp.protocol import FetchFile

    box = FetchFile.makeArguments({"cluster_id": 1, "job_id": None, "path": "p"}, None)
    assert FetchFile.parseArguments(box, None) == {"cluster_id": 1, "job_id": None, "path": "p",
                                                   "offset": None, "length": None}
    box = FetchFile.makeArguments({"cluster_id": 1, "job_id": 2, "path": "p",
                                   "extra_params": {"k": [1]}}, None)
    assert FetchFile.parseArguments(box, None)["extra_params"] == {"k": [1]}
