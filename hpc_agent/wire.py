"""The wire protocol between the agent and hpcd.

Control connection: ``ws(s)://SERVER/agent``, one JSON object per text frame.
The agent authenticates in the opening handshake with
``Authorization: Bearer <token>`` (a single-use launch token, or the resume
token hpcd gave it on its previous connection).  Every frame has a ``type``;
a request carries an ``id`` (an integer unique per connection) and is answered
by exactly one ``reply`` with the same id.

agent -> hpcd
  hello       protocol:int agent_version:str scheduler:str hostname:str nvx:bool
              First frame.  hpcd answers ``welcome`` or closes (protocol mismatch).
  update      seq:int job:int status:int detail:str at:float scheduler_id:str|null
              A job's state changed.  Sent once it is in the agent's durable
              outbox, and again after every reconnect (and after ``retry``)
              until hpcd acknowledges it.
  reply       id:int ok:bool [result:object] [error:str message:str]
              The answer to one of hpcd's requests, sent once the state it
              reports is durable.  ``error`` codes: path_refused (outside
              the roots, or not a regular file), not_found (no such file or
              directory: a 404, where path_refused is a 403), unreadable,
              file_timeout (a file operation passed the agent's deadline,
              HPC_FILE_TIMEOUT_SECONDS: a hung file system), job_active,
              internal, and the decoding errors below.
  error       code:str message:str
              A frame from hpcd could not be understood; nothing was done.

hpcd -> agent
  welcome     protocol:int cluster:str resume_token:str [resume_grace_seconds:number]
              [installation:str]
              The connection is accepted; ``resume_token`` replaces the
              previous one and lets the agent reconnect after a drop.
              ``resume_grace_seconds``: how long hpcd waits for a lost agent
              to come back before launching another; the agent caps its
              reconnect backoff at a third of it.  ``installation``: the
              Django installation's id (HpcInstallation); the agent binds
              its state to the first it sees and closes with
              CLOSE_INSTALLATION when another one welcomes it.
  ack         seqs:[int] [retry:[int]]
              ``seqs`` are stored (or knowingly refused): forget them.
              ``retry``: these could not be stored; the agent sends them
              again after a backoff (1 s, doubling, up to 30 s).
  submit      id job:int parameters:object
              -> result {scheduler_id:str|null, status:int}.  Idempotent: a
              job the agent knows is answered from its records.
  submit_many id jobs:[{job:int, parameters:object}, ...]
              -> result {jobs: [{job:int, ok:true, scheduler_id:str|null,
                                 status:int}
                                | {job:int, ok:false, error:str, message:str}]}
              Many submits in one frame (hpcd sends a batch of claimed
              jobs), each handled as its own ``submit`` would be and
              answered per job once all are durable.  An agent without it
              answers ``unknown_type`` and hpcd sends one submit per job.
  cancel      id job:int                  -> result {status:int}
  delete      id job:int                  -> result {status:int}
  list_files  id job:int|null path:str recursive:bool
              [offset:int>=0 limit:int>=1|null with_mtime:bool]
              -> result {files: [[path:str, is_dir:bool, size:int], ...],
                         truncated:bool, next:int|null}
              Sorted by path.  One page: entries ``offset`` onwards, at most
              ``limit``, and never more than fit in one frame; ``next`` is
              the offset of the next page (``truncated`` true) or null.
              ``with_mtime``: each entry gets its mtime as a 4th element
              (only when asked, so 3-element readers keep working).
  fetch_file  id job:int|null path:str token:str
              [extra_params:any offset:int>=0 length:int>=0|null]
              -> result {size:int, total_size:int, mtime:number}; the agent
              then opens a transfer connection with ``token`` (below) and
              sends ``length`` bytes from ``offset`` (default: all).
              ``size`` is the number of bytes it will send.  For a job,
              ``extra_params`` goes to the scheduler's file_send_start and
              file_send_end hooks.
  file_checksum id job:int|null path:str
              -> result {sha256:str, size:int, mtime:number}, computed by
              the agent reading the whole file (a large file takes a while:
              its deadline counts from the last chunk read).
  upload_file id job:int path:str token:str [max_size:int>=0|null]
              -> result {}: the agent has checked the path (inside the
              job's directory, which it creates if the job has not run yet;
              parent directories made inside it; not over a directory or
              anything but a regular file) and opened a temporary file
              beside it; it then opens a transfer connection with ``token``
              to receive the bytes (below).
  error       code:str message:str

Transfer connection: ``ws(s)://SERVER/file``, one per file, authenticated
with the single-use token from ``fetch_file``.
  agent -> hpcd  file_header  size:int name:str [total_size:int mtime:number
                              checksum:str]  (text)
                 ``size``: bytes that follow (the range asked for);
                 ``total_size``: the whole file's size; ``checksum``: the
                 kind of check the end marker carries (hpc_agent.checksums:
                 "crc32", what this agent sends; absent: "sha256", as agents
                 before it sent).
                 <binary frames: the bytes>
                 file_end     size:int [crc32:int sha256:str] (text; the
                              field named by the header's kind: CRC-32 as an
                              integer, SHA-256 in hexadecimal)
                 file_error   message:str         (text; the transfer failed)
  hpcd -> agent  file_done    size:int            (text; all bytes arrived)
The agent closes only after ``file_done``: closing with data still buffered
loses it (Autobahn's close handshake times out after a second).

An upload uses the same kind of connection the other way round:
  agent -> hpcd  upload_ready               (text; first frame: ready to write)
  hpcd -> agent  <binary frames, at most MAX_UPLOAD_MESSAGE bytes each>
                 upload_end   size:int sha256:str (text; everything was sent)
  agent -> hpcd  upload_done  size:int sha256:str mtime:number (text; the
                 file is complete, its checksum matched, and it is in place
                 under its final name)
                 file_error   message:str   (text; nothing was put in place)
The bytes go to a temporary file in the target's directory, renamed over
the final name only once ``upload_end`` matches what was written: a
transfer cut off halfway leaves the final name as it was.  The agent pauses
reading while its writes lag behind, so hpcd (and the Django process behind
it) waits.

Malformed input (not JSON, not an object, unknown type, missing or mistyped
field, oversize) raises :class:`ProtocolError`; the receiver answers with an
``error`` frame (or an error ``reply`` when the request id was readable) and
carries on.  Nothing in this module raises anything else on bad input.
"""

