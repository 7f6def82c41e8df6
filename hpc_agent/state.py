"""The agent's durable state: its jobs and the outbox of unacknowledged updates.

SQLite in the agent directory, with ``synchronous=FULL``: a commit is on
disk when it returns.  The journal is WAL (readers never wait for the
writer) on a local file system; on a network one, where SQLite's WAL must
not be used, a rollback journal (reads may then wait for a commit).

These rules make the agent safe to kill at any moment:

1. A job is recorded durably *before* the scheduler sees it:
   :meth:`AgentState.record_submitting` returns a Deferred that fires only
   once the record is committed and synced, and the agent calls the
   scheduler after that.  After a crash the agent knows to look for the job
   instead of submitting it again.
2. Every state change is written together with its outbox entry, in one
   transaction, and the entry leaves the outbox only when hpcd acknowledges
   it.
3. An update is sent to hpcd only once it is durable:
   :meth:`AgentState.pending_updates` returns committed entries only, and
   replies to hpcd's requests wait for :meth:`AgentState.when_durable`.  If
   hpcd could store and acknowledge a change the agent then lost in a crash,
   the restarted agent would act on an older state than hpcd's: a job hpcd
   holds as "cancelled before submission" would have no tombstone here and a
   late submit would run it, and the lost update's sequence number would be
   given to a different update.
4. An acknowledgement is queued like any write; if a crash loses it, the
   update is sent again and hpcd's compare-and-set makes the repeat harmless.

The reactor thread never commits.  A change is applied at once to an
in-memory overlay (so every read sees it) and queued; one writer commits all
that is queued in one transaction, and while it commits the next changes
gather, so batches grow with the load (group commit, one fsync per batch).
In the agent the writer is a thread of its own (:class:`ThreadWriter`).
When a batch is durable, the reactor thread drops it from the overlay,
fires whatever waited for it and calls ``on_durable`` (the agent then sends
the new updates).  Reads on the reactor thread use a second connection,
which WAL lets run while the writer commits.  A failed commit (a full disk)
is logged and retried with backoff; nothing queued is dropped.

Without a writer (the ``status`` command, tests) every change is committed
before the call returns.
"""

import collections
import json
import sqlite3
import time

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from hpc_agent.mounts import journal_mode
from hpc_agent.status import TERMINAL, JobStatus, can_transition

log = Logger()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job INTEGER PRIMARY KEY,          -- the job's id in the Django database
    scheduler_id TEXT,                -- the scheduler's id, NULL until accepted
    status INTEGER NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    parameters TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job INTEGER NOT NULL,
    status INTEGER NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL,
    scheduler_id TEXT
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

_ACTIVE_STATES = (int(JobStatus.SUBMITTING), int(JobStatus.SUBMITTED), int(JobStatus.QUEUED),
                  int(JobStatus.RUNNING), int(JobStatus.CANCELLING))
_JOB_COLUMNS = "job, scheduler_id, status, detail, parameters, created, updated"
_UPDATE_COLUMNS = "seq, job, status, detail, at, scheduler_id"

#: Job rows kept in memory after they were read or written.
RECENT_ROWS = 10_000
#: Seconds before a failed commit is tried again, doubling up to the cap.
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0

_Row = collections.namedtuple("_Row", _JOB_COLUMNS.replace(",", ""))


_ABSENT = object()  # in the cache: no such job


class JobExists(Exception):
    """``record_submitting`` for a job the agent already has."""


class Job:
    """One job's record, as plain values."""

    __slots__ = ("job", "scheduler_id", "status", "detail", "_parameters")

    def __init__(self, job, scheduler_id, status, detail, parameters):
        self.job = job
        self.scheduler_id = scheduler_id
        self.status = JobStatus(status)
        self.detail = detail
        self._parameters = parameters

    @property
    def parameters(self):
        # Decoded on use: a poll lists every active job and needs none of them.
        return json.loads(self._parameters)

    def __repr__(self):
        return f"<Job {self.job} {self.status.name} {self.scheduler_id}>"


def _connect(path, **kwargs):
    # isolation_level=None: transactions are opened explicitly.
    db = sqlite3.connect(path, isolation_level=None, timeout=30, **kwargs)
    db.execute("PRAGMA synchronous=FULL")
    return db


