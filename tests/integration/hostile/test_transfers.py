"""Downloads from an agent that lies (issue 9, item 9): impossible or
contradictory headers, more bytes than announced, a checksum that does not
match, a trickle, a claimed 1 TiB.  The agent is played by hand; Django's
download must fail with an error every time, never deliver a wrong file or
hold a web worker for long."""

import json
import threading
import time


from djangoapp import ipc
from djangoapp.protocol import HpcdError
from harness import RawWebsocket
from integration.spine.test_security import raw_agent


def header(**fields):
    return json.dumps({"type": "file_header", "name": "x.txt", **fields})


def end(size, digest="0" * 64):
    # Whatever digest field hpcd expects, this one is wrong or missing.
    return json.dumps({"type": "file_end", "size": size, "sha256": digest})


LIES = {
    "a negative size": [header(size=-5)],
    "more than the whole file": [header(size=9, total_size=4)],
    "more bytes than announced": [header(size=3), (b"abcdefgh", 0x2)],
    "a checksum that does not match": [header(size=3), (b"abc", 0x2), end(3)],
    "an end before the last byte": [header(size=6), (b"abc", 0x2), end(3)],
    "a trickle": [header(size=1000)] + [("sleep", 0.2), (b"z", 0x2)] * 30,
    "a claimed 1 TiB": [header(size=2 ** 40, total_size=2 ** 40), (b"a" * 1000, 0x2)]
    + [("sleep", 0.2)] * 30,
}


def download(cluster, outcome):
    try:
        response = cluster.fetch_remote_file("x.txt")
        outcome["data"] = b"".join(response.streaming_content)
    except HpcdError as e:
        outcome["error"] = e


def play(port, ws, frames):
    """Answer the next fetch_file like an agent, then send ``frames`` on the
    transfer connection."""
    while True:
        opcode, payload = ws.recv()
        message = json.loads(payload)
        if message.get("type") == "fetch_file":
            break
    ws.send(json.dumps({"type": "reply", "id": message["id"], "ok": True,
                        "result": {"size": 0, "total_size": 0, "mtime": 0}}))
    transfer = RawWebsocket(port, "/file", f"Bearer {message['token']}")
    assert transfer.status == 101
    try:
        for frame in frames:
            if isinstance(frame, tuple) and frame[0] == "sleep":
                time.sleep(frame[1])
            elif isinstance(frame, tuple):
                transfer.send(*frame)
            else:
                transfer.send(frame)
    except (ConnectionError, OSError):
        pass  # hpcd cut the lying agent off
    return transfer


def test_lying_file_streams_fail_the_download(hpcd, port, cluster, settings, monkeypatch):
    settings.HPC_FILE_MIN_BYTES_PER_SECOND = 1000
    monkeypatch.setattr(ipc._RateMeter, "WINDOW", 1.0)  # judge a trickle within 1 s
    ws = raw_agent(port, cluster)
    for lie, frames in LIES.items():
        outcome = {}
        django = threading.Thread(target=download, args=(cluster, outcome), daemon=True)
        django.start()
        transfer = play(port, ws, frames)
        django.join(timeout=20)  # far more than the 1 s rate window, far less than forever
        transfer.close()
        assert not django.is_alive(), f"{lie}: the download is still running"
        assert "error" in outcome, f"{lie}: delivered {outcome.get('data', b'')[:20]!r}"
    ws.close()

