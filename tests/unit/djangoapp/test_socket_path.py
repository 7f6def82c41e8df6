"""Where Django and hpcd meet (djangoapp.ipc.socket_path) and when that place
is safe (socket_directory_problem)."""

import os

from djangoapp import ipc


def test_the_default_socket_lives_under_the_project(settings):
    settings.HPC_IPC_UNIX_SOCKET = None
    settings.BASE_DIR = "/srv/mysite"
    assert ipc.socket_path() == "/srv/mysite/run/hpcd.sock"
    del settings.BASE_DIR
    assert ipc.socket_path() == "/run/hpcd/hpcd.sock"
    settings.HPC_IPC_UNIX_SOCKET = "/var/lib/hpcd/s.sock"
    assert ipc.socket_path() == "/var/lib/hpcd/s.sock"


def test_a_private_directory_is_safe(tmp_path):
    private = tmp_path / "run"
    private.mkdir(mode=0o700)
    assert ipc.socket_directory_problem(str(private / "hpcd.sock")) is None


def test_directories_others_can_write_are_not(tmp_path):
    for mode in (0o1777, 0o770, 0o702):
        shared = tmp_path / f"shared-{mode:o}"
        shared.mkdir()
        os.chmod(shared, mode)
        problem = ipc.socket_directory_problem(str(shared / "hpcd.sock"))
        assert "writable by other users" in problem, mode


def test_a_parent_anyone_can_rename_in_makes_it_unsafe(tmp_path):
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    os.chmod(open_parent, 0o777)  # no sticky bit: anyone may rename run/
    (open_parent / "run").mkdir(mode=0o700)
    problem = ipc.socket_directory_problem(str(open_parent / "run" / "hpcd.sock"))
    assert "without the sticky bit" in problem


def test_a_missing_directory_says_how_to_make_one(tmp_path):
    problem = ipc.socket_directory_problem(str(tmp_path / "nope" / "hpcd.sock"))
    assert "does not exist" in problem and "RuntimeDirectory=hpcd" in problem


def test_a_peer_of_an_untrusted_user_is_refused(tmp_path, settings, monkeypatch):
    import socket

    import pytest

    path = str(tmp_path / "hpcd.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()  # connect() completes from the backlog: no accept needed
    monkeypatch.setattr(ipc, "_peer_uid", lambda sock: 4242)
    with pytest.raises(ipc.HpcdUnavailable, match="uid 4242"):
        ipc._Connection(path, 5)
    listener.close()
