"""The AMP interface between Django processes and hpcd, and its errors.

Imported by both sides: hpcd answers these commands on its Unix socket and
``djangoapp.ipc`` sends them with a small blocking client.  It lives on the
Django side because its exceptions are the app's public API (a view catches
``ClusterOffline``), and the daemon depends on the app, never the reverse.
A leaf module: it imports nothing of this project and no reactor
(``twisted.protocols.amp`` alone does not install one).  Every error a
command can raise is listed in its ``errors`` and becomes the same exception
class in the Django process.  ``hpcd.commands`` re-exports all of it.
"""

import datetime
import json

from twisted.protocols import amp

__all__ = [
    # errors
    "HpcdError", "ClusterOffline", "NotFound", "PathRefused", "FileMissing", "AgentError",
    "Timeout", "SSHFailed", "TooLarge", "ERROR_CLASSES",
    # errors raised in the Django process itself
    "JobStillRunning", "ParametersRefused",
    # argument types, and the end of a streamed file
    "Bytes", "JSONValue", "UTCMicroseconds", "TRAILER_OK", "TRAILER_SIZE", "UPLOAD_CHUNK_HEADER",
    # commands
    "IsClusterOnline", "TryConnect", "Dispatch", "Notify", "ListFiles", "FetchFile", "SendMessage",
    "ScanHostKeys", "OpenShell", "RunCommand", "CloseShell", "Status", "FileChecksum",
    "UploadFile",
    # hpcd's answer to arguments it cannot read
    "BadRequest", "BAD_REQUEST",
]


class HpcdError(Exception):
    """Base of the errors hpcd reports; the message says what to do."""


class ClusterOffline(HpcdError):
    """The cluster has no live agent connection."""


class NotFound(HpcdError):
    """No such cluster, job or token."""


class PathRefused(HpcdError):
    """The path is outside what the agent may read, or does not exist."""


class FileMissing(PathRefused):
    """No such file or directory (a PathRefused, so code written before it
    still catches it; a view answers 404 for it and 403 for the others)."""


class AgentError(HpcdError):
    """The agent could not do what was asked; the message is the agent's.

    ``code`` is the agent's error code (see ``hpc_agent.wire``), in hpcd only.
    """

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class Timeout(HpcdError):
    """The agent did not answer in time."""


class SSHFailed(HpcdError):
    """Logging in to the cluster or running a command there failed."""


class JobStillRunning(Exception):
    """A job row cannot be deleted while its job may run on its cluster
    (SUBMITTING to CANCELLING, or DELETING): deleting the row would leave it
    running there with nobody to cancel it.  ``jobs``: the ids refused.
    Raised in the Django process, never sent over AMP."""

    def __init__(self, message, jobs=()):
        super().__init__(message)
        self.jobs = list(jobs)


class ParametersRefused(ValueError):
    """submit() was given parameters that cannot reach the agent: larger than
    HPC_MAX_PARAMETERS_BYTES, or not JSON (NaN, a set).  Nothing was
    submitted.  Raised in the Django process, never sent over AMP."""


_ERRORS = {
    ClusterOffline: b"CLUSTER_OFFLINE",
    NotFound: b"NOT_FOUND",
    # Before PathRefused, its base: AMP picks the first class that matches.
    FileMissing: b"FILE_MISSING",
    PathRefused: b"PATH_REFUSED",
    AgentError: b"AGENT_ERROR",
    Timeout: b"TIMEOUT",
    SSHFailed: b"SSH_FAILED",
    # Last: AMP picks the first class that matches, and every error is one.
    HpcdError: b"HPCD_ERROR",
}

#: wire code -> exception class, for the client side.
ERROR_CLASSES = {code: cls for cls, code in _ERRORS.items()}


class Bytes(amp.Argument):
    """Bytes of any length, split over AMP keys like :class:`JSONValue`.

    ``optional=True``: None is not sent, and an absent value is left out of
    the receiver's arguments (not passed as None, as AMP's own optional
    arguments are), so a new optional argument reaches only responders
    that declare it, with a default, and breaks none written before it.
    """

    PART = 60000

    def toBox(self, name, strings, objects, proto):
        data = objects.pop(_identifier(name), None)
        if data is None and self.optional:
            return
        self._split(name, strings, data)

    def _split(self, name, strings, data):
        parts = [data[i:i + self.PART] for i in range(0, len(data), self.PART)] or [b""]
        strings[name] = str(len(parts)).encode()
        for i, part in enumerate(parts):
            strings[name + b"." + str(i).encode()] = part

    def fromBox(self, name, strings, objects, proto):
        if self.optional and name not in strings:
            return
        count = int(strings.pop(name))
        objects[_identifier(name)] = b"".join(
            strings.pop(name + b"." + str(i).encode()) for i in range(count))


