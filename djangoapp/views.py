"""Ready views for a job's files: list, download (resumable), archive, upload.

Include them under any prefix (``path("hpc/", include("djangoapp.urls"))``;
the app name is ``hpc``).  Who may use them is the job's own decision:
:meth:`HpcJob.user_can_access_files` (staff only unless the job class
overrides it).  The project's errors become HTTP statuses with a short
message: 404 for a missing job or file, 403 for a refused path or user, 503
when hpcd or the cluster is offline, 504 when the agent does not answer.

Downloads follow RFC 9110: one ``Range`` (``bytes=a-b``, ``a-``, ``-n``)
gives a 206 whose bytes the agent reads from the range's start (nothing
before it is sent), an unsatisfiable one a 416; ``If-Range``,
``If-None-Match``, ``If-Modified-Since`` and ``HEAD`` are answered from
the file's size and mtime without transferring it.
"""

import mimetypes
import posixpath
import re
import tarfile
import zlib

from django.contrib import messages
from django.http import (HttpResponse, HttpResponseRedirect, JsonResponse,
                         StreamingHttpResponse)
from django.utils.http import (content_disposition_header, http_date, parse_http_date_safe,
                               url_has_allowed_host_and_scheme)
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from djangoapp import ipc
from djangoapp.conf import hpc_settings
from djangoapp.models import JobStateError, file_etag, get_job_model
from djangoapp.protocol import (ClusterOffline, FileMissing, HpcdError, NotFound, PathRefused,
                                Timeout, TooLarge)

__all__ = ["job_files", "job_file", "job_archive", "job_upload", "parse_range"]

#: Headers every file response carries: a job's HTML output shown inline must
#: not run scripts with the portal's cookies.
_SAFE_HEADERS = {"X-Content-Type-Options": "nosniff",
                 "Content-Security-Policy": "sandbox; default-src 'none'"}


class _Refusal(Exception):
    """A request answered with an error status and a short message."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def _status_of(error):
    """The HTTP status and message for one of the project's errors."""
    if isinstance(error, (FileMissing, NotFound)):
        return 404, str(error)
    if isinstance(error, PathRefused):
        return 403, str(error)
    if isinstance(error, TooLarge):
        return 413, str(error)
    if isinstance(error, (ClusterOffline, ipc.HpcdUnavailable)):
        return 503, str(error)
    if isinstance(error, Timeout):
        return 504, str(error)
    return 502, str(error)


def _answer_errors(as_json):
    """Turn refusals and hpcd's errors into responses (JSON or plain text)."""

    def decorate(view):
        def wrapper(request, *args, **kwargs):
            try:
                return view(request, *args, **kwargs)
            except _Refusal as e:
                status, message = e.status, str(e)
            except JobStateError as e:
                status, message = 409, str(e)
            except HpcdError as e:
                status, message = _status_of(e)
            if as_json:
                response = JsonResponse({"error": message}, status=status)
            else:
                response = HttpResponse(message + "\n", status=status,
                                        content_type="text/plain; charset=utf-8")
            if status == 503:
                response["Retry-After"] = "30"
            return response

        wrapper.__name__ = view.__name__
        wrapper.__doc__ = view.__doc__
        return wrapper

    return decorate


def _job(request, job_id, write=False):
    Job = get_job_model()
    job = Job.objects.filter(pk=job_id).first()
    if job is None:
        raise _Refusal(404, f"job {job_id} does not exist")
    if not job.user_can_access_files(request.user, write=write):
        raise _Refusal(403, f"you may not {'upload to' if write else 'read'} "
                            f"the files of job {job_id}")
    if job.cluster_id is None:
        raise _Refusal(404 if not write else 409,
                       f"job {job_id} has no cluster yet, so no files")
    return job


def _normalized(path):
    """A job-relative path as the agent names it: no leading ``/``, no ``.``."""
    return "/".join(p for p in posixpath.normpath("/" + (path or "")).split("/") if p)


