"""hpcd's sessions stamp (hpcd.stamp) and Django's reading of it
(djangoapp.ipc.sessions_stamp): the same file, in one process (flock locks
belong to open files, so hpcd's lock and Django's probe meet here too)."""

import fcntl
import os

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from djangoapp import ipc
from hpcd.clusters import ClusterManager
from hpcd.stamp import FORMAT, SessionsStamp


@pytest.fixture
def socket_path(tmp_path, settings):
    path = str(tmp_path / "hpcd.sock")
    settings.HPC_IPC_UNIX_SOCKET = path
    yield path
    ipc._close_stamp()


def test_the_stamp_is_a_locked_file_beside_the_socket_that_moves_on_each_bump(socket_path):
    stamp = SessionsStamp(socket_path)
    stamp.open(0o660)
    path = socket_path + ".stamp"
    assert os.stat(path).st_mode & 0o777 == 0o640
    with open(path, "rb") as f:
        assert FORMAT.unpack(f.read()) == (stamp.value,)
        with pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    first = stamp.value
    stamp.bump()
    with open(path, "rb") as f:
        assert FORMAT.unpack(f.read()) == (first + 1,)
    stamp.close()
    assert not os.path.exists(path)


def test_django_reads_the_stamp_while_hpcd_holds_it(socket_path):
    assert ipc.sessions_stamp() is None  # no hpcd
    stamp = SessionsStamp(socket_path)
    stamp.open()
    assert ipc.sessions_stamp() == stamp.value
    stamp.bump()
    assert ipc.sessions_stamp() == stamp.value
    stamp.close()
    assert ipc.sessions_stamp() is None


def test_a_stamp_left_by_a_dead_hpcd_is_not_believed(socket_path):
    """kill -9 leaves the file; the lock goes with the process."""
    stamp = SessionsStamp(socket_path)
    stamp.open()
    assert ipc.sessions_stamp() == stamp.value
    fcntl.flock(stamp._fd, fcntl.LOCK_UN)  # as if hpcd died
    assert ipc.sessions_stamp() is None


def test_a_restarted_hpcds_new_stamp_is_found_and_starts_elsewhere(socket_path):
    old = SessionsStamp(socket_path)
    old.open()
    assert ipc.sessions_stamp() == old.value
    fcntl.flock(old._fd, fcntl.LOCK_UN)  # the old one died...
    new = SessionsStamp(socket_path)
    new.open()  # ...and a new one put its file in place
    assert ipc.sessions_stamp() == new.value != old.value
    old.close()  # not the new one's file
    assert ipc.sessions_stamp() == new.value
    new.close()


class Store:
    def set_cluster_state(self, cluster_id, online, detail, resume_ttl=None):
        return defer.succeed(None)

    def clusters(self):
        return defer.succeed([])  # the cluster was removed meanwhile


class Settings:
    HPC_AGENT_RESUME_TOKEN_TTL_SECONDS = 3600.0


class Session:
    cluster_id = 3
    refusal = None

    def __init__(self):
        self.closed = []

    def close(self, code, reason):
        self.closed.append(code)


def test_the_cluster_manager_moves_the_stamp_whenever_a_session_comes_or_goes():
    manager = ClusterManager(Clock(), Store(), None, Settings(), lambda: "ws://x")
    moves = []
    manager.on_sessions_changed = lambda: moves.append(len(manager.sessions))
    session = Session()
    manager.agent_hello(session)
    assert moves == [1]
    manager.agent_ready(session)  # removed meanwhile: closed at once
    assert moves == [1, 1] and session.closed
    manager.agent_lost(session)
    assert moves == [1, 1, 0]
