"""A small blocking AMP client for Django processes to talk to hpcd.

Django views are synchronous and must not run a reactor, so this speaks
AMP over a plain Unix socket, reusing Twisted's own ``Command`` classes to
build and parse boxes.  One connection per thread, opened on first use and
reopened once after an hpcd restart.  Errors hpcd reports arrive as the
exception classes in :mod:`djangoapp.protocol`; an unreachable or silent hpcd
raises :class:`HpcdUnavailable`.

The socket is trusted only as far as its directory is: hpcd refuses to
listen in a directory other users can write (where one of them could bind
the path first and receive Django's commands), and before sending anything
this client checks that the process at the other end (``SO_PEERCRED``) runs
as the owner of that directory, as root, or as this process's own user.
"""

import fcntl
import hashlib
import itertools
import json
import mmap
import os
import socket
import stat
import struct
import threading
import time

from twisted.protocols import amp

from djangoapp.conf import hpc_settings
from djangoapp.protocol import (ERROR_CLASSES, TRAILER_OK, TRAILER_SIZE, UPLOAD_CHUNK_HEADER,
                                HpcdError, TooLarge)

__all__ = ["call", "tell", "open_stream", "send_stream", "HpcdUnavailable", "HpcdError"]


class HpcdUnavailable(HpcdError):
    """hpcd is not running, or did not answer in time."""


# -- where the socket is, and whether to trust it ---------------------------------

def socket_path():
    """``HPC_IPC_UNIX_SOCKET``, or its default: ``<BASE_DIR>/run/hpcd.sock``
    when the Django settings define ``BASE_DIR`` (as ``startproject`` writes
    them), else ``/run/hpcd/hpcd.sock`` (systemd's ``RuntimeDirectory=hpcd``)."""
    from django.conf import settings

    path = hpc_settings.HPC_IPC_UNIX_SOCKET
    if path:
        return str(path)
    base = getattr(settings, "BASE_DIR", None)
    if base:
        return os.path.join(str(base), "run", "hpcd.sock")
    return "/run/hpcd/hpcd.sock"


