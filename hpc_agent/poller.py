"""When the agent asks its scheduler about its jobs."""

from twisted.internet import defer
from twisted.logger import Logger

log = Logger()


class Poller:
    """Polls fast while jobs change and backs off to slow when nothing does.

    Never faster than the scheduler's ``poll_fast_seconds`` nor than the
    site's command budget (``HPC_SCHEDULER_COMMANDS_PER_MINUTE``) allows.
    """

    def __init__(self, core, reactor):
        self._core = core
        self._reactor = reactor
        cls = core.scheduler_class
        budget = core.settings.HPC_SCHEDULER_COMMANDS_PER_MINUTE
        floor = 60.0 / budget if budget and getattr(cls, "rate_limited", True) else 0.0
        self.fast = max(cls.poll_fast_seconds, floor)
        self.slow = max(cls.poll_slow_seconds, self.fast)
        self.interval = self.slow
        self._call = None
        self._running = False
        self._last_poll = -1e9

    def start(self):
        self._schedule(0)

    def stop(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def kick(self):
        """Something changed (a submit, a cancel): poll soon and fast."""
        self.interval = self.fast
        wait = max(0.0, self._last_poll + self.fast - self._reactor.seconds())
        if self._call is not None and self._call.active():
            if self._call.getTime() - self._reactor.seconds() > wait:
                self._call.reset(wait)
        elif not self._running:
            self._schedule(wait)

    def _schedule(self, delay):
        self._call = self._reactor.callLater(delay, self._run)

    def _run(self):
        self._tick().addErrback(lambda f: log.failure("the poller failed", f))

    @defer.inlineCallbacks
    def _tick(self):
        self._call = None
        self._running = True
        self._last_poll = self._reactor.seconds()
        changed = False
        try:
            changed = yield self._core.poll()
        except Exception:
            log.failure("polling the scheduler failed")
        finally:
            self._running = False
            self.interval = self.fast if changed else min(self.slow, self.interval * 2)
            if self._call is None:
                # Whatever failed, the next poll comes.
                self._schedule(self.interval)
