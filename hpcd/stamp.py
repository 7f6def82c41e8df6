"""The sessions stamp: a number Django reads to know hpcd's answers still hold.

``is_connected()`` asks hpcd which token a cluster's live connection used
(IsClusterOnline).  The answer changes only when an agent session comes or
goes, which is rare next to how often a portal asks, so Django keeps the
answer and asks again only when this stamp has moved: an 8-byte counter in
a small file beside the Unix socket (``<socket>.stamp``), mapped into memory
on both sides.  hpcd changes it in the same reactor turn as the session it
describes, before it can answer anything else, so an answer Django kept
under the old stamp is never used after the change.

hpcd holds an exclusive ``flock`` on the file while it runs: a stamp whose
file nobody locks belongs to an hpcd that died (kill -9 leaves the file),
and Django then asks, and learns that hpcd is down.  Each start writes a
new file (a new inode, renamed into place) with a random first value, so
numbers of an earlier hpcd never match.  The file has the socket's mode and
group: whoever may use the socket may read it.
"""

import fcntl
import mmap
import os
import random

# Django reads what hpcd writes: one layout and one place, defined there.
from djangoapp.ipc import STAMP_FORMAT as FORMAT
from djangoapp.ipc import stamp_path


class SessionsStamp:
    """hpcd's side: creates, locks and moves the stamp."""

    def __init__(self, socket_path):
        self.path = stamp_path(socket_path)
        self.value = random.getrandbits(63)
        self._fd = None
        self._map = None

    def open(self, mode=0o600, group_id=-1):
        """Write the first value into a new file, lock it, and put it in place."""
        temporary = f"{self.path}.{os.getpid()}"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, FORMAT.pack(self.value))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if group_id != -1:
                os.fchown(fd, -1, group_id)
            os.fchmod(fd, mode & 0o644)  # read access at most: only hpcd writes it
            os.rename(temporary, self.path)
        except BaseException:
            os.close(fd)
            os.unlink(temporary)
            raise
        self._fd = fd
        self._map = mmap.mmap(fd, FORMAT.size)

    def bump(self):
        """A session came or went: answers given before no longer hold."""
        self.value = (self.value + 1) % 2 ** 64
        if self._map is not None:
            FORMAT.pack_into(self._map, 0, self.value)

    def close(self):
        """On a clean stop: the file goes, and with it the lock."""
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._map.close()
        os.close(self._fd)
        self._fd = self._map = None