def socket_directory_problem(path):
    """Why the directory of socket ``path`` is unsafe for it, or None.

    Safe: it exists, only its owner may write it, and no directory above it
    lets others rename it (writable by all without the sticky bit).
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return (f"directory {directory} does not exist; create it for the user hpcd runs "
                "as (writable by that user only), or use RuntimeDirectory=hpcd under systemd")
    except OSError as e:
        return f"directory {directory} cannot be examined: {e.strerror}"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"directory {directory} is writable by other users (mode "
                f"{stat.S_IMODE(info.st_mode):04o}), so one of them could put their own "
                "socket in hpcd's place; use a directory only hpcd's user can write, "
                "e.g. /run/hpcd (RuntimeDirectory=hpcd under systemd)")
    parent = directory
    while parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
        mode = os.stat(parent).st_mode
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            return (f"directory {parent}, above {directory}, is writable by all users "
                    "without the sticky bit, so one of them could replace the socket's "
                    "directory; move the socket elsewhere")
    return None


def _trusted_uids(path):
    uids = {0, os.getuid()}
    if socket_directory_problem(path) is None:
        uids.add(os.stat(os.path.dirname(os.path.abspath(path))).st_uid)
    return uids


def _peer_uid(sock):
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


_local = threading.local()
_tags = itertools.count(1)
_LENGTH = struct.Struct("!H")  # AMP's key and value lengths


class _Connection:
    def __init__(self, path, timeout):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise HpcdUnavailable(
                f"cannot reach hpcd at {path} ({e.strerror or e}); is `twistd hpcd` running "
                "with the same HPC_IPC_UNIX_SOCKET?") from None
        peer = _peer_uid(self.sock)
        if peer not in _trusted_uids(path):
            self.sock.close()
            raise HpcdUnavailable(
                f"the process listening at {path} runs as uid {peer}, not as the owner of "
                "the socket's directory; refusing to talk to it (is the directory safe? "
                "see manage.py check)")
        self._buffer = bytearray()
        self.pid = os.getpid()

    def close(self):
        self.sock.close()

    def send_box(self, box):
        self.sock.sendall(box.serialize())

    def read_box(self):
        """The next box.  Each key and value is parsed once, as soon as it
        has arrived whole (one pass over what one recv() brought, instead of
        a call per field)."""
        box = amp.AmpBox()
        buffer = self._buffer
        while True:
            position, end = 0, len(buffer)
            while end - position >= 2:
                (key_length,) = _LENGTH.unpack_from(buffer, position)
                if key_length == 0:
                    del buffer[:position + 2]
                    return box
                value_at = position + 4 + key_length
                if end < value_at:
                    break
                (value_length,) = _LENGTH.unpack_from(buffer, value_at - 2)
                if end < value_at + value_length:
                    break
                box[bytes(buffer[position + 2:value_at - 2])] = bytes(
                    buffer[value_at:value_at + value_length])
                position = value_at + value_length
            del buffer[:position]
            chunk = self.sock.recv(65536)
            if not chunk:
                # The request went out and hpcd may have acted on it: not a
                # dead cached connection, so call() must not send it again.
                raise HpcdUnavailable("hpcd closed the connection before answering; "
                                      "the command may or may not have been carried out")
            buffer += chunk

    def read_raw(self, limit):
        """Up to ``limit`` bytes of the raw stream after a protocol switch."""
        if self._buffer:
            data = bytes(self._buffer[:limit])
            del self._buffer[:limit]
            return data
        return self.sock.recv(limit)


def _ask(connection, command, arguments):
    box = command.makeArguments(arguments, None)
    tag = str(next(_tags)).encode()
    box[b"_command"] = command.commandName
    box[b"_ask"] = tag
    connection.send_box(box)
    answer = connection.read_box()
    if b"_error" in answer:
        code = answer.get(b"_error_code", b"UNKNOWN")
        text = answer.get(b"_error_description", b"").decode("utf-8", "replace")
        raise ERROR_CLASSES.get(code, HpcdError)(text or code.decode("ascii", "replace"))
    return command.parseResponse(answer, None)


#: How much longer than hpcd's wait for an agent (HPC_AGENT_REQUEST_TIMEOUT)
#: Django waits for hpcd on a command marked ``waits_for_agent``: hpcd's own
#: Timeout ("the agent of cluster 3 did not answer ... within 60 s") then
#: arrives first, instead of "hpcd did not answer".
AGENT_MARGIN_SECONDS = 10.0


def _timeout(command=None):
    """Seconds to wait for hpcd's answer to ``command``: HPC_IPC_TIMEOUT, or,
    for a command that waits for the agent, longer than hpcd waits for it."""
    timeout = float(hpc_settings.HPC_IPC_TIMEOUT)
    if getattr(command, "waits_for_agent", False):
        timeout = max(timeout, float(hpc_settings.HPC_AGENT_REQUEST_TIMEOUT)
                      + AGENT_MARGIN_SECONDS)
    return timeout


def call(command, /, timeout=None, **arguments):
    """Send one command and return its response as a dict.

    ``timeout`` (seconds) replaces ``HPC_IPC_TIMEOUT`` for this call, for
    commands that are slow by nature; without it, a command that waits for
    the agent gets longer than hpcd waits (:data:`AGENT_MARGIN_SECONDS`).  A
    dead cached connection (hpcd restarted) is replaced once.  A command whose
    answer was lost mid-way is not repeated: it may have been acted on.
    """
    path = socket_path()
    connection = _thread_connection(path)
    timeout = timeout or _timeout(command)
    for attempt in (1, 2):
        if connection is None:
            connection = _new_connection(path, _timeout())
        try:
            connection.sock.settimeout(timeout)
            return _ask(connection, command, arguments)
        except HpcdUnavailable:
            _drop(connection)
            raise
        except HpcdError:
            raise
        except (BrokenPipeError, ConnectionResetError) as e:
            _drop(connection)
            connection = None
            # Sending into a connection hpcd closed before (it restarted)
            # fails before anything was acted on: try once more, fresh.
            if attempt == 2:
                raise HpcdUnavailable(f"hpcd closed the connection: {e}") from None
        except socket.timeout:
            _drop(connection)
            raise HpcdUnavailable(f"hpcd did not answer within {timeout:g} s") from None
        except OSError as e:
            _drop(connection)
            raise HpcdUnavailable(f"talking to hpcd failed: {e}") from None


def tell(command, /, timeout=None, **arguments):
    """Send one command that wants no answer (``requiresAnswer = False``)
    and return once it is written: no wait for hpcd to act on it.

    Raises :class:`HpcdUnavailable` when hpcd cannot be reached or its socket
    accepts nothing for ``timeout`` seconds (HPC_IPC_TIMEOUT).  A cached
    connection that hpcd closed (it restarted) is noticed before writing and
    replaced, so the command is not written into a dead socket.
    """
    timeout = timeout or _timeout()
    path = socket_path()
    connection = _thread_connection(path)
    if connection is not None and _closed_by_peer(connection.sock):
        _drop(connection)
        connection = None
    box = command.makeArguments(arguments, None)
    box[b"_command"] = command.commandName
    if connection is None:
        connection = _new_connection(path, timeout)
    try:
        connection.sock.settimeout(timeout)
        connection.send_box(box)
    except socket.timeout:
        _drop(connection)
        raise HpcdUnavailable(f"hpcd accepted nothing within {timeout:g} s") from None
    except OSError as e:
        _drop(connection)
        raise HpcdUnavailable(f"talking to hpcd failed: {e}") from None


def _thread_connection(path):
    """This thread's cached connection to ``path``, if it may be used."""
    connection = getattr(_local, "connection", None)
    if connection is not None and (connection.pid != os.getpid()
                                   or getattr(_local, "path", None) != path):
        # Another socket path, or a connection inherited across fork() (a
        # pre-forking server): the parent's socket must not be shared.
        connection.close()
        connection = _local.connection = None
    return connection


