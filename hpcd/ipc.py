"""The AMP server Django processes talk to (the commands: :mod:`djangoapp.protocol`).

Each responder turns an agent's failure into the error class Django sees,
so a view can tell an offline cluster from a refused path.  AMP buffers a
cut-off box until the rest arrives and closes the connection on a malformed
one; a client that vanishes mid-request costs nothing.
"""

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols import amp

from hpc_agent import wire
from djangoapp import protocol as commands
from djangoapp.protocol import (AgentError, FileMissing, HpcdError, NotFound, PathRefused,
                                SSHFailed, Timeout)
from hpcd import ssh

log = Logger()


def _errors_as_hpcd_errors(f):
    """Unexpected exceptions become HpcdError: AMP would otherwise close the
    connection and say only "Unknown Error"."""

    def wrapper(self, **kwargs):
        d = defer.maybeDeferred(f, self, **kwargs)

        def translate(failure):
            if failure.check(AgentError) and failure.value.code == "path_refused":
                raise PathRefused(str(failure.value))
            if failure.check(AgentError) and failure.value.code == "not_found":
                raise FileMissing(str(failure.value))
            if failure.check(HpcdError, amp.RemoteAmpError):  # the latter: _bad_request
                return failure
            if failure.check(wire.ProtocolError):
                # Arguments AMP could read but the agent's protocol cannot
                # carry (a negative offset): the caller's mistake, not hpcd's.
                raise _bad_request(f"not a request the agent can be sent: "
                                   f"{failure.value.message}")
            log.failure("{command} failed", failure, command=f.__name__)
            raise HpcdError(f"hpcd failed: {failure.getErrorMessage()}")

        return d.addErrback(translate)

    wrapper.__name__ = f.__name__
    return wrapper


#: The commands hpcd answers, by AMP name, to check arguments before a responder runs.
_COMMANDS = {cls.commandName: cls for cls in vars(commands).values()
             if isinstance(cls, type) and issubclass(cls, amp.Command)
             and cls is not amp.Command and cls.__module__ == commands.__name__}

#: Integers beyond this are no id or size of this project (and overflow the database).
_INT_LIMIT = 2 ** 63


def _bad_request(message):
    """The error Django receives as BadRequest.  Raised as AMP's own
    RemoteAmpError, since a command's ``errors`` would turn a BadRequest
    into its base class, HpcdError."""
    return amp.RemoteAmpError(commands.BAD_REQUEST, message)


def _read_arguments(command, box, proto):
    """``(arguments, None)``, or ``(None, why)`` when ``box`` is not a
    readable ``command``."""
    try:
        arguments = command.parseArguments(box, proto)
    except Exception as e:  # AMP's parsers raise anything (KeyError, ValueError, ...)
        return None, f"{type(e).__name__}: {e}"[:300]
    for name, value in arguments.items():
        if (isinstance(value, int) and not isinstance(value, bool)
                and not -_INT_LIMIT < value < _INT_LIMIT):
            return None, f"{name} is out of range"
    return arguments, None


#: Commands whose responders answer from memory, never fail and return no
#: Deferred: answered at once (ControlProtocol._answer_at_once), by AMP name.
_AT_ONCE = {commands.IsClusterOnline.commandName: "is_cluster_online",
            commands.Dispatch.commandName: "dispatch",
            commands.Notify.commandName: "notify"}