def _flag(request, name, default=False):
    value = request.GET.get(name)
    if value is None:
        return default
    return value.lower() in ("1", "true", "yes", "on")


# -- job-files -------------------------------------------------------------------

@require_GET
@_answer_errors(as_json=True)
def job_files(request, job_id):
    """The job's files below ``?path=`` (default: its whole directory, with
    ``?recursive=1``; one level otherwise): ``{"job", "path", "files":
    [{"path", "is_dir", "size", "mtime"}, ...]}``, paths relative to the
    job's working directory."""
    job = _job(request, job_id)
    path = request.GET.get("path") or "/"
    files = job.fetch_remote_file_list(path, _flag(request, "recursive"), with_mtime=True)
    return JsonResponse({"job": job.pk, "path": _normalized(path),
                         "files": [dict(entry) for entry in files]})


# -- job-file --------------------------------------------------------------------

_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)


def parse_range(header):
    """One byte range from a ``Range`` header: ``(start, end)`` (``end`` None:
    to the end of the file) or ``(None, n)`` for the last ``n`` bytes; None
    for no header, a malformed one, or several ranges (RFC 9110 lets a
    server ignore those and answer with the whole file)."""
    match = _RANGE.fullmatch(header or "")
    if not match or not (match[1] or match[2]):
        return None
    if not match[1]:
        return None, int(match[2])
    start, end = int(match[1]), (int(match[2]) if match[2] else None)
    if end is not None and end < start:
        return None
    return start, end


def _satisfy(spec, total):
    """``(offset, length)`` of a parsed range in a file of ``total`` bytes,
    or None when it is unsatisfiable."""
    start, end = spec
    if start is None:
        if end == 0 or total == 0:
            return None
        offset = max(0, total - end)
        return offset, total - offset
    if start >= total:
        return None
    last = total - 1 if end is None else min(end, total - 1)
    return start, last - start + 1


def _stat(job, path):
    """``(total_size, mtime, name)`` of a file, without transferring it."""
    wanted = _normalized(path)
    entries = job.fetch_remote_file_list(path, False, with_mtime=True)
    if len(entries) == 1 and not entries[0]["is_dir"] and entries[0]["path"] == wanted:
        entry = entries[0]
        return entry["size"], entry["mtime"], posixpath.basename(wanted)
    # A directory, or a symlink (listed under its target's name): a fetch of
    # no bytes tells which, and the file's size and time.
    response = job.fetch_remote_file(path, force_download=False, length=0)
    response.close()
    info = response.file_info
    if info["total_size"] is None:
        raise HpcdError("the agent is too old to tell a file's size; upgrade it")
    return info["total_size"], info["mtime"], info["name"]


def _etag_matches(header, etag):
    """If-None-Match: weak comparison against any of the listed tags."""
    if header.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in header.split(","))


def _if_range_holds(header, etag, mtime):
    """If-Range: a strong ETag match, or exactly the Last-Modified date."""
    header = header.strip()
    if header.startswith(('"', "W/")):
        return header == etag
    date = parse_http_date_safe(header)
    return date is not None and date == int(mtime)


def _headers(response, name, total, mtime, download):
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    response["Content-Type"] = content_type
    response["Accept-Ranges"] = "bytes"
    response["ETag"] = file_etag(total, mtime)
    response["Last-Modified"] = http_date(mtime)
    if download:
        response["Content-Disposition"] = content_disposition_header(True, name)
    for key, value in _SAFE_HEADERS.items():
        response[key] = value


