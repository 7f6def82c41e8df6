"""File work with deadlines (hpc_agent.workers), on a Clock with held calls."""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from hpc_agent.workers import FilesUnavailable, Workers


class Held:
    """A thread pool whose calls finish when the test says."""

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args, **kwargs):
        d = defer.Deferred()
        self.calls.append((d, f, args, kwargs))
        return d

    def finish(self, i=0):
        d, f, args, kwargs = self.calls.pop(i)
        defer.maybeDeferred(f, *args, **kwargs).chainDeferred(d)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def pool():
    return Held()


@pytest.fixture
def workers(clock, pool):
    return Workers(clock, pool, size=2, deadline=10.0)


def failure_of(d):
    failures = []
    d.addErrback(failures.append)
    return failures[0].value if failures else None


def test_a_call_in_time_gives_its_result_and_leaves_no_timer(workers, pool, clock):
    d = workers.call(lambda: 42)
    pool.finish()
    assert d.result == 42 and clock.getDelayedCalls() == []


def test_a_call_past_its_deadline_fails_and_its_late_result_is_cleaned_up(workers, pool, clock):
    cleaned = []
    d = workers.call(lambda: "an open file", what="opening x", cleanup=cleaned.append)
    clock.advance(10)
    error = failure_of(d)
    assert isinstance(error, FilesUnavailable) and "opening x" in str(error)
    assert workers.stuck == 1
    pool.finish()
    assert cleaned == ["an open file"] and workers.stuck == 0


def test_when_every_worker_is_stuck_new_calls_are_refused_at_once(workers, pool, clock):
    for _ in range(2):
        workers.call(lambda: None).addErrback(lambda f: None)
    clock.advance(10)
    refused = workers.call(lambda: None)
    assert isinstance(failure_of(refused), FilesUnavailable)
    assert len(pool.calls) == 2  # nothing more was queued behind them
    pool.finish()
    assert workers.call(lambda: 1) is not None and len(pool.calls) == 2


def test_a_call_that_keeps_making_progress_may_take_longer(workers, pool, clock):
    def work(beat):
        return "done"

    d = workers.call(work, progress=True)
    (_, _, _, kwargs) = pool.calls[0]
    for _ in range(5):
        clock.advance(8)
        kwargs["beat"]()  # a chunk was read
    assert not d.called
    clock.advance(10)  # then it stalls
    assert isinstance(failure_of(d), FilesUnavailable)


def test_a_failure_of_the_call_itself_is_passed_on(workers, pool):
    def boom():
        raise OSError(5, "Input/output error")

    d = workers.call(boom)
    pool.finish()
    assert isinstance(failure_of(d), OSError) and workers.stuck == 0