class ControlProtocol(amp.AMP):
    """hpcd's side of the Unix socket.  Input it cannot read is answered, not
    acted on and not logged with a traceback: unknown commands with AMP's
    UNHANDLED, unreadable arguments with BAD_REQUEST (both keep the
    connection), and boxes that are no question (hpcd asks Django nothing)
    close the connection; each is one rate-limited warning."""

    def __init__(self, daemon):
        super().__init__()
        self.daemon = daemon

    def locateResponder(self, name):
        responder = super().locateResponder(name)
        command = _COMMANDS.get(name)
        if responder is None or command is None:
            return responder

        def checked(box):
            _, problem = _read_arguments(command, box, self)
            if problem is None:
                return responder(box)
            log.warn("refused a {command} request with unreadable arguments: {problem}",
                     command=name.decode("ascii", "replace"), problem=problem)
            return defer.fail(_bad_request(f"hpcd could not read the arguments of "
                                           f"{name.decode('ascii', 'replace')}: {problem}"))

        return checked

    def ampBoxReceived(self, box):
        # Django asks, with an _ask tag, and answers nothing; only a command
        # that wants no answer (Notify) comes without the tag.
        command = _COMMANDS.get(box.get(amp.COMMAND))
        asked = amp.ASK in box or (command is not None and not command.requiresAnswer)
        if amp.COMMAND not in box or not asked or amp.ANSWER in box or amp.ERROR in box:
            log.warn("closed a Unix socket connection that sent a box that is no "
                     "question: {keys}", keys=sorted(k[:32] for k in box)[:8])
            self.transport.loseConnection()
            return
        if box[amp.COMMAND] not in _AT_ONCE or not self._answer_at_once(command, box):
            super().ampBoxReceived(box)

    def _answer_at_once(self, command, box):
        """Answer a command of _AT_ONCE: its arguments parsed once, its
        responder called directly and its answer sent, without the Deferreds
        and second parse of AMP's dispatch (most of hpcd's time per
        is_connected() call).  False leaves it to AMP's dispatch: arguments
        it cannot read get BAD_REQUEST there, a failure its error box."""
        arguments, problem = _read_arguments(command, box, self)
        if problem is not None:
            return False
        try:
            answer = command.makeResponse(
                getattr(self, _AT_ONCE[box[amp.COMMAND]])(**arguments), self)
        except Exception:
            return False  # AMP's dispatch runs it again, and answers and logs the error
        if amp.ASK in box:
            answer[amp.ANSWER] = box[amp.ASK]
            self.sendBox(answer)
            self._write_now()
        return True

    def _write_now(self):
        """Hand the answer to the socket now instead of after the reactor's
        next poll (a tenth of an is_connected() round trip).  A write that
        fails leaves the data buffered and the transport writing: the
        reactor's own doWrite meets the error and closes the connection."""
        transport = self.transport
        write = getattr(transport, "doWrite", None)  # a socket's, not a test transport's
        if write is not None and transport.connected and not transport.disconnecting:
            write()

    @commands.IsClusterOnline.responder
    def is_cluster_online(self, cluster_id):
        session = self.daemon.clusters.session(cluster_id)
        if session is None:
            return {"token_id": 0}
        # The token's fields from memory, so that is_connected() needs no query.
        answer = {"token_id": session.token_id, "token_purpose": session.claim.get("purpose")}
        for field in ("created", "expires", "used_at"):
            value = session.claim.get(field)
            if value is not None and value.tzinfo is not None:  # naive: USE_TZ = False
                answer["token_" + field] = value
        return {k: v for k, v in answer.items() if v is not None}

    @commands.TryConnect.responder
    @_errors_as_hpcd_errors
    def try_connect(self, cluster_id, force):
        return self.daemon.clusters.try_connect(cluster_id, force).addCallback(lambda _: {})

    @commands.Dispatch.responder
    def dispatch(self, job_id):
        # Answer at once; the work happens in the background.
        self.daemon.dispatcher.notify(job_id)
        return {}

    @commands.Notify.responder
    def notify(self, job_id, status=None, cluster_id=None):
        self.daemon.dispatcher.notify(job_id, status, cluster_id)
        return {}

    @commands.ListFiles.responder
    @_errors_as_hpcd_errors
    @defer.inlineCallbacks
    def list_files(self, cluster_id, job_id, path, recursive, with_mtime=None):
        # The agent answers in pages that each fit in one frame, all of them
        # within one HPC_AGENT_REQUEST_TIMEOUT: Django waits that long and a
        # margin (ListFiles.waits_for_agent), so a slow agent reaches it as
        # this Timeout, not as an hpcd that did not answer.
        session = self.daemon.clusters.require_session(cluster_id)
        files, offset = [], 0
        extra = {"with_mtime": True} if with_mtime else {}
        clock = self.daemon.reactor
        timeout = float(self.daemon.settings.HPC_AGENT_REQUEST_TIMEOUT)
        deadline = clock.seconds() + timeout
        while True:
            left = deadline - clock.seconds()
            if left <= 0:
                raise Timeout(f"the agent of cluster {cluster_id} did not list {path!r} "
                              f"within {timeout:g} s (HPC_AGENT_REQUEST_TIMEOUT)")
            result = yield session.request("list_files", timeout=left, job=job_id, path=path,
                                           recursive=recursive, offset=offset, **extra)
            files.extend(result["files"])
            if not result.get("truncated") or result.get("next") is None:
                return {"files": files}
            offset = result["next"]

    @commands.FetchFile.responder
    @_errors_as_hpcd_errors
    @defer.inlineCallbacks
    def fetch_file(self, cluster_id, job_id, path, extra_params=None, offset=None,
                   length=None):
        session = self.daemon.clusters.require_session(cluster_id)
        size, name, sink = yield self.daemon.transfers.fetch(session, job_id, path,
                                                             extra_params, offset, length)
        answer = {"size": size, "name": name, "protocol": sink}
        # From the agent's header; absent when an older agent sent none.
        answer.update({k: v for k, v in (("total_size", sink.transfer.total_size),
                                         ("mtime", sink.transfer.mtime)) if v is not None})
        return answer

    @commands.SendMessage.responder
    @_errors_as_hpcd_errors
    @defer.inlineCallbacks
    def send_message(self, token_id, message):
        if not isinstance(message, dict):
            raise _bad_request("a message is a JSON object with a 'type'")
        cluster_id = yield self.daemon.store.token_cluster(token_id)
        session = self.daemon.clusters.session(cluster_id) if cluster_id else None
        if session is None or session.token_id != token_id:
            raise NotFound(f"token {token_id} has no live connection")
        try:
            session.send_message(message)
        except wire.ProtocolError as e:
            raise HpcdError(f"not a valid wire message: {e.message}") from None
        return {}


    @commands.ScanHostKeys.responder
    @_errors_as_hpcd_errors
    @defer.inlineCallbacks
    def scan_host_keys(self, cluster_id):
        cluster = yield self.daemon.store.cluster(cluster_id)
        if cluster is None:
            raise NotFound(f"no cluster with id {cluster_id}")
        try:
            keys = yield ssh.scan_host_keys(self.daemon.reactor, cluster["host_name"],
                                            cluster["port"], cluster_name=cluster["host_name"])
        except ssh.SSHError as e:
            raise SSHFailed(str(e)) from None
        return {"keys": [{"key_type": k.key_type, "fingerprint": k.fingerprint_sha256,
                          "line": k.line} for k in keys]}

    @commands.OpenShell.responder
    @_errors_as_hpcd_errors
    @defer.inlineCallbacks
    def open_shell(self, cluster_id):
        shell_id = yield self.daemon.shells.open(cluster_id)
        return {"shell_id": shell_id}

    @commands.RunCommand.responder
    @_errors_as_hpcd_errors
    @defer.inlineCallbacks
    def run_command(self, shell_id, command, stdin, timeout_seconds):
        result = yield self.daemon.shells.run(shell_id, command, stdin, timeout_seconds)
        return {"exit_status": result.exit_status, "signal": result.signal,
                "stdout": result.stdout, "stderr": result.stderr}

    @commands.CloseShell.responder
    @_errors_as_hpcd_errors
    def close_shell(self, shell_id):
        return self.daemon.shells.close(shell_id).addCallback(lambda _: {})

    @commands.Status.responder
    @_errors_as_hpcd_errors
    def status(self):
        from hpcd.metrics import live_status

        return {"status": live_status(self.daemon)}

    @commands.FileChecksum.responder
    @_errors_as_hpcd_errors
    @defer.inlineCallbacks
    def file_checksum(self, cluster_id, path, job_id=None):
        # The agent reads the whole file: longer than other requests may take.
        session = self.daemon.clusters.require_session(cluster_id)
        result = yield session.request(
            "file_checksum", job=job_id, path=path,
            timeout=float(self.daemon.settings.HPC_FILE_CHECKSUM_TIMEOUT))
        return {"sha256": result["sha256"], "size": result["size"],
                "mtime": float(result["mtime"])}

    @commands.UploadFile.responder
    @_errors_as_hpcd_errors
    def upload_file(self, cluster_id, job_id, path):
        session = self.daemon.clusters.require_session(cluster_id)
        return self.daemon.transfers.upload(session, job_id, path)


class ControlFactory(protocol.Factory):
    def __init__(self, daemon):
        self.daemon = daemon

    def buildProtocol(self, addr):
        return ControlProtocol(self.daemon)