@require_http_methods(["GET", "HEAD"])
@_answer_errors(as_json=False)
def job_file(request, job_id, path):
    """One of the job's files, as an attachment (``?download=0``: inline).

    Resumable: a single ``Range`` gives a 206, the agent reading from the
    range's start.  Conditional requests and ``HEAD`` are answered from the
    file's size and mtime (one request to the agent, no transfer).
    """
    job = _job(request, job_id)
    download = _flag(request, "download", True)
    spec = parse_range(request.META.get("HTTP_RANGE"))
    if_range = request.META.get("HTTP_IF_RANGE")
    if_none_match = request.META.get("HTTP_IF_NONE_MATCH")
    if_modified_since = request.META.get("HTTP_IF_MODIFIED_SINCE")
    head = request.method == "HEAD"
    if not (head or if_none_match or if_modified_since or if_range
            or (spec is not None and spec[0] is None)):
        # The common cases need no look first: the answer to the fetch
        # itself carries the file's size and time.
        return _fetch(job, path, spec, download)

    total, mtime, name = _stat(job, path)
    etag = file_etag(total, mtime)
    not_modified = (_etag_matches(if_none_match, etag) if if_none_match else
                    (if_modified_since is not None
                     and (since := parse_http_date_safe(if_modified_since)) is not None
                     and int(mtime) <= since))
    if not_modified:
        response = HttpResponse(status=304)
        response["ETag"] = etag
        response["Last-Modified"] = http_date(mtime)
        return response
    if spec is not None and if_range and not _if_range_holds(if_range, etag, mtime):
        spec = None  # the file changed since the client's copy: all of it
    offset, length = 0, None
    if spec is not None:
        satisfied = _satisfy(spec, total)
        if satisfied is None:
            return _unsatisfiable(total)
        offset, length = satisfied
    if not head:
        return _fetch(job, path, spec and (offset, offset + length - 1), download)
    response = HttpResponse(status=206 if spec is not None else 200)
    _headers(response, name, total, mtime, download)
    response["Content-Length"] = str(total if spec is None else length)
    if spec is not None:
        response["Content-Range"] = f"bytes {offset}-{offset + length - 1}/{total}"
    return response


def _unsatisfiable(total):
    response = HttpResponse(f"the range is outside the file ({total} bytes)\n", status=416,
                            content_type="text/plain; charset=utf-8")
    response["Content-Range"] = f"bytes */{total}"
    return response


def _fetch(job, path, spec, download):
    """Stream the file, or the range ``spec`` (an explicit start)."""
    offset, length = 0, None
    if spec is not None:
        offset = spec[0]
        length = None if spec[1] is None else spec[1] - spec[0] + 1
    try:
        response = job.fetch_remote_file(path, force_download=download, offset=offset,
                                         length=length)
    except FileMissing:
        raise
    except PathRefused:
        if not offset:
            raise
        # The agent refuses a start past the end; say so as HTTP does.
        total, _, _ = _stat(job, path)
        if offset >= total:
            return _unsatisfiable(total)
        raise
    info = response.file_info
    if spec is not None and info["total_size"] is not None and offset >= info["total_size"]:
        response.close()
        return _unsatisfiable(info["total_size"])
    if info["total_size"] is not None and info["mtime"] is not None:
        _headers(response, info["name"], info["total_size"], info["mtime"], download)
        if spec is not None:
            # "bytes=0-" too: a range was asked for, so a range is answered.
            response.status_code = 206
            response["Content-Range"] = (f"bytes {offset}-{offset + info['size'] - 1}/"
                                         f"{info['total_size']}")
    return response


# -- job-archive -----------------------------------------------------------------

@require_GET
@_answer_errors(as_json=False)
def job_archive(request, job_id):
    """A directory of the job (``?path=``, default all of it) as a tar made
    while it streams (``?gzip=1``: compressed), one file fetched after the
    other: memory stays flat whatever the sizes."""
    job = _job(request, job_id)
    path = request.GET.get("path") or "/"
    compress = _flag(request, "gzip")
    base = _normalized(path)
    entries = job.fetch_remote_file_list(path, True, with_mtime=True)
    top = f"job-{job.pk}" + (f"-{base.replace('/', '-')}" if base else "")
    chunks = _tar(job, entries, base, top)
    if compress:
        chunks = _gzip(chunks)
    response = StreamingHttpResponse(
        chunks, content_type="application/gzip" if compress else "application/x-tar")
    response["Content-Disposition"] = content_disposition_header(
        True, top + (".tar.gz" if compress else ".tar"))
    for key, value in _SAFE_HEADERS.items():
        response[key] = value
    return response


