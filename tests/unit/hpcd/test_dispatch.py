"""hpcd's dispatcher (hpcd.dispatch): batches of claimed jobs per cluster,
a window of batches in flight, notifications looked up together.

Driven with a Clock, a fake store holding the jobs' states (checked against
the real Store's signatures) and fake agent sessions whose requests the
test answers.
"""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from djangoapp.protocol import AgentError, ClusterOffline
from fakes import mismatches
from hpc_agent.status import NEEDS_DISPATCH
from hpc_agent.status import JobStatus as S
from hpcd import dispatch
from hpcd.dispatch import BATCH, NOTIFY_SECONDS, Dispatcher
from hpcd.store import Store

PARAMS = {"script": "true"}


class FakeStore:
    """The jobs' states, changed as the real store functions change them;
    ``hold`` makes lookups wait until the test fires them."""

    FAKE_ONLY = ("add", "status", "fire")

    def __init__(self):
        self.jobs = {}  # id -> [status, cluster]
        self.calls = []
        self.hold = False
        self.held = []

    def add(self, first, count, status=S.PENDING, cluster=1):
        for job in range(first, first + count):
            self.jobs[job] = [status, cluster]

    def status(self, job):
        return self.jobs[job][0]

    def _answer(self, value):
        if not self.hold:
            return defer.succeed(value)
        d = defer.Deferred()
        self.held.append((d, value))
        return d

    def fire(self):
        d, value = self.held.pop(0)
        d.callback(value)

    def _rows(self, ids):
        return [{"job": j, "status": self.jobs[j][0], "cluster_id": self.jobs[j][1],
                 "parameters": PARAMS} for j in ids if self.jobs[j][0] in NEEDS_DISPATCH]

    def work(self, job_id=None):
        self.calls.append(("work", job_id))
        return self._answer(self._rows(sorted(self.jobs)))

    def work_of(self, job_ids):
        self.calls.append(("work_of", sorted(job_ids)))
        return self._answer(self._rows([j for j in sorted(job_ids) if j in self.jobs]))

    def claim_work(self, cluster_id, limit, max_bytes):
        self.calls.append(("claim_work", cluster_id))
        claimed = [j for j in sorted(self.jobs)
                   if self.jobs[j] == [S.PENDING, cluster_id]][:limit]
        for j in claimed:
            self.jobs[j][0] = S.SUBMITTING
        return defer.succeed([{"job": j, "parameters": PARAMS} for j in claimed])


class FakeSession:
    def __init__(self, store, knows_submit_many=True):
        self.store = store
        self.knows_submit_many = knows_submit_many
        self.requests = []  # [(type, fields, Deferred)]
        self.not_submitting = []  # jobs sent a submit while not SUBMITTING

    def request(self, mtype, timeout=None, **fields):
        d = defer.Deferred()
        if mtype == "submit_many" and not self.knows_submit_many:
            d.errback(AgentError("unexpected message type 'submit_many'", "unknown_type"))
        else:
            if mtype in ("submit", "submit_many"):
                # What is sent is SUBMITTING in the database already.
                jobs = [j["job"] for j in fields["jobs"]] if "jobs" in fields else [fields["job"]]
                self.not_submitting.extend(j for j in jobs if self.store.status(j) != S.SUBMITTING)
            self.requests.append((mtype, fields, d))
        return d

    def answer(self, index=0, status=S.SUBMITTED):
        mtype, fields, d = self.requests.pop(index)
        if mtype == "submit_many":
            for j in fields["jobs"]:
                self.store.jobs[j["job"]][0] = status
            d.callback({"jobs": [{"job": j["job"], "ok": True, "scheduler_id": "s",
                                  "status": int(status)} for j in fields["jobs"]]})
        else:
            self.store.jobs[fields["job"]][0] = status
            d.callback({"status": int(status)})
        return fields


class FakeClusters:
    def __init__(self):
        self.sessions = {}

    def session(self, cluster_id):
        return self.sessions.get(cluster_id)


@pytest.fixture
def env():
    class Env:
        pass

    e = Env()
    e.clock = Clock()
    e.store = FakeStore()
    e.clusters = FakeClusters()
    e.session = e.clusters.sessions[1] = FakeSession(e.store)
    e.dispatcher = Dispatcher(e.clock, e.store, e.clusters, scan_seconds=30)
    e.dispatcher.startService()  # scans at once: nothing yet
    e.store.calls.clear()
    yield e
    e.dispatcher.stopService()
    assert all(s.not_submitting == [] for s in e.clusters.sessions.values())


def sizes(session):
    return [len(fields["jobs"]) for mtype, fields, _ in session.requests
            if mtype == "submit_many"]


def test_the_fake_store_matches_the_real_one():
    assert mismatches(FakeStore, Store) == []


