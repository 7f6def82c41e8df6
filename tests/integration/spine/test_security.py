"""What hpcd does with bad credentials and bad input: refuse clearly, never crash."""

import json
import os
import socket

import pytest

from djangoapp import ipc
from djangoapp.models import HpcCluster, HpcJob, JobStatus, WebsocketToken
from harness import RawWebsocket, websocket_port
from hpcd import commands


@pytest.fixture
def port(hpcd):
    return websocket_port(hpcd)


@pytest.fixture
def cluster(db):
    # Its launches fail (no such directory): the tests play the agent.
    return HpcCluster.objects.create(host_name="localhost", client_path="/nonexistent")


def hello(protocol=1):
    return json.dumps({"type": "hello", "protocol": protocol, "agent_version": "test",
                       "scheduler": "x", "hostname": "h", "nvx": True})


def raw_agent(port, cluster):
    """A hand-driven agent connection of ``cluster``, greeted and welcomed."""
    _, secret = WebsocketToken.objects.issue(cluster.pk, "agent", 60)
    ws = RawWebsocket(port, "/agent", f"Bearer {secret}")
    ws.send(hello())
    assert json.loads(ws.recv()[1])["type"] == "welcome"
    return ws


def test_connections_without_a_valid_token_are_refused(hpcd, port, cluster):
    assert RawWebsocket(port, "/agent").status == 401
    assert RawWebsocket(port, "/agent", "Bearer").status == 401
    assert RawWebsocket(port, "/agent", "Basic dXNlcjpwYXNz").status == 401
    assert RawWebsocket(port, "/agent", "Bearer not-a-token").status == 403
    assert RawWebsocket(port, "/agent", "Bearer " + "x" * 5000).status in (400, 403)
    assert RawWebsocket(port, "/elsewhere", "Bearer x").status == 404
    _, secret = WebsocketToken.objects.issue(cluster.pk, "file", 60)
    # A file token does not open a control connection.
    assert RawWebsocket(port, "/agent", f"Bearer {secret}").status == 403


def test_tokens_are_single_use_hashed_and_expire(hpcd, port, cluster):
    row, secret = WebsocketToken.objects.issue(cluster.pk, "agent", 60)
    assert secret not in row.token_hash and len(secret) >= 40
    first = RawWebsocket(port, "/agent", f"Bearer {secret}")
    assert first.status == 101
    # Checked at the upgrade, spent by the first frame: a second connection
    # presenting it before then is upgraded, but only one is ever taken in.
    second = RawWebsocket(port, "/agent", f"Bearer {secret}")
    assert second.status == 101
    first.send(hello())
    assert json.loads(first.recv()[1])["type"] == "welcome"
    second.send(hello())
    opcode, payload = second.recv()
    assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 4004  # closed: spent
    assert RawWebsocket(port, "/agent", f"Bearer {secret}").status == 403  # replayed
    first.close()
    second.close()
    row, secret = WebsocketToken.objects.issue(cluster.pk, "agent", 60)
    WebsocketToken.objects.filter(pk=row.pk).update(expires=row.created)
    assert RawWebsocket(port, "/agent", f"Bearer {secret}").status == 403  # expired


