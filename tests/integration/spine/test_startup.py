"""hpcd refuses to start in surroundings that cannot work or are unsafe, at
once, with a non-zero exit and one line saying what to do; and its socket
gets the configured mode and group."""

import grp
import os
import socket
import stat
import subprocess
import sys

import pytest

from harness import Hpcd


def failed_start(workdir, socket_path, **env):
    """Run hpcd expecting it to exit; returns (exit code, its stderr and log)."""
    daemon = Hpcd(workdir, extra_env={"HPC_IPC_UNIX_SOCKET": socket_path, **env})
    environment = daemon.environment()
    environment["HPC_IPC_UNIX_SOCKET"] = socket_path
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    process = subprocess.run(
        [twistd, "--nodaemon", "--pidfile=", f"--logfile={daemon.log_path}", "hpcd"],
        env=environment, cwd=workdir, capture_output=True, text=True, timeout=60)
    return process.returncode, process.stderr + daemon.log()


def test_a_missing_socket_directory_stops_the_start(transactional_db, short_tmp):
    code, output = failed_start(short_tmp, os.path.join(short_tmp, "nowhere", "hpcd.sock"))
    assert code != 0
    assert "does not exist" in output and "nowhere" in output
    assert "RuntimeDirectory=hpcd" in output


def test_a_world_writable_socket_directory_is_refused(transactional_db, short_tmp):
    shared = os.path.join(short_tmp, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)  # like /tmp
    code, output = failed_start(short_tmp, os.path.join(shared, "hpcd.sock"))
    assert code != 0 and "writable by other users" in output


def test_a_port_in_use_stops_the_start(transactional_db, short_tmp):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output = failed_start(short_tmp, os.path.join(short_tmp, "hpcd.sock"),
                                    HPC_WEBSOCKET_ENDPOINT=f"tcp:{port}:interface=127.0.0.1")
    assert code != 0 and "cannot listen for agents" in output


def test_a_second_hpcd_on_the_same_socket_names_the_first(hpcd, short_tmp):
    other = os.path.join(short_tmp, "second")
    os.mkdir(other)
    code, output = failed_start(other, hpcd.socket_path)
    assert code != 0
    assert f"another hpcd (pid {hpcd.process.pid})" in output
    # The first one is unharmed.
    from djangoapp.models import HpcCluster
    assert HpcCluster(pk=1).is_connected() is None  # answered, not an error


def test_the_socket_gets_the_configured_mode_and_group(transactional_db, short_tmp,
                                                       settings):
    group = grp.getgrgid(os.getgid()).gr_name if os.getgid() else "nogroup"
    daemon = Hpcd(short_tmp, extra_env={"HPC_IPC_SOCKET_MODE": "0o660",
                                        "HPC_IPC_SOCKET_GROUP": group})
    daemon.start()
    try:
        info = os.stat(daemon.socket_path)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == grp.getgrnam(group).gr_gid
        # The sessions stamp: the same group, read access only.
        info = os.stat(daemon.socket_path + ".stamp")
        assert stat.S_IMODE(info.st_mode) == 0o640
        assert info.st_gid == grp.getgrnam(group).gr_gid
    finally:
        daemon.stop()
    # The lock is a symlink to a pid: exists() would follow it and say False.
    assert not os.path.lexists(daemon.socket_path + ".lock")
    assert not os.path.exists(daemon.socket_path + ".stamp")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a listener as another user")
def test_django_refuses_a_socket_bound_by_another_user(tmp_path, settings):
    import tempfile

    from djangoapp import ipc
    from djangoapp.protocol import IsClusterOnline

    base = tempfile.mkdtemp(prefix="hpc-squat-")
    try:
        os.chmod(base, 0o777)  # a shared directory, as /tmp without the sticky bit
        path = os.path.join(base, "hpcd.sock")
        squatter = subprocess.Popen(
            [sys.executable, "-c", (
                "import os, socket, sys, time\n"
                "os.setgid(65534); os.setuid(65534)\n"
                "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()\n"
                "print('ready', flush=True)\n"
                "c, _ = s.accept(); time.sleep(5)\n"), path],
            stdout=subprocess.PIPE, text=True)
        assert squatter.stdout.readline().strip() == "ready"
        settings.HPC_IPC_UNIX_SOCKET = path
        ipc._local.__dict__.clear()
        with pytest.raises(ipc.HpcdUnavailable, match="runs as uid 65534"):
            ipc.call(IsClusterOnline, cluster_id=1)
        squatter.kill()
        squatter.wait()
    finally:
        import shutil
        shutil.rmtree(base, ignore_errors=True)


def test_a_clean_stop_marks_clusters_offline(local_cluster, hpcd):
    from djangoapp.models import HpcCluster
    from harness import wait_for

    # is_connected() answers from hpcd's memory; the flag is stored a moment later.
    wait_for(lambda: HpcCluster.objects.get(pk=local_cluster.pk).online,
             what="hpcd to store the cluster as online")
    hpcd.stop()
    assert not HpcCluster.objects.get(pk=local_cluster.pk).online
