"""The agent's file requests: listing, sending, checksumming and receiving
job files.

Every blocking step runs on the agent's file workers, with a deadline
(:mod:`hpc_agent.workers`), and every path is confined by :mod:`hpc_agent.files`.
A job's fetch goes through its scheduler's hooks the seed's way:
``file_send_start(file_path, extra_params)`` may name the file to send,
``(path, ignore_prefix)`` (with ``ignore_prefix`` the site's own code vouches
for a path outside the job's directory; it is still a regular file or
nothing), and ``file_send_end(file_path, extra_params)`` runs after every
transfer, a failed one too (whenever file_send_start returned).
"""

import inspect
import os

from twisted.internet import defer
from twisted.logger import Logger

from hpc_agent import files, wire
from hpc_agent.transfer import FileSource, TransferFailed
from hpc_agent.upload import UploadSink
from hpc_agent.wire import RequestFailed
from hpc_agent.workers import FilesUnavailable

log = Logger()

#: Worker threads for file work (listings, opens, reads, checksums).
FILE_THREADS = 4
#: A file list reply stays this far below the frame limit (the envelope).
_LIST_MARGIN = 64 * 1024


def _call_hook(method, file_path, extra_params):
    """Call a scheduler's file hook the seed's way, ``(file_path,
    extra_params)``; hooks written for this project's first release take
    only the path."""
    try:
        inspect.signature(method).bind(file_path, extra_params)
    except TypeError:
        return method(file_path)
    return method(file_path, extra_params)


def _send_start(hooks, file_path, extra_params):
    """``file_send_start``: ``(path to open, ignore_prefix)``."""
    returned = _call_hook(hooks.file_send_start, file_path, extra_params)
    if returned is None:  # a hook that only watches
        return file_path, False
    if isinstance(returned, str):
        return returned, False
    path, ignore_prefix = returned
    if not isinstance(path, str):
        raise TypeError(f"file_send_start returned {returned!r}; it must return "
                        "(path, ignore_prefix)")
    return path, bool(ignore_prefix)


