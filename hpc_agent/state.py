"""The agent's durable state: its jobs and the outbox of unacknowledged updates.

SQLite in the agent directory.  Two rules make the agent safe to kill at any
moment:

* a job is recorded *before* the scheduler is called (``record_submitting``),
  so after a crash the agent knows to look for it instead of submitting again;
* every state change is written to the outbox in the same transaction as the
  job's new state, and leaves the outbox only when hpcd acknowledges it.

Everything runs on the agent's event loop thread: the statements are few and
small, and one connection used from one thread needs no locking.
"""

import json
import sqlite3
import time

from hpc_agent.status import TERMINAL, JobStatus, can_transition

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


class Job:
    """One row of the jobs table, as plain values."""

    __slots__ = ("job", "scheduler_id", "status", "detail", "parameters")

    def __init__(self, job, scheduler_id, status, detail, parameters):
        self.job = job
        self.scheduler_id = scheduler_id
        self.status = JobStatus(status)
        self.detail = detail
        self.parameters = json.loads(parameters)

    def __repr__(self):
        return f"<Job {self.job} {self.status.name} {self.scheduler_id}>"


class AgentState:
    """The agent's SQLite database."""

    def __init__(self, path, clock=time.time):
        self._clock = clock
        # isolation_level=None: we open transactions ourselves, explicitly.
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self):
        self._db.close()

    def _transaction(self):
        return _Transaction(self._db)

    # -- jobs ----------------------------------------------------------------

    def get(self, job):
        row = self._db.execute(
            "SELECT job, scheduler_id, status, detail, parameters FROM jobs WHERE job = ?",
            (job,)).fetchone()
        return Job(*row) if row else None

    def active_jobs(self):
        rows = self._db.execute(
            "SELECT job, scheduler_id, status, detail, parameters FROM jobs "
            f"WHERE status IN ({','.join('?' * len(_ACTIVE_STATES))}) ORDER BY job",
            _ACTIVE_STATES).fetchall()
        return [Job(*row) for row in rows]

    def record_submitting(self, job, parameters):
        """Record a job about to be handed to the scheduler.  No outbox entry:
        hpcd set SUBMITTING itself."""
        now = self._clock()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO jobs (job, scheduler_id, status, detail, parameters, created, "
                "updated) VALUES (?, NULL, ?, '', ?, ?, ?)",
                (job, int(JobStatus.SUBMITTING), json.dumps(parameters), now, now))

    def set_status(self, job, status, detail="", scheduler_id=None):
        """Change a job's state and queue the update for hpcd, atomically.

        Creates the job's record if it has none (a cancel or delete for a job
        this agent never saw).  Returns the outbox sequence number, or None if
        nothing changed or the transition table forbids the change (a stale
        poll result never moves a job backwards).
        """
        now = self._clock()
        status = JobStatus(status)
        with self._transaction() as db:
            row = db.execute("SELECT status, detail, scheduler_id FROM jobs WHERE job = ?",
                             (job,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO jobs (job, scheduler_id, status, detail, parameters, "
                    "created, updated) VALUES (?, ?, ?, ?, 'null', ?, ?)",
                    (job, scheduler_id, int(status), detail, now, now))
            else:
                old_status, old_detail, old_scheduler_id = row
                scheduler_id = scheduler_id or old_scheduler_id
                if old_status == status:
                    if (old_detail, old_scheduler_id) == (detail, scheduler_id):
                        return None
                elif not can_transition(old_status, status):
                    return None
                db.execute(
                    "UPDATE jobs SET status = ?, detail = ?, scheduler_id = ?, updated = ? "
                    "WHERE job = ?", (int(status), detail, scheduler_id, now, job))
            cursor = db.execute(
                "INSERT INTO outbox (job, status, detail, at, scheduler_id) "
                "VALUES (?, ?, ?, ?, ?)", (job, int(status), detail, now, scheduler_id))
            return cursor.lastrowid

    # -- outbox --------------------------------------------------------------

    def pending_updates(self, after=0, limit=1000):
        """Unacknowledged updates in order, as wire ``update`` fields."""
        rows = self._db.execute(
            "SELECT seq, job, status, detail, at, scheduler_id FROM outbox "
            "WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)).fetchall()
        return [dict(seq=seq, job=job, status=status, detail=detail, at=at,
                     scheduler_id=scheduler_id)
                for seq, job, status, detail, at, scheduler_id in rows]

    def acknowledge(self, seqs):
        with self._transaction() as db:
            db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])

    def prune(self, older_than_seconds=7 * 86400):
        """Forget deleted jobs after a week: hpcd never asks about them again.
        Returns how many were removed."""
        cutoff = self._clock() - older_than_seconds
        with self._transaction() as db:
            return db.execute(
                "DELETE FROM jobs WHERE status = ? AND updated < ? AND job NOT IN "
                "(SELECT job FROM outbox)", (int(JobStatus.DELETED), cutoff)).rowcount

    def counts(self):
        """``[(JobStatus, number of jobs)]`` in status order."""
        rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status ORDER BY status")
        return [(JobStatus(status), n) for status, n in rows]

    def outbox_size(self):
        return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    # -- meta ----------------------------------------------------------------

    def get_meta(self, key, default=None):
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key, value):
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def is_final(status):
    """The agent forgets nothing, but stops polling jobs in these states."""
    return JobStatus(status) in TERMINAL or JobStatus(status) == JobStatus.DELETED


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on error."""

    def __init__(self, db):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type, exc, tb):
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
