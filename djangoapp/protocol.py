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

import json

from twisted.protocols import amp

__all__ = [
    # errors
    "HpcdError", "ClusterOffline", "NotFound", "PathRefused", "AgentError", "Timeout",
    "SSHFailed", "ERROR_CLASSES",
    # argument types
    "Bytes", "JSONValue",
    # commands
    "IsClusterOnline", "TryConnect", "Dispatch", "ListFiles", "FetchFile", "SendMessage",
    "ScanHostKeys", "OpenShell", "RunCommand", "CloseShell", "Status",
]


class HpcdError(Exception):
    """Base of the errors hpcd reports; the message says what to do."""


class ClusterOffline(HpcdError):
    """The cluster has no live agent connection."""


class NotFound(HpcdError):
    """No such cluster, job or token."""


class PathRefused(HpcdError):
    """The path is outside what the agent may read, or does not exist."""


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


_ERRORS = {
    ClusterOffline: b"CLUSTER_OFFLINE",
    NotFound: b"NOT_FOUND",
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
    """Bytes of any length, split over AMP keys like :class:`JSONValue`."""

    PART = 60000

    def toBox(self, name, strings, objects, proto):
        data = objects.pop(_identifier(name))
        parts = [data[i:i + self.PART] for i in range(0, len(data), self.PART)] or [b""]
        strings[name] = str(len(parts)).encode()
        for i, part in enumerate(parts):
            strings[name + b"." + str(i).encode()] = part

    def fromBox(self, name, strings, objects, proto):
        count = int(strings.pop(name))
        objects[_identifier(name)] = b"".join(
            strings.pop(name + b"." + str(i).encode()) for i in range(count))


class JSONValue(Bytes):
    """Any JSON value, split over as many AMP keys as it needs.

    AMP limits one value to 65,535 bytes; a file list can be far longer.
    The value is stored as ``name`` = number of parts and ``name.0``,
    ``name.1``, ... = the parts.
    """

    def toBox(self, name, strings, objects, proto):
        value = objects[_identifier(name)]
        objects[_identifier(name)] = json.dumps(value, separators=(",", ":")).encode()
        super().toBox(name, strings, objects, proto)

    def fromBox(self, name, strings, objects, proto):
        super().fromBox(name, strings, objects, proto)
        objects[_identifier(name)] = json.loads(objects[_identifier(name)])


def _identifier(name):
    return name.decode("ascii") if isinstance(name, bytes) else name


class IsClusterOnline(amp.Command):
    """The id of the WebsocketToken of the cluster's live connection, or 0."""

    arguments = [(b"cluster_id", amp.Integer())]
    response = [(b"token_id", amp.Integer())]


class TryConnect(amp.Command):
    """Launch the cluster's agent unless it is online (always, with force)."""

    arguments = [(b"cluster_id", amp.Integer()), (b"force", amp.Boolean())]
    response = []
    errors = _ERRORS


class Dispatch(amp.Command):
    """A job changed (submitted, cancelled, deleted): act on it now."""

    arguments = [(b"job_id", amp.Integer())]
    response = []
    errors = _ERRORS


class ListFiles(amp.Command):
    """``[[path, is_dir, size], ...]`` from the agent."""

    arguments = [(b"cluster_id", amp.Integer()), (b"job_id", amp.Integer(optional=True)),
                 (b"path", amp.Unicode()), (b"recursive", amp.Boolean())]
    response = [(b"files", JSONValue())]
    errors = _ERRORS


class FetchFile(amp.ProtocolSwitchCommand):
    """Stream a file: the answer carries its size, then the connection
    carries exactly that many bytes and closes."""

    arguments = [(b"cluster_id", amp.Integer()), (b"job_id", amp.Integer(optional=True)),
                 (b"path", amp.Unicode())]
    response = [(b"size", amp.Integer()), (b"name", amp.Unicode())]
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
