"""Listing and opening job files, confined to where they may be read.

A path from hpcd is read inside a root: the job's working directory, or one
of the allowed roots when no job is named.  Confinement is by construction,
not by checking a name and then opening it (a running job could swap a
directory for a symlink in between, and did):

* the root is opened once; every component below it is opened relative to
  the descriptor of the directory before it (``openat``), with
  ``O_NOFOLLOW``, and never as ``..``: the kernel never follows a link or
  climbs out on the agent's behalf, so every file opened is below the root's
  descriptor whatever the job does to its directory meanwhile;
* a symlink met on the way is read (``readlink``) and its target resolved by
  the same walk, from the root: symlinks that stay inside a root keep
  working, anything else is refused.  ``..`` is taken lexically, and never
  above the root;
* only regular files are opened, and never for long: the final component is
  checked with ``fstatat`` (a FIFO or a device is refused without being
  opened), opened with ``O_NONBLOCK`` (a FIFO swapped in meanwhile cannot
  block the open), checked again on the descriptor (``S_ISREG``, and the
  same device and inode as the check) and only then made blocking.

The seed compared strings, so job 13's ``../131/secret.txt`` passed a prefix
check against ``.../13``; a later version resolved symlinks by name and then
opened the name, which a swapping job could race.

Listings use the same rules: they walk directories by descriptor
(``os.scandir`` on a descriptor, ``fstatat`` per entry), show a symlink as
what it points to only when that stays inside a root (and never descend
through it), and leave out what a fetch would refuse.
"""

import errno
import hashlib
import json
import os
import secrets
import stat

#: Symlinks followed while resolving one path (the kernel's own limit).
MAX_SYMLINKS = 40

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class PathRefused(Exception):
    """The path is outside every root it may be read from, does not exist,
    or is not something the agent serves (a FIFO, a device, a socket)."""


class Missing(PathRefused):
    """The path names nothing: no such file or directory (a web server's 404,
    where the other refusals are its 403)."""


def _parts(path):
    """The components of a relative path, ``.`` and empty ones dropped."""
    return [p for p in path.split("/") if p not in ("", ".")]


def _climb(parts, original):
    """Apply ``..`` lexically; refuse climbing above the start."""
    out = []
    for part in parts:
        if part == "..":
            if not out:
                raise PathRefused(f"{original!r} is outside the directories files may be read from")
            out.pop()
        else:
            out.append(part)
    return out


