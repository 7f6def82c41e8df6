"""Receiving job files (hpc_agent.files.create_upload, hpc_agent.upload):
confinement, atomic replacement, flow control."""

import hashlib
import os
import stat

import pytest
from twisted.internet import defer

from hpc_agent import wire
from hpc_agent.files import Missing, PathRefused, TooLarge, create_upload, open_file
from hpc_agent.upload import Receiver, UploadSink


@pytest.fixture
def job(tmp_path):
    (tmp_path / "jobs" / "13").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    return tmp_path / "jobs" / "13"


def upload(job, path, data, **kwargs):
    u = create_upload([str(job)], path, **kwargs)
    u.write(data)
    return u, u.commit(len(data), hashlib.sha256(data).hexdigest())


def test_an_upload_lands_under_its_name_only_when_committed(job):
    u = create_upload([str(job)], "in/data.csv", dir_mode=0o750)
    u.write(b"1,2")
    assert os.listdir(job / "in") == [u.temp]  # a hidden temporary name meanwhile
    assert u.temp.startswith(".data.csv.upload-")
    result = u.commit(3, hashlib.sha256(b"1,2").hexdigest())
    assert (job / "in" / "data.csv").read_bytes() == b"1,2"
    assert os.listdir(job / "in") == ["data.csv"]
    assert result["size"] == 3 and result["sha256"] == hashlib.sha256(b"1,2").hexdigest()
    assert stat.S_IMODE(os.stat(job / "in").st_mode) == 0o750  # parents: the given mode


def test_a_leading_slash_is_the_job_directory(job):
    upload(job, "/x.txt", b"x")
    assert (job / "x.txt").read_bytes() == b"x"


def test_an_upload_replaces_a_regular_file_atomically(job):
    (job / "a.txt").write_bytes(b"old")
    u = create_upload([str(job)], "a.txt")
    u.write(b"new!")
    assert (job / "a.txt").read_bytes() == b"old"
    u.commit(4, hashlib.sha256(b"new!").hexdigest())
    assert (job / "a.txt").read_bytes() == b"new!"


def test_a_checksum_mismatch_puts_nothing_in_place(job):
    (job / "a.txt").write_bytes(b"old")
    u = create_upload([str(job)], "a.txt")
    u.write(b"new")
    with pytest.raises(ValueError, match="damaged"):
        u.commit(3, "0" * 64)
    u.abort()
    assert (job / "a.txt").read_bytes() == b"old"
    assert os.listdir(job) == ["a.txt"]


def test_an_aborted_upload_leaves_no_file_at_all(job):
    u = create_upload([str(job)], "half.bin")
    u.write(b"x" * 1000)
    u.abort()
    assert os.listdir(job) == []


def test_the_size_limit_stops_an_upload(job):
    u = create_upload([str(job)], "big", max_size=10)
    u.write(b"x" * 10)
    with pytest.raises(TooLarge):
        u.write(b"x")
    u.abort()
    assert os.listdir(job) == []


@pytest.mark.parametrize("path", ["../escape.txt", "in/../../escape.txt", "/../escape.txt"])
def test_an_upload_cannot_climb_out(job, path):
    with pytest.raises(PathRefused):
        create_upload([str(job)], path)
    assert not (job.parent / "escape.txt").exists()


def test_an_upload_through_a_symlink_pointing_outside_is_refused(job):
    os.symlink(job.parent.parent / "outside", job / "out")
    with pytest.raises(PathRefused):
        create_upload([str(job)], "out/x.txt")
    with pytest.raises(PathRefused):
        create_upload([str(job)], "out/new/x.txt")
    assert os.listdir(job.parent.parent / "outside") == []


def test_an_upload_through_a_symlink_inside_is_followed(job):
    (job / "real").mkdir()
    os.symlink("real", job / "alias")
    upload(job, "alias/x.txt", b"x")
    assert (job / "real" / "x.txt").read_bytes() == b"x"