def _new_connection(path, timeout):
    """A new connection to ``path``, cached as this thread's."""
    connection = _Connection(path, timeout)
    _local.connection, _local.path = connection, path
    return connection


def _drop(connection):
    """Close ``connection`` and forget it as this thread's."""
    connection.close()
    _local.connection = None


def _closed_by_peer(sock):
    """Whether the other end closed ``sock`` (hpcd sends nothing unasked,
    so a readable idle connection is one at its end of file).  Leaves
    ``sock`` non-blocking: the caller sets its timeout."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


# -- hpcd's sessions stamp (hpcd.stamp) -------------------------------------------

#: The stamp's layout: one unsigned 64-bit number, big-endian (hpcd.stamp writes it).
STAMP_FORMAT = struct.Struct("!Q")
_stamp_lock = threading.Lock()
_stamp_file = {}  # "path", "fd", "map": the stamp file this process has open


def stamp_path(socket):
    """Where hpcd keeps its sessions stamp: beside its socket."""
    return socket + ".stamp"


def sessions_stamp():
    """hpcd's sessions stamp, or None: no hpcd runs (or one without a stamp).

    While it reads the same, answers hpcd gave about its live sessions still
    hold (see :mod:`hpcd.stamp`).  Costs a ``flock`` probe and an 8-byte read:
    the file is mapped once per process and reopened when hpcd restarted.
    """
    path = stamp_path(socket_path())
    with _stamp_lock:
        for attempt in (1, 2):
            if _stamp_file.get("path") != path:
                if not _open_stamp(path):
                    return None
            try:
                fcntl.flock(_stamp_file["fd"], fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return STAMP_FORMAT.unpack_from(_stamp_file["map"])[0]  # hpcd holds it: alive
            except OSError:
                pass
            else:
                fcntl.flock(_stamp_file["fd"], fcntl.LOCK_UN)
            # No one holds it: the hpcd that wrote it is gone.  A new one
            # may have put its own in place: look once more.
            _close_stamp()
        return None


def _open_stamp(path):
    _close_stamp()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        mapped = mmap.mmap(fd, STAMP_FORMAT.size, prot=mmap.PROT_READ)
    except (OSError, ValueError):  # too short: not a stamp
        os.close(fd)
        return False
    _stamp_file.update(path=path, fd=fd, map=mapped)
    return True


def _close_stamp():
    if "fd" in _stamp_file:
        _stamp_file["map"].close()
        os.close(_stamp_file["fd"])
    _stamp_file.clear()


def open_stream(command, /, **arguments):
    """Send a protocol-switching command on a connection of its own.

    Returns ``(response, chunks)`` where ``chunks`` yields the raw bytes that
    follow (exactly ``response["size"]`` of them).  After the last one it
    reads hpcd's trailer, and raises :class:`HpcdError` instead of finishing
    when the trailer is missing (the file arrived damaged), when the stream
    ends early, or when it arrives slower than ``HPC_FILE_MIN_BYTES_PER_SECOND``
    (time spent waiting for hpcd only: a slow reader of the response does not
    count), so a stalled transfer cannot hold a web worker for long.
    """
    connection = _Connection(socket_path(), _timeout())
    try:
        connection.sock.settimeout(_timeout(command))
        response = _ask(connection, command, arguments)
    except HpcdError:
        connection.close()
        raise
    except OSError as e:
        connection.close()
        raise HpcdUnavailable(f"talking to hpcd failed: {e}") from None
    if not isinstance(response.get("size"), int) or response["size"] < 0:
        connection.close()
        raise HpcdError(f"hpcd announced an impossible size ({response.get('size')!r})")
    chunk_size = int(hpc_settings.HPC_FILE_CONNECTION_CHUNK_SIZE)
    meter = _RateMeter(float(hpc_settings.HPC_FILE_MIN_BYTES_PER_SECOND))
    # The bytes come at hpcd's pace, not the agent's.  With a minimum rate, a
    # silence is judged after one of the meter's windows, like a trickle, not
    # after HPC_IPC_TIMEOUT (a stalled agent would hold the worker that long).
    connection.sock.settimeout(min(_timeout(), meter.WINDOW) if meter.judges else _timeout())

    def read(limit):
        while True:
            started = time.monotonic()
            try:
                data = connection.read_raw(limit)
            except socket.timeout as e:
                if not meter.judges:
                    raise HpcdError(f"file transfer failed: {e}") from None
                meter.add(0, time.monotonic() - started)  # raises once too slow
                continue
            except OSError as e:
                raise HpcdError(f"file transfer failed: {e}") from None
            meter.add(len(data), time.monotonic() - started)
            return data

    def chunks():
        remaining = response["size"]
        try:
            while remaining > 0:
                data = read(min(chunk_size, remaining))
                if not data:
                    raise HpcdError(f"file transfer ended {remaining} bytes early")
                remaining -= len(data)
                yield data
            trailer = b""
            while len(trailer) < TRAILER_SIZE:
                data = read(TRAILER_SIZE - len(trailer))
                if not data:
                    break
                trailer += data
            if not trailer.startswith(TRAILER_OK) or len(trailer) != TRAILER_SIZE:
                raise HpcdError("the file arrived damaged: hpcd found its bytes did not match "
                                "the agent's checksum, or the transfer was cut off at its end")
        finally:
            connection.close()

    return response, chunks()


class _RateMeter:
    """Fails a stream that, over each 10 s of waiting for it, brings fewer
    than ``minimum`` bytes per second."""

    WINDOW = 10.0

    def __init__(self, minimum):
        self._minimum = minimum
        self._waited = 0.0
        self._got = 0
        self.judges = minimum > 0  # 0 turns the check off

    def add(self, nbytes, waited):
        self._waited += waited
        self._got += nbytes
        if self._waited >= self.WINDOW:
            rate = self._got / self._waited
            if rate < self._minimum:
                raise HpcdError(f"the file arrived at {rate:.0f} bytes/s, below "
                                f"HPC_FILE_MIN_BYTES_PER_SECOND ({self._minimum:g}); "
                                "transfer aborted")
            self._waited, self._got = 0.0, 0


def send_stream(command, fileobj, /, limit=None, timeout=None, **arguments):
    """Send ``fileobj`` after a protocol-switching command (``UploadFile``).

    Reads it in chunks of ``HPC_FILE_CONNECTION_CHUNK_SIZE`` and sends each
    as soon as hpcd takes it (a blocking ``sendall``: when the agent writes
    slowly, hpcd stops reading and this waits), then the end with the
    SHA-256 of everything sent.  Returns hpcd's answer, ``{"size",
    "sha256", "mtime"}`` once the file is in place, and raises its error
    otherwise.  More than ``limit`` bytes raise :class:`TooLarge` before
    any byte beyond it is sent.  ``timeout``: seconds to wait for hpcd at
    each step (``HPC_IPC_TIMEOUT`` by default).
    """
    header = struct.Struct(UPLOAD_CHUNK_HEADER)
    connection = _Connection(socket_path(), _timeout())
    try:
        connection.sock.settimeout(timeout or _timeout(command))
        _ask(connection, command, arguments)
    except HpcdError:
        connection.close()
        raise
    except OSError as e:
        connection.close()
        raise HpcdUnavailable(f"talking to hpcd failed: {e}") from None
    chunk_size = int(hpc_settings.HPC_FILE_CONNECTION_CHUNK_SIZE)
    digest = hashlib.sha256()
    size = 0
    def send(*parts):
        try:
            for part in parts:
                connection.sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            return False  # hpcd gave up on the upload; its answer says why
        except (socket.timeout, OSError) as e:
            raise HpcdError(f"sending the file to hpcd failed: {e}") from None
        return True

    try:
        while True:
            # Errors reading fileobj are the caller's, and reach it as they
            # are; hpcd sees the connection close and the agent drops the
            # partial file.
            data = fileobj.read(chunk_size)
            if not data:
                send(header.pack(0) + digest.digest())
                break
            size += len(data)
            if limit is not None and size > limit:
                raise TooLarge(f"the file is larger than the upload limit of {limit} "
                               "bytes (HPC_UPLOAD_MAX_BYTES)")
            digest.update(data)
            if not send(header.pack(len(data)), data):
                break
        answer = _read_line(connection)
    finally:
        connection.close()
    if answer is None:
        raise HpcdError("hpcd closed the upload without an answer; the file was not put in place")
    if not answer.get("ok"):
        code = str(answer.get("error", "")).encode("ascii", "replace")
        raise ERROR_CLASSES.get(code, HpcdError)(answer.get("message") or "the upload failed")
    if (answer.get("size"), answer.get("sha256")) != (size, digest.hexdigest()):
        raise HpcdError("hpcd reported another size or checksum than was sent")
    return {"size": answer["size"], "sha256": answer["sha256"], "mtime": answer["mtime"]}


def _read_line(connection):
    """hpcd's one-line JSON answer after an upload, or None if it closed first."""
    line = bytearray()
    while not line.endswith(b"\n"):
        try:
            data = connection.read_raw(4096)
        except (socket.timeout, OSError):
            return None
        if not data:
            return None
        line += data
        if len(line) > 65536:
            return None
    try:
        return json.loads(line)
    except ValueError:
        return None
