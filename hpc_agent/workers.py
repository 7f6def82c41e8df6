"""Blocking file work on threads of its own, each call with a deadline.

A job's directory may sit on a file system that stops answering (a hung NFS
mount): a stat, an open or a read then blocks its thread, and Python cannot
interrupt it.  So file work runs on a small pool of its own, apart from the
scheduler's, and submits, polls and cancels go on whatever happens to files.
Each call has a deadline: past it the caller gets :class:`FilesUnavailable`
(the thread is left to finish, and whatever it opened is closed when it
does).  When every thread is held by a call past its deadline, new calls are
refused at once instead of queueing behind them.
"""

from twisted.internet import defer
from twisted.python.failure import Failure


class FilesUnavailable(Exception):
    """A file operation did not finish in time, or too many are stuck."""


class Workers:
    """Runs blocking calls with ``run(f, *args, **kwargs) -> Deferred`` (a
    thread pool), each with a deadline measured on ``clock``."""

    def __init__(self, clock, run, size, deadline):
        self._clock = clock
        self._run = run
        self.size = size
        self.deadline = deadline
        #: Calls past their deadline that have not returned yet.
        self.stuck = 0

    def call(self, f, *args, what="a file operation", cleanup=None, progress=False, **kwargs):
        """``f(*args, **kwargs)`` on a worker; a Deferred with its result.

        ``cleanup(result)`` disposes of a result that comes too late (an open
        file).  With ``progress``, ``f`` gets a ``beat`` keyword to call as it
        progresses, and the deadline counts from the last beat (a checksum of
        a large file takes long, but never stalls).
        """
        if self.stuck >= self.size:
            return defer.fail(FilesUnavailable(
                f"{self.stuck} file operations have not returned for more than "
                f"{self.deadline:g} s (is a file system hung?); try again later"))
        result = defer.Deferred()
        call = {"late": False, "last": self._clock.seconds(), "timer": None}
        if progress:
            # Called on the worker thread: a float assignment is atomic.
            kwargs["beat"] = lambda: call.__setitem__("last", self._clock.seconds())

        def check():
            call["timer"] = None
            idle = self._clock.seconds() - call["last"]
            if progress and idle < self.deadline:
                call["timer"] = self._clock.callLater(self.deadline - idle, check)
                return
            call["late"] = True
            self.stuck += 1
            result.errback(FilesUnavailable(
                f"{what} did not finish within {self.deadline:g} s "
                "(HPC_FILE_TIMEOUT_SECONDS); the file system may be hung"))

        def finished(outcome):
            if call["late"]:
                self.stuck -= 1
                if cleanup is not None and not isinstance(outcome, Failure):
                    cleanup(outcome)
                return None
            if call["timer"] is not None and call["timer"].active():
                call["timer"].cancel()
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)
            return None

        call["timer"] = self._clock.callLater(self.deadline, check)
        self._run(f, *args, **kwargs).addBoth(finished)
        return result
