"""What hpcd writes to its log, and how.

twistd builds the log observer before it starts the service; hpcd gives it
one of its own (:func:`observer_for`) as the application's ``ILogObserver``
component, which twistd uses unless ``--logger`` names another.  It writes
to the same place twistd would (``--logfile``, stdout with ``--nodaemon``),
as text or as JSON lines (``twistd hpcd --log-format json``), and on the way:

* drops the two lines AMP writes for every connection Django opens
  ("ControlProtocol connection established/lost"): one pair per request of
  a busy site drowned everything else;
* drops debug events;
* limits each kind of warning (the same message format, whatever its
  values) to a few lines per second, then writes one line saying how many
  were suppressed (:class:`RateLimiter`).

Why an observer and not a helper called at each warning: the policy lives
in one place, the call sites stay plain ``log.warn(...)`` (other modules
need not know about it), warnings from Twisted and Autobahn are limited
too, and only what is *written* is limited: the metrics observer
(:mod:`hpcd.metrics`) still sees every event.

Job events are ordinary log calls with a ``hpc_event`` field naming the
event and ``cluster`` and ``job`` fields; see README "Reading hpcd's log".
"""

import json
import signal
import sys
import threading
import time
from datetime import datetime, timezone

from twisted.logger import (FileLogObserver, FilteringLogObserver, ILogObserver, LogLevel,
                            LogLevelFilterPredicate, PredicateResult, formatEvent,
                            formatEventAsClassicLogText, formatTime)
from twisted.python.logfile import LogFile
from zope.interface import implementer

FORMATS = ("text", "json")

#: (namespace, format) of AMP's per-connection lines.
_AMP_CONNECTION_LINES = {
    ("twisted.protocols.amp", "{cls} connection established (HOST:{host} PEER:{peer})"),
    ("twisted.protocols.amp", "{cls} connection lost (HOST:{host} PEER:{peer})"),
}


def not_per_connection(event):
    """A filter predicate: no AMP line per connection."""
    if (event.get("log_namespace"), event.get("log_format")) in _AMP_CONNECTION_LINES:
        return PredicateResult.no
    return PredicateResult.maybe


# -- JSON lines ---------------------------------------------------------------

_SKIP = {"log_logger", "log_source", "log_format", "log_flattened", "log_trace", "log_io",
         "log_failure", "log_time", "log_level", "log_namespace", "log_system", "format",
         "message", "isError", "system", "time", "log_text", "why"}


def _plain(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def event_as_json(event):
    """One JSON object per event, for ``jq`` and log shippers.

    Not twisted.logger's own eventAsJSON: that one serialises the event for
    reading back into Twisted (Logger objects, flattened formats); this one
    keeps what a person searches for: time, level, namespace, the formatted
    text, and the event's own fields (``cluster``, ``job``, ``hpc_event``...).
    """
    level = event.get("log_level")
    record = {
        "time": datetime.fromtimestamp(event.get("log_time") or time.time(),
                                       timezone.utc).isoformat(timespec="milliseconds"),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", ""),
        "text": formatEvent(event),
    }
    for key, value in event.items():
        if key not in _SKIP and not key.startswith("_"):
            record.setdefault(key, _plain(value))
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, default=str) + "\n"


def json_lines_observer(out):
    return FileLogObserver(out, event_as_json)


class _TimeOncePerSecond:
    """Twisted's formatTime for log lines, worked out once per second.

    A time with its UTC offset costs more than the rest of a line; a busy
    hpcd writes thousands of job events a second.  Lines come from the
    reactor and the database threads: the cache is one tuple, replaced
    whole."""

    def __init__(self):
        self._cached = (None, "")

    def __call__(self, when):
        if when is None:
            return formatTime(when)
        second = int(when)
        cached_second, text = self._cached
        if second != cached_second:
            text = formatTime(second)
            self._cached = (second, text)
        return text