def test_malformed_frames_are_answered_and_the_connection_survives(hpcd, port, cluster):
    _, secret = WebsocketToken.objects.issue(cluster.pk, "agent", 60)
    ws = RawWebsocket(port, "/agent", f"Bearer {secret}")
    assert ws.status == 101
    bad_frames = [b"not json", b"[1, 2]", b'{"no": "type"}', b'{"type": "launch_missiles"}',
                  b'{"type": "update", "seq": "one"}', b'{"type": NaN}',
                  b'[' * 100000]
    for frame in bad_frames:
        ws.send(frame)
        opcode, payload = ws.recv()
        answer = json.loads(payload)
        assert answer["type"] == "error", (frame, answer)
        assert answer["message"]
    ws.send(b"\x00\x01binary", opcode=0x2)
    assert json.loads(ws.recv()[1])["code"] == "bad_frame"
    ws.send(json.dumps({"type": "update", "seq": 1, "job": 1, "status": 500, "detail": "",
                        "at": 0, "scheduler_id": None}))
    assert json.loads(ws.recv()[1])["code"] == "not_ready"
    # Still served: a proper hello is welcomed.
    ws.send(hello())
    welcome = json.loads(ws.recv()[1])
    assert welcome["type"] == "welcome" and welcome["resume_token"]
    # Invalid UTF-8 in a text frame is a websocket protocol violation: the
    # RFC requires failing the connection; the daemon itself carries on.
    ws.send(b"\xff\xfe")
    try:
        opcode, _ = ws.recv()
    except OSError:
        opcode = 0x8
    assert opcode == 0x8
    ws.close()
    assert RawWebsocket(port, "/agent", "Bearer x").status == 403


def test_an_agent_cannot_change_another_clusters_jobs(hpcd, port, cluster):
    other = HpcCluster.objects.create(host_name="localhost", client_path="/x")
    job = HpcJob.objects.create(cluster=other, job_status=JobStatus.RUNNING)
    ws = raw_agent(port, cluster)
    ws.send(json.dumps({"type": "update", "seq": 7, "job": job.pk, "status": 500,
                        "detail": "", "at": 0, "scheduler_id": None}))
    ack = json.loads(ws.recv()[1])
    assert ack == {"type": "ack", "seqs": [7]}
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING


def test_a_cut_off_message_on_the_unix_socket_costs_nothing(hpcd, cluster):
    for garbage in (b"\x00\x08_command\x00", b"\xff" * 10, b"\x00\x05_ask"):
        s = socket.socket(socket.AF_UNIX)
        s.connect(hpcd.socket_path)
        s.sendall(garbage)
        s.close()
    assert cluster.is_connected() is None  # hpcd still answers
    ipc.call(commands.IsClusterOnline, cluster_id=cluster.pk)
    assert hpcd.process.poll() is None


def test_the_unix_socket_is_owner_only(hpcd):
    assert os.stat(hpcd.socket_path).st_mode & 0o777 == 0o600


def test_unknown_clusters_and_offline_clusters_give_clear_errors(hpcd, cluster):
    with pytest.raises(commands.NotFound):
        HpcCluster(pk=999999, host_name="x", client_path="/x").try_connect()
    with pytest.raises(commands.ClusterOffline, match="has no connected agent"):
        cluster.fetch_remote_file_list("/")
    with pytest.raises(commands.ClusterOffline):
        cluster.fetch_remote_file("/etc/passwd")


def test_an_agent_of_a_disabled_cluster_is_sent_away(hpcd, port, cluster):
    HpcCluster.objects.filter(pk=cluster.pk).update(enabled=False)
    ws = raw_agent(port, cluster)
    opcode, payload = ws.recv()
    assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 4002


def test_an_agent_speaking_another_protocol_version_is_told_so(hpcd, port, cluster):
    _, secret = WebsocketToken.objects.issue(cluster.pk, "agent", 60)
    ws = RawWebsocket(port, "/agent", f"Bearer {secret}")
    ws.send(hello(protocol=99))
    opcode, payload = ws.recv()
    assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 4003
    assert b"upgrade the agent" in payload


def test_a_late_report_never_turns_a_cancelled_job_into_a_completed_one(hpcd, port,
                                                                      cluster):
    job = HpcJob.objects.create(cluster=cluster, job_status=JobStatus.CANCELLED)
    ws = raw_agent(port, cluster)
    for seq, status in enumerate((JobStatus.RUNNING, JobStatus.COMPLETED), start=1):
        ws.send(json.dumps({"type": "update", "seq": seq, "job": job.pk, "status": status,
                            "detail": "", "at": 0, "scheduler_id": "7"}))
        assert json.loads(ws.recv()[1]) == {"type": "ack", "seqs": [seq]}
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert not job.history().exists()