def test_a_burst_of_notifications_is_one_lookup_and_batches_of_claimed_jobs(env):
    env.store.add(1, BATCH * 2 + 10)
    for job in range(1, BATCH * 2 + 11):
        env.dispatcher.notify(job)
    assert env.store.calls == []
    env.clock.advance(NOTIFY_SECONDS)
    assert env.store.calls == [("work_of", list(range(1, BATCH * 2 + 11))),
                               ("claim_work", 1)]
    # The window starts at one batch in flight.
    assert sizes(env.session) == [BATCH]
    assert env.dispatcher.in_flight == BATCH
    env.session.answer()
    # Answered quickly: the window grows, two batches go out.
    assert sizes(env.session) == [BATCH, 10]
    env.session.answer()
    env.session.answer()
    assert all(env.store.status(j) == S.SUBMITTED for j in env.store.jobs)
    assert env.dispatcher.in_flight == 0
    # The last claim came back short: no further claim.
    assert env.store.calls.count(("claim_work", 1)) == 3


def test_submit_many_from_django_is_a_scan(env):
    env.store.add(1, 3)
    env.dispatcher.notify(0)
    env.clock.advance(NOTIFY_SECONDS)
    assert env.store.calls[0] == ("work", None)
    assert sizes(env.session) == [3]


def test_the_window_halves_when_answers_are_slow_and_drops_to_one_on_failure(env):
    env.store.add(1, BATCH * 20)
    env.dispatcher.scan()
    window = lambda: env.dispatcher._rounds[1].window  # noqa: E731
    while window() < dispatch.WINDOW_MAX:
        env.session.answer()
    assert len(env.session.requests) == dispatch.WINDOW_MAX
    env.clock.advance(dispatch.WINDOW_TARGET_SECONDS + 1)
    env.session.answer()
    assert window() == dispatch.WINDOW_MAX // 2
    assert len(env.session.requests) == dispatch.WINDOW_MAX - 1  # none claimed
    _, _, d = env.session.requests.pop(0)
    d.errback(ClusterOffline("gone"))
    assert window() == 1


def test_a_failed_batch_stays_submitting_and_the_next_scan_sends_it_again(env):
    env.store.add(1, 3)
    env.dispatcher.scan()
    mtype, fields, d = env.session.requests.pop()
    d.errback(ClusterOffline("the agent went away"))
    assert [env.store.status(j) for j in (1, 2, 3)] == [S.SUBMITTING] * 3
    assert env.dispatcher.in_flight == 0
    env.clock.advance(30)  # the periodic scan
    assert [[j["job"] for j in f["jobs"]] for _, f, _ in env.session.requests] == [[1, 2, 3]]


def test_an_agent_without_submit_many_gets_one_submit_per_job(env):
    env.session = env.clusters.sessions[1] = FakeSession(env.store, knows_submit_many=False)
    env.store.add(1, 3)
    env.dispatcher.scan()
    assert [(m, f["job"]) for m, f, _ in env.session.requests] == \
        [("submit", 1), ("submit", 2), ("submit", 3)]
    for _ in range(3):
        env.session.answer()
    env.store.add(4, 1)
    env.dispatcher.notify(4)
    env.clock.advance(NOTIFY_SECONDS)
    assert [(m, f["job"]) for m, f, _ in env.session.requests] == [("submit", 4)]


def test_a_job_answered_while_a_lookup_ran_is_not_sent_again_from_it(env):
    env.store.add(1, 2)
    env.dispatcher.scan()
    assert sizes(env.session) == [2]
    env.store.hold = True
    env.dispatcher.scan()  # reads both as SUBMITTING...
    env.session.answer()  # ...then their answer comes
    env.store.fire()
    assert env.session.requests == []


def test_a_job_notified_while_its_submit_is_in_flight_is_sent_once(env):
    """Another job's notification claims it; its own then finds it in flight.
    The answer comes before the agent's SUBMITTED is stored: no second send."""
    env.store.add(1, 1)
    env.dispatcher.notify(1)
    env.clock.advance(NOTIFY_SECONDS)
    assert sizes(env.session) == [1]
    env.dispatcher.notify(1)
    env.clock.advance(NOTIFY_SECONDS)
    env.session.answer(status=S.SUBMITTING)
    env.clock.advance(NOTIFY_SECONDS)
    assert env.session.requests == []
    assert env.store.calls.count(("work_of", [1])) == 2


def test_a_cancel_notified_while_the_submit_is_in_flight_is_sent_once_answered(env):
    env.store.add(1, 1)
    env.dispatcher.scan()
    env.store.jobs[1][0] = S.CANCELLING  # Django cancelled it meanwhile
    env.dispatcher.notify(1)
    env.clock.advance(NOTIFY_SECONDS)
    assert [m for m, _, _ in env.session.requests] == ["submit_many"]
    env.session.answer(status=S.CANCELLING)
    env.clock.advance(NOTIFY_SECONDS)
    assert [(m, f["job"]) for m, f, _ in env.session.requests] == [("cancel", 1)]