def _tar(job, entries, base, top):
    """A tar stream: each member's header (``TarInfo.tobuf``), its bytes as
    they arrive from the agent, padding.  (``tarfile.addfile`` writes a
    whole member before it returns: memory would grow with the largest.)"""
    written = 0
    prefix = base + "/" if base else ""
    for entry in entries:
        relative = entry["path"][len(prefix):] if entry["path"].startswith(prefix) \
            else posixpath.basename(entry["path"])
        info = tarfile.TarInfo(f"{top}/{relative}" if relative else top)
        info.mtime = int(entry.get("mtime") or 0)
        if entry["is_dir"]:
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            block = info.tobuf(tarfile.PAX_FORMAT)
            written += len(block)
            yield block
            continue
        try:
            # The size listed: a file growing meanwhile is cut there.
            response = job.fetch_remote_file(entry["path"], force_download=False,
                                             length=entry["size"])
        except FileMissing:
            continue  # gone since the listing
        info.size, info.mode = response.file_info["size"], 0o644
        block = info.tobuf(tarfile.PAX_FORMAT)
        written += len(block)
        yield block
        for chunk in response.streaming_content:
            written += len(chunk)
            yield chunk
        padding = -info.size % tarfile.BLOCKSIZE
        written += padding
        yield b"\0" * padding
    end = b"\0" * (2 * tarfile.BLOCKSIZE)
    written += len(end)
    yield end + b"\0" * (-written % tarfile.RECORDSIZE)


def _gzip(chunks):
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip format
    for chunk in chunks:
        out = compressor.compress(chunk)
        if out:
            yield out
    yield compressor.flush()


# -- job-upload ------------------------------------------------------------------

@require_POST
@_answer_errors(as_json=True)
def job_upload(request, job_id):
    """Put the uploaded ``file`` in the job's directory: in ``path`` (a
    directory, default the top), under ``name`` (default the file's own).
    Answers ``{"path", "size", "sha256", "mtime"}`` (201), or with ``next``
    (a URL of this site) redirects there with a message."""
    job = _job(request, job_id, write=True)
    uploaded = request.FILES.get("file")
    target = request.POST.get("next")
    if target and not url_has_allowed_host_and_scheme(target, {request.get_host()},
                                                       request.is_secure()):
        target = None
    try:
        if uploaded is None:
            raise _Refusal(400, "no file: send it as the form field 'file'")
        name = posixpath.basename(request.POST.get("name") or uploaded.name or "")
        if name in ("", ".", ".."):
            raise _Refusal(400, "the file needs a name")
        relative = _normalized(posixpath.join(request.POST.get("path") or "", name))
        limit = hpc_settings.HPC_UPLOAD_MAX_BYTES
        if limit is not None and uploaded.size is not None and uploaded.size > int(limit):
            raise TooLarge(f"{name} has {uploaded.size} bytes; the limit is {limit} "
                           "(HPC_UPLOAD_MAX_BYTES)")
        result = job.upload_file(relative, uploaded)
    except (_Refusal, HpcdError, JobStateError) as e:
        if not target:
            raise
        messages.error(request, f"Upload failed: {e}", fail_silently=True)
        return HttpResponseRedirect(target, status=303)
    result = {"path": relative, **result}
    if target:
        messages.success(request, f"Uploaded {relative} ({result['size']} bytes, "
                                  f"SHA-256 {result['sha256'][:12]}…)", fail_silently=True)
        return HttpResponseRedirect(target, status=303)
    return JsonResponse(result, status=201)