class AgentState:
    """The agent's SQLite database, behind a write-behind overlay."""

    def __init__(self, path, clock=time.time, writer=None, journal=None):
        self._clock = clock
        self._db = _connect(path)
        self.journal = journal or journal_mode(path)
        self._db.execute(f"PRAGMA journal_mode={self.journal}")
        self._db.executescript(_SCHEMA)
        self._writer = writer
        self._wdb = self._db if writer is None else _connect(path, check_same_thread=False)
        #: Called (no arguments) on the reactor thread after a batch with new
        #: outbox entries became durable.
        self.on_durable = None
        self._queue = []  # [(gen, [op, ...])] not yet handed to the writer
        self._batch = []  # the same, being committed
        self._gen = 0  # numbers every queued change, in order
        self._durable_gen = 0
        self._in_flight = False
        self._scheduled = False
        self._retry_delay = None  # set while a failed batch waits to be retried
        self._waiters = []  # [(gen, Deferred)]
        self._pending = {}  # job -> (gen, _Row): changes not yet durable
        # Rows read or written lately, as stored (every write goes through
        # this object, so they stay true): most reads are of the jobs just
        # changed.
        self._recent = collections.OrderedDict()
        self._acked = {}  # seq -> gen: acknowledged, not yet deleted
        self._meta = {}  # key -> (gen, value): not yet durable
        self._unwritten_updates = 0  # outbox entries queued, not yet durable
        high = [r[0] for r in self._read(
            "SELECT seq FROM sqlite_sequence WHERE name = 'outbox' "
            "UNION ALL SELECT MAX(seq) FROM outbox") if r[0] is not None]
        self._durable_seq = max(high, default=0)
        self._next_seq = self._durable_seq + 1

    def close(self):
        if self._wdb is not self._db:
            self._wdb.close()
        self._db.close()

    def _read(self, sql, args=()):
        # fetchall: a half-read statement would hold a WAL snapshot open.
        return self._db.execute(sql, args).fetchall()

    # -- jobs ----------------------------------------------------------------

    def _row(self, job):
        pending = self._pending.get(job)
        if pending is not None:
            return pending[1]
        row = self._recent.get(job)
        if row is None:
            rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job = ?", (job,))
            # Knowing a job is absent saves the second look a submit makes.
            row = _Row(*rows[0]) if rows else _ABSENT
            self._remember(row, job)
        return None if row is _ABSENT else row

    def _remember(self, row, job=None):
        job = row.job if job is None else job
        self._recent[job] = row
        self._recent.move_to_end(job)
        if len(self._recent) > RECENT_ROWS:
            self._recent.popitem(last=False)

    def get(self, job):
        row = self._row(job)
        return Job(*row[:5]) if row else None

    def active_jobs(self):
        rows = {row[0]: row for row in self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs "
            f"WHERE status IN ({','.join('?' * len(_ACTIVE_STATES))})", _ACTIVE_STATES)}
        for job, (_, row) in self._pending.items():
            if row.status in _ACTIVE_STATES:
                rows[job] = row
            else:
                rows.pop(job, None)
        return [Job(*rows[job][:5]) for job in sorted(rows)]

    def record_submitting(self, job, parameters):
        """Record a job about to be handed to the scheduler (no outbox entry:
        hpcd set SUBMITTING itself).  Returns a Deferred that fires once the
        record is durable; call the scheduler only then."""
        if self._row(job) is not None:
            raise JobExists(f"job {job} is recorded already")
        now = self._clock()
        row = _Row(job, None, int(JobStatus.SUBMITTING), "", json.dumps(parameters), now, now)
        return self._durable_after(self._write([("job", row)]))

    def set_status(self, job, status, detail="", scheduler_id=None):
        """Change a job's state and queue the update for hpcd, atomically.

        Creates the job's record if it has none (a cancel or delete for a job
        this agent never saw).  Returns the outbox sequence number, or None if
        nothing changed or the transition table forbids the change (a stale
        poll result never moves a job backwards).  The change is visible to
        every read at once, and durable after the next commit.
        """
        now = self._clock()
        status = JobStatus(status)
        row = self._row(job)
        if row is None:
            row = _Row(job, scheduler_id, int(status), detail, "null", now, now)
        else:
            scheduler_id = scheduler_id or row.scheduler_id
            if row.status == status:
                if (row.detail, row.scheduler_id) == (detail, scheduler_id):
                    return None
            elif not can_transition(row.status, status):
                return None
            row = row._replace(status=int(status), detail=detail, scheduler_id=scheduler_id,
                               updated=now)
        seq = self._next_seq
        self._next_seq += 1
        self._write([("job", row), ("outbox", (seq, job, int(status), detail, now, scheduler_id))])
        return seq

    def report(self, job, status, detail=""):
        """Queue an update for hpcd about ``job`` without touching the job's
        record here: for a job id the agent holds for another job (a
        submit with other parameters), whose own record must stay as it is.
        Returns the outbox sequence number."""
        seq = self._next_seq
        self._next_seq += 1
        self._write([("outbox", (seq, job, int(JobStatus(status)), detail, self._clock(),
                                 None))])
        return seq

    # -- outbox --------------------------------------------------------------

    def pending_updates(self, after=0, limit=1000):
        """Durable, unacknowledged updates in order, as wire ``update`` fields."""
        rows = self._read(
            f"SELECT {_UPDATE_COLUMNS} FROM outbox WHERE seq > ? AND seq <= ? "
            "ORDER BY seq LIMIT ?", (after, self._durable_seq, limit + len(self._acked)))
        return [_update(row) for row in rows if row[0] not in self._acked][:limit]

    def updates(self, seqs):
        """The durable, unacknowledged updates among ``seqs``, in order."""
        wanted = sorted(s for s in set(seqs)
                        if s <= self._durable_seq and s not in self._acked)
        found = []
        for i in range(0, len(wanted), 500):
            chunk = wanted[i:i + 500]
            found += self._read(f"SELECT {_UPDATE_COLUMNS} FROM outbox WHERE seq IN "
                                f"({','.join('?' * len(chunk))}) ORDER BY seq", chunk)
        return [_update(row) for row in found]

    def acknowledge(self, seqs):
        seqs = [s for s in seqs if s not in self._acked]
        if seqs:
            self._write([("ack", seqs)])

    def prune(self, older_than_seconds=7 * 86400):
        """Forget deleted jobs after a week: hpcd never asks about them again.
        Returns a Deferred firing with how many were removed."""
        d = defer.Deferred()
        self._write([("prune", (int(JobStatus.DELETED), self._clock() - older_than_seconds),
                      d)])
        return d

    def counts(self):
        """``[(JobStatus, number of jobs)]`` in status order."""
        counts = collections.Counter(dict(self._read(
            "SELECT status, COUNT(*) FROM jobs GROUP BY status")))
        for job, (_, row) in self._pending.items():
            stored = self._read("SELECT status FROM jobs WHERE job = ?", (job,))
            if stored:
                counts[stored[0][0]] -= 1
            counts[row.status] += 1
        return [(JobStatus(status), n) for status, n in sorted(counts.items()) if n]

    def outbox_size(self):
        """Updates hpcd has not acknowledged, durable or not."""
        stored = {seq for seq, in self._read("SELECT seq FROM outbox")}
        return len(stored - set(self._acked)) + self._unwritten_updates

    # -- meta ----------------------------------------------------------------

    #: The meta key of the installation (hpcd's ``welcome``) this state serves.
    INSTALLATION = "installation"

    def bind_installation(self, installation):
        """Bind this state to ``installation`` if it is bound to none yet;
        returns the installation it is bound to (``installation`` unless
        another one came first)."""
        bound = self.get_meta(self.INSTALLATION)
        if bound is None:
            self.set_meta(self.INSTALLATION, installation)
            return installation
        return bound

    def get_meta(self, key, default=None):
        if key in self._meta:
            return self._meta[key][1]
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else default

    def set_meta(self, key, value):
        self._write([("meta", (key, value))])

    # -- writing -------------------------------------------------------------

    def when_durable(self):
        """A Deferred that fires once every change made so far is durable."""
        return self._durable_after(self._gen)

    def _durable_after(self, gen):
        if gen <= self._durable_gen:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append((gen, d))
        return d

    def _write(self, ops):
        """Queue ``ops`` (committed together) and show them to reads at once."""
        self._gen += 1
        gen = self._gen
        for op in ops:
            kind, args = op[0], op[1]
            if kind == "job":
                self._pending[args.job] = (gen, args)
            elif kind == "outbox":
                self._unwritten_updates += 1
            elif kind == "ack":
                self._acked.update(dict.fromkeys(args, gen))
            elif kind == "meta":
                self._meta[args[0]] = (gen, args[1])
        self._queue.append((gen, ops))
        self._kick()
        return gen

    def _kick(self):
        if self._writer is None:
            self._commit_now()
        elif not (self._in_flight or self._scheduled or self._retry_delay is not None):
            self._scheduled = True
            # Later in this reactor turn: everything this turn changes goes
            # into one batch.
            self._writer.later(0, self._start_batch)

    def _commit_now(self):
        if not self._queue:
            return
        self._batch, self._queue = self._queue, []
        try:
            results = _write_batch_thd(self._wdb, [op for _, unit in self._batch for op in unit])
        except BaseException:
            self._queue, self._batch = self._batch + self._queue, []
            raise
        self._batch_done(results)

    def _start_batch(self):
        self._scheduled = False
        if self._in_flight or not self._queue:
            return
        self._batch, self._queue = self._queue, []
        self._in_flight = True
        d = self._writer.run(_write_batch_thd, self._wdb,
                             [op for _, unit in self._batch for op in unit])
        d.addCallbacks(self._batch_done, self._batch_failed)
        d.addErrback(lambda f: log.failure("the agent's state writer failed", f))

    def _batch_done(self, results):
        batch, self._batch = self._batch, []
        self._in_flight = False
        self._retry_delay = None
        upto = batch[-1][0]
        self._durable_gen = upto
        new_updates = 0
        ops = [op for _, unit in batch for op in unit]
        for op, result in zip(ops, results):
            if op[0] == "outbox":
                new_updates += 1
                self._durable_seq = max(self._durable_seq, op[1][0])
            elif op[0] == "prune":
                self._recent.clear()  # some rows are gone
                op[2].callback(result)
        self._unwritten_updates -= new_updates
        still = {}
        for job, entry in self._pending.items():
            if entry[0] > upto:
                still[job] = entry
            else:
                self._remember(entry[1])
        self._pending = still
        self._acked = {seq: gen for seq, gen in self._acked.items() if gen > upto}
        self._meta = {key: entry for key, entry in self._meta.items() if entry[0] > upto}
        ready = [d for gen, d in self._waiters if gen <= upto]
        self._waiters = [(gen, d) for gen, d in self._waiters if gen > upto]
        for d in ready:
            d.callback(None)
        if new_updates and self.on_durable is not None:
            self.on_durable()
        self._kick()

    def _batch_failed(self, failure):
        batch, self._batch = self._batch, []
        self._in_flight = False
        self._queue = batch + self._queue
        delay = self._retry_delay = min(RETRY_MAX_SECONDS,
                                        2 * (self._retry_delay or RETRY_FIRST_SECONDS / 2))
        log.failure("writing {n} changes to the agent's state failed; retrying in {s:g} s "
                    "(nothing is sent to hpcd until they are stored)", failure,
                    n=sum(len(unit) for _, unit in batch), s=delay)
        self._writer.later(delay, self._retry)

    def _retry(self):
        self._scheduled = True
        self._start_batch()