class Roots:
    """The roots of one request, opened, and the walk below them.

    ``job_relative``: a job's files, where a leading ``/`` is ignored and
    every path is relative to the (single) root.  Otherwise a relative path
    is taken from the first root and an absolute one must fall inside any.
    Use as a context manager: it holds a descriptor per root.
    """

    def __init__(self, roots, job_relative=None):
        self.paths = [os.path.abspath(r) for r in roots]
        self.real = [os.path.realpath(r) for r in roots]
        self.job_relative = len(roots) == 1 if job_relative is None else job_relative
        self._fds = [None] * len(roots)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for i, fd in enumerate(self._fds):
            if fd is not None:
                os.close(fd)
                self._fds[i] = None

    def root_fd(self, index):
        if self._fds[index] is None:
            try:
                # The root itself is the site's (or the scheduler's) choice
                # and may be reached through a symlink.
                self._fds[index] = os.open(self.paths[index],
                                           os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise Missing(f"{self.paths[index]} does not exist") from None
        return self._fds[index]

    # -- naming ----------------------------------------------------------------

    def _inside(self, path):
        """``(root index, components)`` of an absolute path inside a root, or None."""
        path = os.path.normpath(path)
        for i, bases in enumerate(zip(self.paths, self.real)):
            for base in bases:
                if path == base:
                    return i, []
                if path.startswith(base.rstrip("/") + "/"):
                    return i, _parts(path[len(base.rstrip("/")) + 1:])
        return None

    def locate(self, path, absolute_inside=False):
        """Where a requested path points, lexically: ``(root index, components)``.

        ``absolute_inside``: for a job, an absolute path that names the job
        directory itself is taken as it is (a scheduler hook's answer) rather
        than relative to it.
        """
        if "\0" in path:
            raise PathRefused("the path contains a NUL byte")
        if absolute_inside and path.startswith("/"):
            found = self._inside(path)
            if found is not None and (found[0] == 0 or not self.job_relative):
                return found
        if self.job_relative or not path.startswith("/"):
            return 0, _climb(_parts(path), path)
        found = self._inside(os.path.normpath(path))
        if found is None:
            raise PathRefused(f"{path!r} is outside the directories files may be read from")
        return found

    def name(self, index, parts):
        """How a listing names a location: relative to the first root, or
        absolute in another root."""
        if index == 0:
            return "/".join(parts)
        return os.path.join(self.real[index], *parts)

    def display(self, index, parts):
        return os.path.join(self.real[index], *parts)

    # -- the walk --------------------------------------------------------------

    def open(self, index, parts, original):
        """Open a location below a root, following symlinks only inside roots.

        Returns ``(fd, stat, index, parts)`` where ``index, parts`` is the
        location after symlinks.  A regular file's descriptor is blocking and
        read-only; a directory's is a directory descriptor.  Anything else is
        refused without being read.
        """
        links = 0
        todo = list(parts)
        done = []
        fd = os.dup(self.root_fd(index))
        try:
            while todo:
                name = todo[0]
                last = len(todo) == 1
                try:
                    if last:
                        # Check before opening, so a device is never opened.
                        before = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        if stat.S_ISLNK(before.st_mode):
                            raise OSError(errno.ELOOP, "symlink")
                        if not (stat.S_ISREG(before.st_mode) or stat.S_ISDIR(before.st_mode)):
                            raise PathRefused(f"{original!r} is {_kind(before.st_mode)}, not a "
                                              "regular file: it is not served")
                        flags = _FILE_FLAGS | (os.O_DIRECTORY if stat.S_ISDIR(before.st_mode)
                                               else 0)
                    else:
                        flags = _DIR_FLAGS
                    child = os.open(name, flags, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                        target = _readlink(name, fd)
                        if target is not None:
                            links += 1
                            if links > MAX_SYMLINKS:
                                raise PathRefused(f"{original!r}: too many symbolic links") \
                                    from None
                            index, todo = self._follow(target, index, done, todo[1:],
                                                       original)
                            done = []
                            os.close(fd)
                            fd = -1
                            fd = os.dup(self.root_fd(index))
                            continue
                        if e.errno == errno.ENOTDIR:
                            raise Missing(f"{original!r} does not exist") from None
                    if e.errno == errno.ENOENT:
                        raise Missing(f"{original!r} does not exist") from None
                    raise
                os.close(fd)
                fd = child
                done.append(name)
                todo.pop(0)
                if last:
                    after = os.fstat(fd)
                    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) or \
                            stat.S_IFMT(after.st_mode) != stat.S_IFMT(before.st_mode):
                        raise PathRefused(f"{original!r} changed while being opened")
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                os.set_blocking(fd, True)
            elif not stat.S_ISDIR(st.st_mode):
                raise PathRefused(f"{original!r} is {_kind(st.st_mode)}: it is not served")
            result, fd = (fd, st, index, done), -1
            return result
        finally:
            if fd >= 0:
                os.close(fd)

    def _follow(self, target, index, done, rest, original):
        """Where a symlink at ``done`` in root ``index`` points, plus the
        components still to walk after it."""
        if target.startswith("/"):
            found = self._inside(target)
            if found is None:
                raise PathRefused(f"{original!r} is outside the directories files may be read "
                                  "from (through a symbolic link)")
            index, parts = found
            return index, _climb(parts + rest, original)
        return index, _climb(done + _parts(target) + rest, original)


def _readlink(name, dir_fd):
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return None


def _kind(mode):
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def resolve(roots, path, job_relative=None):
    """The real path ``path`` names inside one of ``roots``, or PathRefused.

    The same walk as :func:`open_file`; for callers that want a name.
    """
    from pathlib import Path

    with Roots(roots, job_relative) as r:
        index, parts = r.locate(path)
        fd, _, index, parts = r.open(index, parts, path)
        os.close(fd)
        return Path(r.display(index, parts))


class OpenedFile:
    """A regular file opened for sending: ``size`` bytes from ``offset``."""

    def __init__(self, fd, path, name, total_size, mtime, offset, size):
        self.handle = os.fdopen(fd, "rb", buffering=0)
        self.path = path
        self.name = name
        self.total_size = total_size
        self.mtime = mtime
        self.offset = offset
        self.size = size

    def close(self):
        self.handle.close()


def open_file(roots, path, job_relative=None, offset=0, length=None, confined=True,
              absolute_inside=False):
    """Open a regular file to send ``length`` bytes (None: to the end) from
    ``offset``; returns an :class:`OpenedFile`.

    ``confined=False`` opens ``path`` as it is (a scheduler hook's own file,
    ``ignore_prefix``): still regular files only, never blocking on a FIFO.
    """
    if offset < 0 or (length is not None and length < 0):
        raise PathRefused("offset and length must not be negative")
    if confined:
        with Roots(roots, job_relative) as r:
            index, parts = r.locate(path, absolute_inside)
            fd, st, index, parts = r.open(index, parts, path)
            where = r.display(index, parts)
    else:
        fd, st = _open_unconfined(path)
        where = path
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise PathRefused(f"{path!r} is a directory")
    if offset > st.st_size:
        os.close(fd)
        raise PathRefused(f"offset {offset} is past the end of {path!r} ({st.st_size} bytes)")
    size = st.st_size - offset if length is None else min(length, st.st_size - offset)
    if offset:
        os.lseek(fd, offset, os.SEEK_SET)
    return OpenedFile(fd, where, os.path.basename(where.rstrip("/")) or where, st.st_size,
                      st.st_mtime, offset, size)


def _open_unconfined(path):
    if "\0" in path:
        raise PathRefused("the path contains a NUL byte")
    try:
        before = os.stat(path)
        if not stat.S_ISREG(before.st_mode):
            raise PathRefused(f"{path!r} is {_kind(before.st_mode)}, not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Missing(f"{path!r} does not exist") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise PathRefused(f"{path!r} is {_kind(st.st_mode)}, not a regular file")
    os.set_blocking(fd, True)
    return fd, st


def checksum(roots, path, job_relative=None, chunk_size=1024 * 1024, beat=None):
    """``{sha256, size, mtime}`` of a regular file, read in chunks; ``beat()``
    is called after each (a deadline watches progress, not the total time)."""
    opened = open_file(roots, path, job_relative)
    digest = hashlib.sha256()
    size = 0
    try:
        while True:
            chunk = opened.handle.read(chunk_size)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
            if beat is not None:
                beat()
    finally:
        opened.close()
    return {"sha256": digest.hexdigest(), "size": size, "mtime": opened.mtime}


def list_files(roots, path, recursive, job_relative=None, with_mtime=False, beat=None):
    """``[[relative path, is_dir, size], ...]`` below ``path``, sorted by path;
    each entry gets its mtime as a fourth element with ``with_mtime``.
    ``beat()`` is called after each directory (for a deadline on progress).

    Paths are relative to the first root (absolute in the others).  A symlink
    is listed as what it points to only when that stays inside a root, and
    never descended into; FIFOs, sockets and devices are left out: a listing
    shows nothing a fetch would refuse.
    """
    entries = []

    def add(name, is_dir, st):
        entry = [name, is_dir, 0 if is_dir or st is None else st.st_size]
        if with_mtime:
            entry.append(st.st_mtime)
        entries.append(entry)

    with Roots(roots, job_relative) as r:
        index, parts = r.locate(path)
        fd, st, index, parts = r.open(index, parts, path)
        if not stat.S_ISDIR(st.st_mode):
            os.close(fd)
            add(r.name(index, parts), False, st)
            return entries
        stack = [(fd, parts)]
        while stack:
            dir_fd, prefix = stack.pop()
            try:
                with os.scandir(dir_fd) as it:
                    children = list(it)
            except OSError:
                children = []
            try:
                for entry in children:
                    location = prefix + [entry.name]
                    try:
                        if entry.is_symlink():
                            target_fd, st, _, _ = r.open(index, location, entry.name)
                            os.close(target_fd)
                            add(r.name(index, location), stat.S_ISDIR(st.st_mode), st)
                            continue
                        # The type comes with the directory entry (d_type);
                        # only files (for their size) need a stat.
                        is_dir = entry.is_dir(follow_symlinks=False)
                        if not (is_dir or entry.is_file(follow_symlinks=False)):
                            continue
                        st = entry.stat(follow_symlinks=False) if with_mtime or not is_dir \
                            else None
                    except (OSError, PathRefused):
                        continue
                    add(r.name(index, location), is_dir, st)
                    if is_dir and recursive:
                        try:
                            child = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
                        except OSError:
                            continue  # swapped for a symlink meanwhile, or gone
                        stack.append((child, location))
            finally:
                os.close(dir_fd)
            if beat is not None:
                beat()
    entries.sort(key=lambda e: e[0])
    return entries


def page(entries, offset=0, limit=None, max_bytes=None):
    """One page of a listing: ``(entries, next offset or None)``.

    At most ``limit`` entries from ``offset``, and no more than fit in
    ``max_bytes`` of JSON (always at least one, so paging moves on).
    """
    end = len(entries) if limit is None else min(len(entries), offset + limit)
    if max_bytes is not None:
        used = 0
        encode = json.encoder.encode_basestring_ascii
        for i in range(offset, end):
            # [path,false,size,mtime], and a comma: numbers are short.
            used += len(encode(entries[i][0])) + 64
            if used > max_bytes and i > offset:
                end = i
                break
    return entries[offset:end], (end if end < len(entries) else None)


# -- uploads -------------------------------------------------------------------

class TooLarge(Exception):
    """An upload went past its size limit."""


class Upload:
    """A file being received: a temporary file beside its final name, in the
    directory ``dir_fd``.  :meth:`commit` renames it over the final name
    once size and checksum match; :meth:`abort` removes it.  Until then the
    final name is left as it was, whatever happens to the transfer."""

    def __init__(self, dir_fd, name, temp, fd, where, max_size):
        self.dir_fd = dir_fd
        self.name = name
        self.temp = temp
        self.fd = fd
        self.path = where
        self.max_size = max_size
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.finished = False

    def write(self, data):
        if self.max_size is not None and self.size + len(data) > self.max_size:
            raise TooLarge(f"{self.path} would exceed the upload limit of {self.max_size} bytes")
        self.sha256.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.size += len(data)

    def commit(self, size, sha256):
        """Put the file in place: ``{"size", "sha256", "mtime"}``."""
        if (size, sha256) != (self.size, self.sha256.hexdigest()):
            raise ValueError(f"the upload of {self.path} arrived damaged ({self.size} of {size} "
                             "bytes, or a checksum mismatch); nothing was put in place")
        os.fsync(self.fd)
        # The final name may have become something else meanwhile: a
        # directory makes the rename fail, and a symlink is replaced, never
        # followed.  Anything but a regular file is refused.
        _check_target(self.dir_fd, self.name, self.path)
        os.rename(self.temp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        mtime = os.fstat(self.fd).st_mtime
        self.finished = True
        self._close()
        return {"size": self.size, "sha256": self.sha256.hexdigest(), "mtime": mtime}

    def abort(self):
        if self.finished:
            return
        self.finished = True
        try:
            os.unlink(self.temp, dir_fd=self.dir_fd)
        except OSError:
            pass
        self._close()

    def _close(self):
        for fd in (self.fd, self.dir_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def _check_target(dir_fd, name, original):
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise PathRefused(f"{original!r} exists and is {_kind(st.st_mode)}: an upload only "
                          "creates or replaces a regular file")


def _directory(r, index, parts, original, mode):
    """Open the directory ``parts`` below root ``index``, making what is
    missing (with ``mode``), by the same walk as reads; ``(fd, index, parts)``."""
    fd, st, index, resolved = r.open(index, [], original)
    try:
        for name in parts:
            created = False
            try:
                child, st, index, resolved = r.open(index, resolved + [name], original)
            except Missing:
                try:
                    os.mkdir(name, mode, dir_fd=fd)
                    created = True
                except FileExistsError:
                    pass
                child, st, index, resolved = r.open(index, resolved + [name], original)
            if not stat.S_ISDIR(st.st_mode):
                os.close(child)
                raise PathRefused(f"{original!r}: {'/'.join(resolved)} is not a directory")
            if created:
                os.fchmod(child, mode)  # mkdir's mode went through the umask
            os.close(fd)
            fd = child
        result, fd = (fd, index, resolved), -1
        return result
    finally:
        if fd >= 0:
            os.close(fd)


def create_upload(roots, path, job_relative=True, max_size=None, dir_mode=0o700):
    """Start receiving ``path`` below the root: an :class:`Upload`.

    The same confinement as reads (symlinks followed only inside the roots,
    nothing opened by name outside them); missing parent directories are
    made with ``dir_mode``; the final name may be new or a regular file.
    """
    with Roots(roots, job_relative) as r:
        index, parts = r.locate(path)
        if not parts:
            raise PathRefused(f"{path!r} names the directory itself; an upload needs a file name")
        name = parts[-1]
        dir_fd, index, resolved = _directory(r, index, parts[:-1], path, dir_mode)
        try:
            _check_target(dir_fd, name, path)
            # Hidden, and short enough for NAME_MAX whatever the final name.
            temp = f".{name[:200]}.upload-{secrets.token_hex(4)}"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
        except BaseException:
            os.close(dir_fd)
            raise
        return Upload(dir_fd, name, temp, fd, r.display(index, resolved + [name]), max_size)