class FileRequests:
    """The file requests of an AgentCore (its scheduler, workers and
    transfers); each handler takes the request and returns its result."""

    def __init__(self, core):
        self._core = core

    def roots(self, job_id):
        """Where a request's paths may lead: the job's directory, or (no job)
        the working directory and the allowed roots."""
        if job_id is not None:
            return [self._core.scheduler(job_id).get_working_directory()]
        settings = self._core.settings
        return [settings.HPC_JOB_WORKING_DIRECTORY, *settings.HPC_ALLOWED_FILE_ROOTS]

    def _files(self, f, *args, what, **kwargs):
        """File work on the file workers, its errors as request errors."""
        d = self._core.files.call(f, *args, what=what, **kwargs)

        def failed(failure):
            e = failure.value
            if failure.check(files.Missing):
                raise RequestFailed("not_found", str(e))
            if failure.check(files.PathRefused):
                raise RequestFailed("path_refused", str(e))
            if failure.check(FilesUnavailable):
                raise RequestFailed("file_timeout", str(e))
            if failure.check(OSError):
                raise RequestFailed("unreadable", f"{what}: {e.strerror or e}")
            return failure

        return d.addErrback(failed)

    @defer.inlineCallbacks
    def list_files(self, message):
        job_id, path = message["job"], message["path"]
        listing = yield self._files(files.list_files, self.roots(job_id), path,
                                    message["recursive"], job_id is not None,
                                    message.get("with_mtime", False),
                                    what=f"listing {path!r}", progress=True)
        # A listing too large for one frame goes in pages (hpcd asks for
        # the next from ``next``).
        entries, following = files.page(listing, message.get("offset", 0), message.get("limit"),
                                        wire.MAX_CONTROL_MESSAGE - _LIST_MARGIN)
        return {"files": entries, "truncated": following is not None, "next": following}

    @defer.inlineCallbacks
    def fetch_file(self, message):
        """Open the file (the seed's hooks first, for a job) and start its
        transfer; the reply says how many bytes will come."""
        job_id, path = message["job"], message["path"]
        extra_params = message.get("extra_params")
        hooks = self._core.scheduler(job_id) if job_id is not None else None
        confined = True
        if hooks is not None:
            # The site's hook may archive, or name a file of its own: it
            # vouches for a path outside the job's directory (ignore_prefix).
            path, ignore_prefix = yield self._core.in_thread(_send_start, hooks, path, extra_params)
            confined = not ignore_prefix
        # A hook may answer with an absolute path inside the job's directory;
        # a request's leading "/" is the job directory's.
        from_hook = path != message["path"]
        try:
            opened = yield self._files(
                files.open_file, self.roots(job_id), path, job_id is not None,
                message.get("offset", 0), message.get("length"), confined, from_hook,
                what=f"opening {path!r}", cleanup=lambda late: late.close())
        except Exception:
            if hooks is not None:
                self._send_end(hooks, path, extra_params)
            raise

        def read(n):
            return self._core.files.call(opened.handle.read, n, what=f"reading {opened.name!r}")

        def close():
            self._core.files.call(opened.close, what=f"closing {opened.name!r}").addErrback(
                lambda f: log.warn("closing {path} failed: {why}", path=opened.path,
                                   why=f.getErrorMessage()))

        source = FileSource(opened.name, opened.size, opened.total_size, opened.mtime, read,
                            close)
        done = self._core.start_transfer(message["token"], source)
        done.addErrback(self._transfer_failed)
        if hooks is not None:
            # The seed's promise: file_send_end runs after every transfer.
            done.addBoth(lambda _: self._send_end(hooks, opened.path, extra_params))
        done.addErrback(lambda f: log.failure("after the transfer of {path}", f,
                                              path=opened.path))
        return {"size": opened.size, "total_size": opened.total_size, "mtime": opened.mtime}

    def _send_end(self, hooks, path, extra_params):
        d = self._core.in_thread(_call_hook, hooks.file_send_end, path, extra_params)
        d.addErrback(lambda f: log.failure("file_send_end for {path} failed", f, path=path))
        return d

    def _transfer_failed(self, failure):
        if failure.check(TransferFailed):
            log.warn("{why}", why=failure.getErrorMessage())
        else:
            log.failure("a file transfer failed", failure)

    @defer.inlineCallbacks
    def file_checksum(self, message):
        job_id, path = message["job"], message["path"]
        result = yield self._files(files.checksum, self.roots(job_id), path,
                                   job_id is not None, what=f"the checksum of {path!r}",
                                   progress=True)
        return result

    @defer.inlineCallbacks
    def upload_file(self, message):
        """Check the path and open a temporary file beside it, then receive
        the bytes on a transfer connection (:mod:`hpc_agent.upload`).

        A job that has not been submitted yet has no directory: it is made
        here as a submission makes it (``HPC_JOB_DIRECTORY_MODE``), so a
        portal can put input files in place before it submits.
        """
        job_id, path = message["job"], message["path"]
        scheduler = self._core.scheduler(job_id)
        mode = self._core.settings.HPC_JOB_DIRECTORY_MODE
        yield self._files(_job_directory, scheduler, what=f"creating job {job_id}'s directory")
        upload = yield self._files(
            files.create_upload, [scheduler.get_working_directory()], path, True,
            message.get("max_size"), mode, what=f"creating {path!r}",
            cleanup=lambda late: late.abort())
        call = self._core.files.call
        sink = UploadSink(
            upload.path,
            write=lambda data: call(upload.write, data, what=f"writing {upload.path!r}"),
            commit=lambda size, sha256: call(upload.commit, size, sha256,
                                             what=f"completing {upload.path!r}"),
            abort=lambda: call(upload.abort, what=f"removing the partial {upload.path!r}"))
        done = self._core.start_upload(message["token"], sink)
        done.addCallback(lambda result: log.info("received {path} ({size} bytes)",
                                                 path=upload.path, size=result["size"]))
        done.addErrback(self._transfer_failed)
        return {}


def _job_directory(scheduler):
    """Make the job's working directory unless it is there (a job not yet
    submitted: uploads come first)."""
    if not os.path.isdir(scheduler.get_working_directory()):
        scheduler.prepare_working_directory()
