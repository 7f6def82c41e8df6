"""Making the Unix socket Django talks to, safely.

The socket's directory must be one only hpcd's user can write: in a shared
one such as /tmp another local user could bind the path first (or plant its
``.lock``), stop hpcd from starting, and then receive Django's commands.
hpcd takes the path's lock itself, so a second hpcd fails with a message
naming the first, removes a stale socket file left by a crash, binds with a
restrictive umask, and then applies ``HPC_IPC_SOCKET_MODE`` and
``HPC_IPC_SOCKET_GROUP`` so that a web server running as another user can be
let in on purpose.
"""

import grp
import os

from twisted.python.lockfile import FilesystemLock

from djangoapp.ipc import socket_directory_problem

#: sun_path holds 108 bytes, the terminating NUL included.
MAX_PATH_BYTES = 107


class StartupError(Exception):
    """hpcd cannot start; the message says what to do, in one line."""


def prepare(path, is_default, group=None):
    """Check and lock ``path`` before binding; returns the held lock.

    The default path's directory (``<BASE_DIR>/run``) is created when
    missing; a configured path's directory must exist.
    """
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise StartupError(f"the socket path {path} is longer than {MAX_PATH_BYTES} bytes, "
                           "the limit of a Unix socket; set a shorter HPC_IPC_UNIX_SOCKET")
    directory = os.path.dirname(os.path.abspath(path))
    if is_default and not os.path.isdir(directory) and os.path.isdir(os.path.dirname(directory)):
        os.mkdir(directory, 0o750 if group else 0o700)
        if group:
            os.chown(directory, -1, group_id(group))
    problem = socket_directory_problem(path)
    if problem:
        raise StartupError(problem)
    owner = os.stat(directory).st_uid
    if owner not in (0, os.getuid()):
        raise StartupError(f"directory {directory} belongs to uid {owner}, not to hpcd's user "
                           f"(uid {os.getuid()}); Django would not trust a socket there")
    lock = FilesystemLock(path + ".lock")
    if not lock.lock():
        holder = _lock_holder(path + ".lock")
        raise StartupError(f"another hpcd ({holder}) is using {path}; stop it first, or give "
                           "this one another HPC_IPC_UNIX_SOCKET")
    if os.path.lexists(path):
        # Ours by the lock: a crashed hpcd left it.
        os.unlink(path)
    return lock


def finish(path, mode, group=None):
    """Give the bound socket its configured mode and group."""
    if group:
        os.chown(path, -1, group_id(group))
    os.chmod(path, mode)


def group_id(name):
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise StartupError(f"HPC_IPC_SOCKET_GROUP names group {name!r}, which does not "
                           "exist") from None


def _lock_holder(lock_path):
    try:
        return f"pid {os.readlink(lock_path)}"
    except OSError:
        return "unknown pid"