def _update(row):
    seq, job, status, detail, at, scheduler_id = row
    return dict(seq=seq, job=job, status=status, detail=detail, at=at,
                scheduler_id=scheduler_id)


def _write_batch_thd(db, ops):
    """Commit ``ops`` in one transaction (on the writer's thread); returns
    one result per op.  Every op is an upsert or a delete, so a batch that
    failed can be committed again as it is."""
    results = []
    db.execute("BEGIN IMMEDIATE")
    try:
        for op in ops:
            kind, args = op[0], op[1]
            if kind == "job":
                db.execute(f"INSERT OR REPLACE INTO jobs ({_JOB_COLUMNS}) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", args)
                results.append(None)
            elif kind == "outbox":
                db.execute(f"INSERT OR REPLACE INTO outbox ({_UPDATE_COLUMNS}) "
                           "VALUES (?, ?, ?, ?, ?, ?)", args)
                results.append(None)
            elif kind == "ack":
                db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in args])
                results.append(None)
            elif kind == "meta":
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", args)
                results.append(None)
            elif kind == "prune":
                results.append(db.execute(
                    "DELETE FROM jobs WHERE status = ? AND updated < ? AND job NOT IN "
                    "(SELECT job FROM outbox)", args).rowcount)
            else:
                raise ValueError(f"unknown state write {kind!r}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return results


class ThreadWriter:
    """Commits the state's batches on a thread of its own, off the reactor."""

    def __init__(self, reactor):
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="hpc-agent-state")

    def start(self):
        self._pool.start()

    def stop(self):
        self._pool.stop()

    def run(self, f, *args):
        return threads.deferToThreadPool(self._reactor, self._pool, f, *args)

    def later(self, delay, f):
        return self._reactor.callLater(delay, f)


def is_final(status):
    """The agent forgets nothing, but stops polling jobs in these states."""
    return JobStatus(status) in TERMINAL or JobStatus(status) == JobStatus.DELETED