def test_nothing_is_claimed_for_a_cluster_without_an_agent(env):
    env.store.add(1, 2, cluster=2)
    env.dispatcher.scan()
    assert ("claim_work", 2) not in env.store.calls
    env.clusters.sessions[2] = session = FakeSession(env.store)
    env.dispatcher.scan()  # what hpcd does when a cluster comes online
    assert sizes(session) == [2]


def test_batches_shrink_while_a_slow_agent_answers_and_grow_back(env):
    env.store.add(1, BATCH * 8)
    env.dispatcher.scan()
    assert sizes(env.session) == [BATCH]
    # One batch in flight and a slow answer: the next batch is smaller.
    env.clock.advance(dispatch.WINDOW_TARGET_SECONDS + 1)
    env.session.answer()
    assert sizes(env.session) == [BATCH // 2]
    env.clock.advance(dispatch.WINDOW_TARGET_SECONDS + 1)
    env.session.answer()
    assert sizes(env.session) == [BATCH // 4]
    _, _, d = env.session.requests.pop(0)
    d.errback(ClusterOffline("timed out"))
    assert sizes(env.session) == [BATCH // 8]
    env.dispatcher.scan()  # the failed batch again, in batches of the new size
    assert sizes(env.session) == [BATCH // 8] * 3
    # Quick answers: back to full batches.
    seen = []
    while env.session.requests:
        seen.append(len(env.session.answer()["jobs"]))
    assert seen[:3] == [BATCH // 8] * 3 and seen[3] > BATCH // 8 and BATCH in seen


def test_batches_never_shrink_below_the_minimum(env):
    env.store.add(1, BATCH * 4)
    env.dispatcher.scan()
    for _ in range(10):
        env.clock.advance(dispatch.WINDOW_TARGET_SECONDS + 1)
        env.session.answer()
    assert sizes(env.session) == [dispatch.MIN_BATCH]


def test_a_pending_job_on_a_known_cluster_is_claimed_without_a_lookup(env):
    """What submit() sends: the state and the cluster it stored."""
    env.store.add(1, 3)
    for job in (1, 2, 3):
        env.dispatcher.notify(job, S.PENDING, 1)
    env.clock.advance(NOTIFY_SECONDS)
    assert env.store.calls == [("claim_work", 1)]
    assert sizes(env.session) == [3]


def test_a_hint_that_is_stale_costs_an_empty_claim_and_sends_nothing(env):
    env.store.add(1, 1, status=S.CANCELLED)
    env.dispatcher.notify(1, S.PENDING, 1)
    env.clock.advance(NOTIFY_SECONDS)
    assert env.store.calls == [("claim_work", 1)]
    assert env.session.requests == []
    assert env.dispatcher._rounds == {}


def test_other_notifications_are_still_looked_up(env):
    env.store.add(1, 1, status=S.CANCELLING)
    env.dispatcher.notify(1, S.CANCELLING, 1)
    env.dispatcher.notify(2, S.PENDING, None)  # no cluster chosen: hpcd looks
    env.clock.advance(NOTIFY_SECONDS)
    assert env.store.calls == [("work_of", [1, 2])]
    assert [(m, f["job"]) for m, f, _ in env.session.requests] == [("cancel", 1)]


def test_jobs_trickling_in_gather_behind_the_batch_in_flight(env):
    """submit() calls one by one: after a small claim the next waits for the
    answer, so what arrived meanwhile goes out as one batch."""
    env.store.add(1, 1)
    env.dispatcher.notify(1, S.PENDING, 1)
    env.clock.advance(NOTIFY_SECONDS)
    assert sizes(env.session) == [1]
    for job in range(2, 8):
        env.store.add(job, 1)
        env.dispatcher.notify(job, S.PENDING, 1)
        env.clock.advance(NOTIFY_SECONDS)
    assert sizes(env.session) == [1]  # nothing claimed while the first is in flight
    assert env.store.calls.count(("claim_work", 1)) == 1
    env.session.answer()
    assert sizes(env.session) == [6]
    env.session.answer()
    assert all(env.store.status(j) == S.SUBMITTED for j in env.store.jobs)
    assert env.store.calls.count(("claim_work", 1)) == 2


def test_a_full_claim_keeps_the_window_of_batches_in_flight(env):
    env.store.add(1, BATCH * 3)
    env.dispatcher.scan()
    env.session.answer()
    assert sizes(env.session) == [BATCH, BATCH]  # not held back behind the first


def test_clusters_coming_online_during_a_scan_cost_one_more_scan_not_one_each(env):
    scans = lambda: env.store.calls.count(("work", None))  # noqa: E731
    env.store.add(1, 2)
    env.store.hold = True
    for _ in range(5):
        env.dispatcher.scan_soon()
    assert scans() == 1
    env.store.fire()
    assert scans() == 2
    env.store.fire()
    assert scans() == 2
    env.store.hold = False
    env.dispatcher.scan_soon()
    assert scans() == 3
    assert sizes(env.session) == [2]