def test_an_upload_never_replaces_a_symlink_directory_or_fifo(job):
    os.symlink("/etc/passwd", job / "link")
    (job / "dir").mkdir()
    os.mkfifo(job / "fifo")
    for name in ("link", "dir", "fifo"):
        with pytest.raises(PathRefused, match="regular file"):
            create_upload([str(job)], name)
    assert os.path.islink(job / "link")
    assert sorted(os.listdir(job)) == ["dir", "fifo", "link"]


def test_a_target_turned_into_a_directory_meanwhile_fails_the_commit(job):
    u = create_upload([str(job)], "x")
    u.write(b"x")
    (job / "x").mkdir()
    with pytest.raises(PathRefused):
        u.commit(1, hashlib.sha256(b"x").hexdigest())
    u.abort()
    assert os.listdir(job) == ["x"]


def test_a_file_in_the_way_of_a_parent_directory_is_refused(job):
    (job / "in").write_text("a file")
    with pytest.raises(PathRefused, match="not a directory"):
        create_upload([str(job)], "in/x")


def test_the_directory_itself_is_not_a_file_name(job):
    with pytest.raises(PathRefused):
        create_upload([str(job)], "/")


def test_a_missing_file_is_refused_as_missing_for_reads(job):
    with pytest.raises(Missing):
        open_file([str(job)], "nothing.txt")
    with pytest.raises(Missing):
        open_file([str(job / "not-yet")], "x")


# -- the receiver: order, flow control, failures -------------------------------

class Connection:
    def __init__(self):
        self.events = []

    def pause(self):
        self.events.append("pause")

    def resume(self):
        self.events.append("resume")

    def send(self, frame):
        self.events.append(wire.decode(frame)["type"])

    def close(self):
        self.events.append("close")


class Sink:
    """Records writes; each completes when the test says."""

    def __init__(self):
        self.writes = []
        self.pending = []
        self.aborted = False
        self.committed = None

    def sink(self):
        return UploadSink("x", self.write, self.commit, self.abort)

    def write(self, data):
        self.writes.append(data)
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def commit(self, size, sha256):
        self.committed = (size, sha256)
        return defer.succeed({"size": size, "sha256": sha256, "mtime": 1.0})

    def abort(self):
        self.aborted = True
        return defer.succeed(None)

    def finish_one(self):
        self.pending.pop(0).callback(None)


def receiver(window=10):
    sink = Sink()
    r = Receiver(sink.sink(), window=window)
    r.connection = Connection()
    return r, sink


def test_writes_go_one_at_a_time_in_order():
    r, sink = receiver(window=100)
    r.data(b"a")
    r.data(b"b")
    assert sink.writes == [b"a"]
    sink.finish_one()
    assert sink.writes == [b"a", b"b"]


def test_the_connection_pauses_while_writes_lag_and_resumes_once_they_catch_up():
    r, sink = receiver(window=10)
    for _ in range(4):
        r.data(b"x" * 4)
    assert r.connection.events == ["pause"]
    sink.finish_one()
    sink.finish_one()
    assert r.connection.events == ["pause"]  # 8 bytes still wait
    sink.finish_one()
    assert r.connection.events == ["pause", "resume"]


def test_the_end_commits_after_the_last_write_and_says_upload_done():
    r, sink = receiver()
    r.data(b"ab")
    r.end(2, "f" * 64)
    assert sink.committed is None
    sink.finish_one()
    assert sink.committed == (2, "f" * 64)
    assert r.connection.events == ["upload_done"]
    assert r.done.result["size"] == 2


def test_a_failed_write_aborts_and_tells_hpcd_why():
    r, sink = receiver()
    r.data(b"ab")
    sink.pending.pop(0).errback(OSError(28, "No space left on device"))
    assert sink.aborted
    assert r.connection.events == ["file_error", "close"]
    failures = []
    r.done.addErrback(failures.append)
    assert "No space left" in failures[0].getErrorMessage()


def test_a_connection_lost_before_the_end_removes_the_partial_file():
    r, sink = receiver()
    r.data(b"ab")
    r.lost("1006 gone")
    assert sink.aborted
    r.done.addErrback(lambda f: None)