import json
import math

PROTOCOL_VERSION = 1

#: Websocket close codes hpcd uses (4000-4999 belong to the application).
CLOSE_SUPERSEDED = 4001  # another agent now serves this cluster: exit
CLOSE_SHUTDOWN = 4002  # the cluster was removed or disabled: exit
CLOSE_PROTOCOL = 4003  # hpcd does not speak the agent's protocol version: exit
CLOSE_INSTALLATION = 4005  # sent by the agent: its directory serves another installation

#: Largest binary message hpcd sends on an upload (the agent accepts no more).
MAX_UPLOAD_MESSAGE = 1024 * 1024

#: Largest control frame either side accepts.  Generous: a recursive file
#: list of a big job directory is the largest message.
MAX_CONTROL_MESSAGE = 16 * 1024 * 1024


class ProtocolError(Exception):
    """A frame that does not follow this protocol.

    ``request_id`` is set when the frame was a request whose id could be
    read, so the error can be answered as that request's reply.
    """

    def __init__(self, code, message, request_id=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


# Field kinds -----------------------------------------------------------------

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_file_entry(v):
    return (isinstance(v, list) and len(v) in (3, 4) and isinstance(v[0], str)
            and isinstance(v[1], bool) and _is_int(v[2]) and v[2] >= 0
            and (len(v) == 3 or _is_number(v[3])))


def _is_submission(v):
    return isinstance(v, dict) and _is_int(v.get("job")) and "parameters" in v


INT = ("an integer", _is_int)
STR = ("a string", lambda v: isinstance(v, str))
BOOL = ("a boolean", lambda v: isinstance(v, bool))
NUMBER = ("a number", _is_number)
OBJECT = ("an object", lambda v: isinstance(v, dict))
ANY = ("any JSON value", lambda v: True)
OPT_INT = ("an integer or null", lambda v: v is None or _is_int(v))
COUNT = ("an integer >= 0", lambda v: _is_int(v) and v >= 0)
OPT_COUNT = ("an integer >= 0 or null", lambda v: v is None or (_is_int(v) and v >= 0))
OPT_LIMIT = ("an integer >= 1 or null", lambda v: v is None or (_is_int(v) and v >= 1))
OPT_STR = ("a string or null", lambda v: v is None or isinstance(v, str))
SUBMIT_LIST = ("a list of {job:int, parameters} objects",
               lambda v: isinstance(v, list) and all(_is_submission(e) for e in v))
INT_LIST = ("a list of integers", lambda v: isinstance(v, list) and all(_is_int(i) for i in v))
FILE_LIST = ("a list of [path, is_dir, size] or [path, is_dir, size, mtime]",
             lambda v: isinstance(v, list) and all(_is_file_entry(e) for e in v))

# type -> ({required field: kind}, {optional field: kind}, is_request)
SCHEMA = {
    "hello": ({"protocol": INT, "agent_version": STR, "scheduler": STR,
               "hostname": STR, "nvx": BOOL}, {}, False),
    "update": ({"seq": INT, "job": INT, "status": INT, "detail": STR, "at": NUMBER,
                "scheduler_id": OPT_STR}, {}, False),
    "reply": ({"id": INT, "ok": BOOL}, {"result": ANY, "error": STR, "message": STR}, False),
    "error": ({"code": STR, "message": STR}, {}, False),
    "welcome": ({"protocol": INT, "cluster": STR, "resume_token": STR},
                {"resume_grace_seconds": NUMBER, "installation": STR}, False),
    "ack": ({"seqs": INT_LIST}, {"retry": INT_LIST}, False),
    "submit": ({"job": INT, "parameters": ANY}, {}, True),
    "submit_many": ({"jobs": SUBMIT_LIST}, {}, True),
    "cancel": ({"job": INT}, {}, True),
    "delete": ({"job": INT}, {}, True),
    "list_files": ({"job": OPT_INT, "path": STR, "recursive": BOOL},
                   {"offset": COUNT, "limit": OPT_LIMIT, "with_mtime": BOOL}, True),
    "fetch_file": ({"job": OPT_INT, "path": STR, "token": STR},
                   {"extra_params": ANY, "offset": COUNT, "length": OPT_COUNT}, True),
    "file_checksum": ({"job": OPT_INT, "path": STR}, {}, True),
    "upload_file": ({"job": INT, "path": STR, "token": STR}, {"max_size": OPT_COUNT}, True),
    "upload_ready": ({}, {}, False),
    "upload_end": ({"size": INT, "sha256": STR}, {}, False),
    "upload_done": ({"size": INT, "sha256": STR, "mtime": NUMBER}, {}, False),
    "file_header": ({"size": INT, "name": STR},
                    {"total_size": INT, "mtime": NUMBER, "checksum": STR}, False),
    "file_end": ({"size": INT}, {"crc32": COUNT, "sha256": STR}, False),
    "file_error": ({"message": STR}, {}, False),
    "file_done": ({"size": INT}, {}, False),
}

#: Which side may send what; a receiver refuses the other side's types.
FROM_AGENT = frozenset({"hello", "update", "reply", "error", "file_header",
                        "file_end", "file_error", "upload_ready", "upload_done"})
FROM_HPCD = frozenset({"welcome", "ack", "submit", "submit_many", "cancel", "delete", "list_files",
                       "fetch_file", "file_checksum", "upload_file", "error", "reply",
                       "file_done", "upload_end"})
#: What each side accepts on a transfer connection (the rest: control).
TRANSFER_FROM_AGENT = frozenset({"file_header", "file_end", "file_error", "upload_ready",
                                 "upload_done"})
TRANSFER_FROM_HPCD = frozenset({"file_done", "upload_end"})


class RequestFailed(Exception):
    """Raised by a request's handler: answered as a failed ``reply`` with
    ``code`` (its ``error``) and this message."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def _check(message, accept):
    """Validate a decoded frame; return it, or raise ProtocolError."""
    if not isinstance(message, dict):
        raise ProtocolError("bad_frame", "a frame must be a JSON object")
    mtype = message.get("type")
    # An error is answered as a reply only to something that was (or may be,
    # from a newer peer) a request; answering a reply with a reply would loop.
    request_id = message.get("id") if _is_int(message.get("id")) else None
    if not isinstance(mtype, str):
        raise ProtocolError("bad_frame", "the frame has no 'type' string")
    if mtype not in SCHEMA or (accept is not None and mtype not in accept):
        if mtype in SCHEMA and not SCHEMA[mtype][2]:
            request_id = None
        raise ProtocolError("unknown_type", f"unexpected message type {mtype[:64]!r}",
                            request_id)
    required, optional, is_request = SCHEMA[mtype]
    if not is_request:
        request_id = None
    if is_request and request_id is None:
        raise ProtocolError("bad_field", f"{mtype!r} needs an integer 'id'")
    for name, (what, ok) in required.items():
        if name not in message:
            raise ProtocolError("bad_field", f"{mtype!r} lacks field {name!r}", request_id)
        if not ok(message[name]):
            raise ProtocolError("bad_field", f"{mtype!r} field {name!r} must be {what}",
                                request_id)
    for name, (what, ok) in optional.items():
        if name in message and not ok(message[name]):
            raise ProtocolError("bad_field", f"{mtype!r} field {name!r} must be {what}",
                                request_id)
    return message


def decode(payload, accept=None, max_size=MAX_CONTROL_MESSAGE):
    """Parse one text frame (bytes or str) into a validated dict.

    ``accept`` limits the types this receiver takes (``FROM_AGENT`` on hpcd,
    ``FROM_HPCD`` on the agent).  Raises :class:`ProtocolError` on anything
    malformed, and only that.
    """
    if len(payload) > max_size:
        raise ProtocolError("too_large", f"frame of {len(payload)} bytes exceeds {max_size}")
    try:
        if isinstance(payload, (bytes, bytearray)):
            payload = bytes(payload).decode("utf-8")
        message = json.loads(payload, parse_constant=_refuse_constant,
                             parse_float=_parse_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError("bad_frame", f"not valid UTF-8 JSON: {str(e)[:200]}") from None
    return _check(message, accept)


def _refuse_constant(name):
    # NaN and Infinity are not JSON; Python's parser accepts them by default.
    raise ValueError(f"{name} is not valid JSON")


def _parse_float(text):
    # 1e400 is valid JSON syntax but overflows to inf, which encode() refuses.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def encode(mtype, /, **fields):
    """Build one frame as UTF-8 bytes, validating it like a receiver would."""
    message = {"type": mtype, **fields}
    _check(message, None)
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8")


def error_frame(error):
    """The frame that answers a :class:`ProtocolError`."""
    if error.request_id is not None:
        return encode("reply", id=error.request_id, ok=False, error=error.code,
                      message=error.message)
    return encode("error", code=error.code, message=error.message)
