"""hpcd's log observer (hpcd.logs): rate limits, JSON lines, the AMP filter."""

import io
import json

from twisted.logger import LogLevel, Logger, LogPublisher, formatEvent
from twisted.python.failure import Failure

from hpcd import logs


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def warning(fmt, **fields):
    return {"log_level": LogLevel.warn, "log_namespace": "hpcd.test", "log_format": fmt,
            "log_time": 0.0, **fields}


def test_repeated_warnings_pass_up_to_the_limit_then_are_counted():
    written, clock = [], FakeClock()
    limiter = logs.RateLimiter(written.append, 3, clock=clock)
    for i in range(10):
        limiter(warning("cluster {id}: refused a frame", id=i))
    assert [formatEvent(e) for e in written] == [f"cluster {i}: refused a frame"
                                                 for i in range(3)]
    clock.now += 1.0
    limiter.flush()
    (summary,) = written[3:]
    assert formatEvent(summary) == ("7 more like this suppressed in 1 s, the last: "
                                    "cluster 9: refused a frame")
    assert summary["log_level"] == LogLevel.warn
    limiter.flush()
    assert len(written) == 4  # said once


def test_the_summary_also_comes_before_the_next_warning_of_that_kind():
    written, clock = [], FakeClock()
    limiter = logs.RateLimiter(written.append, 1, clock=clock)
    limiter(warning("a {n}", n=1))
    limiter(warning("a {n}", n=2))
    clock.now += 1.5
    limiter(warning("a {n}", n=3))
    assert [formatEvent(e) for e in written] == [
        "a 1", "1 more like this suppressed in 2 s, the last: a 2", "a 3"]


def test_kinds_are_limited_separately_and_info_is_never_limited():
    written, clock = [], FakeClock()
    limiter = logs.RateLimiter(written.append, 1, clock=clock)
    for _ in range(3):
        limiter(warning("a"))
        limiter(warning("b"))
        limiter({**warning("job event"), "log_level": LogLevel.info})
    assert [formatEvent(e) for e in written] == ["a", "b", "job event", "job event",
                                                 "job event"]


def test_zero_means_no_limit():
    written = []
    limiter = logs.RateLimiter(written.append, 0, clock=FakeClock())
    for _ in range(20):
        limiter(warning("a"))
    assert len(written) == 20


def test_json_lines_carry_the_text_and_the_events_fields():
    out = io.StringIO()
    publisher = LogPublisher(logs.json_lines_observer(out))
    log = Logger(namespace="hpcd.dispatch", observer=publisher)
    log.info("cluster {cluster} job {job}: submit sent to the agent", cluster=3, job=17,
             action="submit", hpc_event="dispatched")
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("dispatching job {job} failed", Failure(), job=18)
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first["text"] == "cluster 3 job 17: submit sent to the agent"
    assert (first["level"], first["namespace"]) == ("info", "hpcd.dispatch")
    assert (first["cluster"], first["job"], first["hpc_event"]) == (3, 17, "dispatched")
    assert first["time"].endswith("+00:00")
    assert second["level"] == "critical" and second["job"] == 18
    assert "ZeroDivisionError" in second["traceback"]


def test_amp_per_connection_lines_are_dropped():
    written = []
    observer, _ = logs.build_observer(written.append, 5)
    amp_log = Logger(namespace="twisted.protocols.amp", observer=observer)
    amp_log.info("{cls} connection established (HOST:{host} PEER:{peer})", cls="X", host=1,
                 peer=2)
    amp_log.info("{cls} connection lost (HOST:{host} PEER:{peer})", cls="X", host=1, peer=2)
    amp_log.debug("a debug line")
    amp_log.info("something else from AMP")
    assert [formatEvent(e) for e in written] == ["something else from AMP"]


def test_twistd_keeps_its_own_observer_with_logger_or_syslog():
    assert logs.observer_for({"logger": "x.y", "logfile": None}, "text", 5) == (None, None)
    assert logs.observer_for({"syslog": True}, "json", 5) == (None, None)
    assert logs.observer_for(None, "text", 5) == (None, None)


def test_text_lines_carry_twisteds_time_worked_out_once_a_second(monkeypatch):
    from twisted.logger import formatTime

    made = []
    monkeypatch.setattr(logs, "formatTime", lambda when: made.append(when) or formatTime(when))
    out = io.StringIO()
    observer = logs.text_observer(out)
    for when in (1_780_000_000.1, 1_780_000_000.9, 1_780_000_001.0, 1_780_000_001.5):
        observer({"log_time": when, "log_format": "x", "log_namespace": "t",
                  "log_level": LogLevel.info})
    stamps = [line.split(" ")[0] for line in out.getvalue().splitlines()]
    assert stamps == [formatTime(w) for w in (1_780_000_000.1, 1_780_000_000.9,
                                               1_780_000_001.0, 1_780_000_001.5)]
    assert made == [1_780_000_000, 1_780_000_001]
