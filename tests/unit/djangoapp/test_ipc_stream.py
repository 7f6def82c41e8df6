"""Streaming a file from hpcd into a Django response (djangoapp.ipc.open_stream):
every byte and then hpcd's trailer, or an error; never a stalled worker."""

import hashlib
import os
import socket
import struct
import tempfile
import threading
import time

import pytest
from twisted.protocols import amp

from djangoapp import ipc
from djangoapp.protocol import TRAILER_OK, FetchFile, HpcdError


def _read_box(conn):
    """One AMP box from ``conn``: {key: value}."""
    def exact(n):
        data = b""
        while len(data) < n:
            data += conn.recv(n - len(data))
        return data

    box = {}
    while True:
        n = struct.unpack("!H", exact(2))[0]
        if n == 0:
            return box
        key = exact(n)
        box[key] = exact(struct.unpack("!H", exact(2))[0])


class FakeFileServer:
    """Answers one FetchFile with ``size``, then sends ``parts`` (bytes, or a
    number of seconds to sleep), then closes."""

    def __init__(self, path, size, parts):
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(1)
        self.size, self.parts = size, parts
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        try:
            tag = _read_box(conn)[b"_ask"]
            conn.sendall(amp.AmpBox(_answer=tag, size=str(self.size).encode(),
                                    name=b"out.txt").serialize())
            for part in self.parts:
                if isinstance(part, (int, float)):
                    time.sleep(part)
                else:
                    conn.sendall(part)
        except OSError:
            pass
        finally:
            conn.close()
            self.listener.close()


@pytest.fixture
def socket_path(settings):
    with tempfile.TemporaryDirectory(prefix="hpc-stream-") as directory:
        path = os.path.join(directory, "hpcd.sock")
        settings.HPC_IPC_UNIX_SOCKET = path
        settings.HPC_IPC_TIMEOUT = 5.0
        yield path


def stream(socket_path, size, parts):
    FakeFileServer(socket_path, size, parts)
    response, chunks = ipc.open_stream(FetchFile, cluster_id=1, job_id=2, path="out.txt")
    assert response["size"] == size
    return chunks


def test_the_bytes_and_a_good_trailer_make_a_complete_file(socket_path):
    body = os.urandom(100_000)
    chunks = stream(socket_path, len(body), [body, TRAILER_OK + hashlib.sha256(body).digest()])
    assert b"".join(chunks) == body


def test_every_byte_without_the_trailer_is_an_error(socket_path):
    body = b"hello"
    chunks = stream(socket_path, len(body), [body])
    with pytest.raises(HpcdError, match="arrived damaged"):
        b"".join(chunks)


def test_a_stream_that_ends_early_is_an_error(socket_path):
    chunks = stream(socket_path, 10, [b"12345"])
    with pytest.raises(HpcdError, match="5 bytes early"):
        b"".join(chunks)


def test_an_impossible_size_is_refused_before_any_byte(socket_path):
    FakeFileServer(socket_path, -5, [])
    with pytest.raises(HpcdError, match="impossible size"):
        ipc.open_stream(FetchFile, cluster_id=1, job_id=2, path="out.txt")


def test_a_trickle_is_aborted(socket_path, settings, monkeypatch):
    settings.HPC_FILE_MIN_BYTES_PER_SECOND = 1000
    monkeypatch.setattr(ipc._RateMeter, "WINDOW", 0.5)
    parts = [b"x", 0.3, b"x", 0.3, b"x", 0.3, b"x"]
    chunks = stream(socket_path, 7, parts)
    started = time.monotonic()
    with pytest.raises(HpcdError, match="bytes/s"):
        b"".join(chunks)
    assert time.monotonic() - started < 5


def test_a_slow_reader_is_not_a_slow_stream(socket_path, settings, monkeypatch):
    settings.HPC_FILE_MIN_BYTES_PER_SECOND = 10_000
    monkeypatch.setattr(ipc._RateMeter, "WINDOW", 0.2)
    settings.HPC_FILE_CONNECTION_CHUNK_SIZE = 1000
    body = os.urandom(5000)
    chunks = stream(socket_path, len(body), [body, TRAILER_OK + hashlib.sha256(body).digest()])
    received = b""
    for chunk in chunks:
        received += chunk
        time.sleep(0.1)  # the browser reads slowly: hpcd's stream is not to blame
    assert received == body


def test_a_stalled_stream_is_aborted_after_one_window_not_the_ipc_timeout(
        socket_path, settings, monkeypatch):
    """A lying agent announces 1 TiB and then sends nothing: the worker is let
    go after one of the rate meter's windows, not after HPC_IPC_TIMEOUT."""
    settings.HPC_IPC_TIMEOUT = 60.0
    settings.HPC_FILE_MIN_BYTES_PER_SECOND = 1000
    monkeypatch.setattr(ipc._RateMeter, "WINDOW", 0.3)
    chunks = stream(socket_path, 2 ** 40, [b"x" * 100, 30])
    errors = []

    def consume():
        try:
            b"".join(chunks)
        except HpcdError as e:
            errors.append(e)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    reader.join(timeout=20)  # far below HPC_IPC_TIMEOUT, far above the window
    assert not reader.is_alive()
    assert "bytes/s" in str(errors[0])