class JSONValue(Bytes):
    """Any JSON value, split over as many AMP keys as it needs.

    AMP limits one value to 65,535 bytes; a file list can be far longer.
    The value is stored as ``name`` = number of parts and ``name.0``,
    ``name.1``, ... = the parts.  ``optional=True`` as for :class:`Bytes`.
    """

    def toBox(self, name, strings, objects, proto):
        value = objects.pop(_identifier(name), None)
        if value is None and self.optional:
            return
        self._split(name, strings, json.dumps(value, separators=(",", ":")).encode())

    def fromBox(self, name, strings, objects, proto):
        super().fromBox(name, strings, objects, proto)
        if _identifier(name) in objects:
            objects[_identifier(name)] = json.loads(objects[_identifier(name)])


def _identifier(name):
    return name.decode("ascii") if isinstance(name, bytes) else name


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_MICROSECOND = datetime.timedelta(microseconds=1)


class UTCMicroseconds(amp.Argument):
    """An aware datetime as whole microseconds since the epoch, in UTC.

    Exact, and about ten times cheaper on both sides than ``amp.DateTime``
    (which formats and parses an ISO string with its offset): it is on the
    path of every is_connected() call."""

    def toString(self, inObject):
        if inObject.tzinfo is None:
            raise ValueError(f"{inObject!r} is a naive datetime; UTCMicroseconds needs an "
                             "aware one")
        return str((inObject - _EPOCH) // _MICROSECOND).encode("ascii")

    def fromString(self, inString):
        return _EPOCH + datetime.timedelta(microseconds=int(inString))


class IsClusterOnline(amp.Command):
    """The WebsocketToken of the cluster's live connection: its id (0: none)
    and, so that is_connected() needs no query, its other fields from hpcd's
    memory (``token_purpose`` absent: an hpcd that predates them).  hpcd
    answers it at once, without a Deferred (hpcd.ipc)."""

    arguments = [(b"cluster_id", amp.Integer())]
    response = [(b"token_id", amp.Integer()),
                (b"token_purpose", amp.Unicode(optional=True)),
                (b"token_created", UTCMicroseconds(optional=True)),
                (b"token_expires", UTCMicroseconds(optional=True)),
                (b"token_used_at", UTCMicroseconds(optional=True))]


class TryConnect(amp.Command):
    """Launch the cluster's agent unless it is online (always, with force)."""

    arguments = [(b"cluster_id", amp.Integer()), (b"force", amp.Boolean())]
    response = []
    errors = _ERRORS


class Dispatch(amp.Command):
    """A job changed (submitted, cancelled, deleted): act on it now.
    ``job_id`` 0: many did (submit_many); scan for every job that needs it.
    Answered once hpcd took note; Django itself sends Notify."""

    arguments = [(b"job_id", amp.Integer())]
    response = []
    errors = _ERRORS


class Notify(amp.Command):
    """Dispatch without an answer: what submit(), cancel() and delete_job()
    send, so that a Django process only writes to the socket and goes on.
    ``status`` and ``cluster_id`` say what Django stored: a PENDING job on
    a known cluster then needs no lookup in hpcd.  A notification lost
    (hpcd down, restarting) only waits for hpcd's next scan."""

    arguments = [(b"job_id", amp.Integer()),
                 (b"status", amp.Integer(optional=True)),
                 (b"cluster_id", amp.Integer(optional=True))]
    requiresAnswer = False


class ListFiles(amp.Command):
    """``[[path, is_dir, size], ...]`` from the agent; with ``with_mtime``
    each entry has the file's mtime as a fourth element."""

    #: hpcd waits up to HPC_AGENT_REQUEST_TIMEOUT for the agent before it
    #: answers: Django's client waits longer (see djangoapp.ipc), so that an
    #: agent's timeout reaches it as hpcd's Timeout, not as its own.
    waits_for_agent = True

    arguments = [(b"cluster_id", amp.Integer()), (b"job_id", amp.Integer(optional=True)),
                 (b"path", amp.Unicode()), (b"recursive", amp.Boolean()),
                 (b"with_mtime", amp.Boolean(optional=True))]
    response = [(b"files", JSONValue())]
    errors = _ERRORS


#: After the bytes of a file, hpcd writes this and the file's 32-byte SHA-256,
#: once it has checked the bytes against the agent's end marker.  A stream
#: without it failed, even if every byte arrived.
TRAILER_OK = b"OK"
TRAILER_SIZE = len(TRAILER_OK) + 32


class FetchFile(amp.ProtocolSwitchCommand):
    """Stream a file: the answer carries its size, then the connection
    carries exactly that many bytes, the trailer, and closes.  ``extra_params``
    (any JSON value, absent when not given) goes to the agent's scheduler's
    file_send_start/file_send_end.  ``offset`` and ``length`` ask for a
    range (the agent seeks: nothing before it is sent); ``size`` is then the
    range's, ``total_size`` the whole file's, and ``mtime`` its modification
    time (both absent from an hpcd or agent that predates them)."""

    waits_for_agent = True  # for the agent's header: see ListFiles

    arguments = [(b"cluster_id", amp.Integer()), (b"job_id", amp.Integer(optional=True)),
                 (b"path", amp.Unicode()), (b"extra_params", JSONValue(optional=True)),
                 (b"offset", amp.Integer(optional=True)),
                 (b"length", amp.Integer(optional=True))]
    response = [(b"size", amp.Integer()), (b"name", amp.Unicode()),
                (b"total_size", amp.Integer(optional=True)),
                (b"mtime", amp.Float(optional=True))]
    errors = _ERRORS

    @classmethod
    def makeResponse(cls, objects, proto):
        # Twisted's ProtocolSwitchCommand answers with an empty box; ours
        # carries the size and name too.  The responder returns them with
        # the protocol to switch to under "protocol".  (_SwitchBox and
        # _objectsToStrings are private to AMP but have not changed since
        # ProtocolSwitchCommand was written around them.)
        objects = dict(objects)
        box = amp._SwitchBox(objects.pop("protocol"))
        return amp._objectsToStrings(objects, cls.response, box, proto)


class SendMessage(amp.Command):
    """Send a wire message over the live connection a token opened."""

    arguments = [(b"token_id", amp.Integer()), (b"message", JSONValue())]
    response = []
    errors = _ERRORS


class ScanHostKeys(amp.Command):
    """The cluster's SSH host keys, fetched now, for an admin to check and pin:
    ``[{"key_type", "fingerprint", "line"}, ...]``."""

    arguments = [(b"cluster_id", amp.Integer())]
    response = [(b"keys", JSONValue())]
    errors = _ERRORS


class OpenShell(amp.Command):
    """Open a command connection to the cluster (SSH; local for localhost)."""

    arguments = [(b"cluster_id", amp.Integer())]
    response = [(b"shell_id", amp.Integer())]
    errors = _ERRORS


class RunCommand(amp.Command):
    """Run one shell command on an open command connection."""

    arguments = [(b"shell_id", amp.Integer()), (b"command", amp.Unicode()),
                 (b"stdin", Bytes()), (b"timeout_seconds", amp.Float())]
    response = [(b"exit_status", amp.Integer(optional=True)),
                (b"signal", amp.Unicode(optional=True)),
                (b"stdout", Bytes()), (b"stderr", Bytes())]
    errors = _ERRORS


class CloseShell(amp.Command):
    arguments = [(b"shell_id", amp.Integer())]
    response = []
    errors = _ERRORS


class Status(amp.Command):
    """What hpcd knows live, for ``manage.py hpc_status``: its version, pid and
    start time, each cluster's connection (online, since when, agent version,
    launch failures), transfers and requests in flight, the database queue.
    See ``hpcd.metrics.live_status`` for the fields."""

    arguments = []
    response = [(b"status", JSONValue())]
    errors = _ERRORS


# -- files: checksums and uploads (issue 10) ----------------------------------------

class TooLarge(HpcdError):
    """An upload is larger than HPC_UPLOAD_MAX_BYTES allows."""


#: TooLarge first, then the others in their order (AMP picks the first match).
_UPLOAD_ERRORS = {TooLarge: b"TOO_LARGE", **_ERRORS}
ERROR_CLASSES[b"TOO_LARGE"] = TooLarge


class FileChecksum(amp.Command):
    """``{sha256, size, mtime}`` of a file, computed by the agent reading it
    whole (a large file takes a while: hpcd waits up to
    HPC_FILE_CHECKSUM_TIMEOUT)."""

    arguments = [(b"cluster_id", amp.Integer()), (b"job_id", amp.Integer(optional=True)),
                 (b"path", amp.Unicode())]
    response = [(b"sha256", amp.Unicode()), (b"size", amp.Integer()), (b"mtime", amp.Float())]
    errors = _ERRORS


#: After UploadFile's (empty) answer the connection carries the file as
#: chunks, each this header (its length) then its bytes; a chunk of length
#: 0 ends it and is followed by the 32-byte SHA-256 of all the bytes.  hpcd
#: then answers one line of JSON, ``{"ok": true, "size", "sha256", "mtime"}``
#: once the agent has put the file in place, or ``{"ok": false, "error":
#: CODE, "message": ...}`` (an error code of this module), and closes.
UPLOAD_CHUNK_HEADER = "!I"


class UploadFile(amp.ProtocolSwitchCommand):
    """Receive a file into a job's working directory (``path`` relative to
    it).  Answered once the agent is ready to write: see UPLOAD_CHUNK_HEADER
    for what follows on the connection."""

    waits_for_agent = True  # for the agent to be ready: see ListFiles

    arguments = [(b"cluster_id", amp.Integer()), (b"job_id", amp.Integer()),
                 (b"path", amp.Unicode())]
    response = []
    errors = _UPLOAD_ERRORS


# -- unreadable input (issue 9) -------------------------------------------------------

class BadRequest(HpcdError):
    """A command's arguments could not be read; hpcd answered without acting."""


#: Answered by hpcd itself, before any responder runs, for arguments it cannot read.
BAD_REQUEST = b"BAD_REQUEST"
ERROR_CLASSES[BAD_REQUEST] = BadRequest