def text_observer(out):
    format_time = _TimeOncePerSecond()
    return FileLogObserver(out, lambda event: formatEventAsClassicLogText(
        event, formatTime=format_time))


# -- rate limiting --------------------------------------------------------------

@implementer(ILogObserver)
class RateLimiter:
    """Passes at most ``per_second`` warnings (and worse) of each kind a second.

    A kind is the event's namespace and message format, so "cluster 3:
    refused a frame" and "cluster 4: refused a frame" count together.  What
    is held back is counted; :meth:`flush` (called every second by hpcd, and
    on the next warning of that kind) writes one line per kind saying how
    many were suppressed.  Events arrive from the reactor and from the
    database threads, hence the lock.
    """

    def __init__(self, observer, per_second, clock=time.monotonic):
        self._observer = observer
        self._per_second = per_second
        self._clock = clock
        self._lock = threading.Lock()
        self._windows = {}  # kind -> [window start, passed, suppressed, sample event]

    def __call__(self, event):
        level = event.get("log_level")
        if (not self._per_second or level is None or level < LogLevel.warn
                or event.get("hpc_suppressed")):
            self._observer(event)
            return
        kind = (event.get("log_namespace"), event.get("log_format"))
        now = self._clock()
        with self._lock:
            window = self._windows.get(kind)
            summary = None
            if window is None or now - window[0] >= 1.0:
                if window is not None and window[2]:
                    summary = self._summary(window)
                window = self._windows[kind] = [now, 0, 0, None]
            if window[1] < self._per_second:
                window[1] += 1
                passed = True
            else:
                window[2] += 1
                window[3] = event
                passed = False
        if summary is not None:
            self._observer(summary)
        if passed:
            self._observer(event)

    def flush(self):
        """Report the kinds whose window is over and that suppressed lines."""
        now = self._clock()
        summaries = []
        with self._lock:
            for kind, window in list(self._windows.items()):
                if now - window[0] >= 1.0:
                    if window[2]:
                        summaries.append(self._summary(window))
                    del self._windows[kind]
        for summary in summaries:
            self._observer(summary)

    def _summary(self, window):
        sample = window[3]
        return {
            "log_level": sample.get("log_level", LogLevel.warn),
            "log_namespace": sample.get("log_namespace", "hpcd"),
            "log_time": time.time(),
            "log_format": "{count} more like this suppressed in {seconds:.0f} s, the last: "
                          "{last}",
            "count": window[2],
            "seconds": max(1.0, self._clock() - window[0]),
            "last": formatEvent(sample),
            "hpc_suppressed": True,
        }


# -- assembling ---------------------------------------------------------------

def _log_file(twistd_options):
    """Where twistd would write: the same rules as its own UnixAppLogger."""
    name = twistd_options.get("logfile")
    nodaemon = twistd_options.get("nodaemon")
    if name == "-" or (nodaemon and not name):
        return sys.stdout
    log_file = LogFile.fromFullPath(name or "twistd.log")
    # As twistd does: SIGUSR1 reopens the file (after logrotate moved it).
    if not signal.getsignal(signal.SIGUSR1):
        def rotate(signum, frame):
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return log_file


def observer_for(twistd_options, log_format, warnings_per_second):
    """hpcd's log observer, or None to leave the choice to twistd.

    ``twistd_options`` are twistd's own (``--logfile``, ``--nodaemon``,
    ``--syslog``, ``--logger``).  Returns ``(observer, rate_limiter)``.
    """
    if twistd_options is None or twistd_options.get("logger") or twistd_options.get("syslog"):
        return None, None
    out = _log_file(twistd_options)
    writer = json_lines_observer(out) if log_format == "json" else text_observer(out)
    return build_observer(writer, warnings_per_second)


def build_observer(writer, warnings_per_second):
    """``(observer, rate_limiter)``: ``writer`` behind the filters and the limit."""
    limiter = RateLimiter(writer, int(warnings_per_second))
    observer = FilteringLogObserver(
        limiter, [not_per_connection, LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)])
    return observer, limiter
