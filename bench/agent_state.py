"""How many job state changes per second the agent stores and reports.

    .venv/bin/python bench/agent_state.py [--jobs 10000]

Drives a real AgentCore and AgentState (SQLite in a temporary directory, the
real reactor and worker threads) the way a burst does: hpcd sends ``--jobs``
submit requests at once; a scheduler that accepts at once and reports every
job COMPLETED at the next poll stands in for the cluster.  Each job is
written three times (recorded before submission, SUBMITTED, COMPLETED); a
stand-in for hpcd acknowledges every update it receives.  Prints::

    agent_state_updates: N updates/s      (3 writes per job / time to the last COMPLETED)
    agent_submitted: N jobs/s             (time to the last SUBMITTED update)
"""

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from twisted.internet import reactor  # noqa: E402
from twisted.python.threadpool import ThreadPool  # noqa: E402

from hpc_agent import wire  # noqa: E402
from hpc_agent.agent import AgentCore  # noqa: E402
from hpc_agent.config import AgentSettings  # noqa: E402
from hpc_agent.schedulers.base import JobState, Scheduler  # noqa: E402
from hpc_agent.status import JobStatus  # noqa: E402


class Instant(Scheduler):
    """Accepts every job at once; every job is COMPLETED at the next poll."""

    poll_fast_seconds = 0.05
    poll_slow_seconds = 0.05
    rate_limited = False

    def submit(self, parameters):
        return f"bench-{self.ui_id}"

    @classmethod
    def status_many(cls, settings, jobs):
        return {ui_id: JobState(JobStatus.COMPLETED) for ui_id, _ in jobs}

    @classmethod
    def find_submitted(cls, settings, ui_ids):
        return {}


def open_state(path, reactor):
    """The agent's state as hpc_agent.main opens it (before and after the
    writer thread, so the same script measures both)."""
    from hpc_agent import state

    if not hasattr(state, "ThreadWriter"):  # before: commits on the reactor thread
        return state.AgentState(path), lambda: None
    writer = state.ThreadWriter(reactor)
    writer.start()
    return state.AgentState(path, writer=writer), writer.stop


class Hpcd:
    """Acknowledges updates the way hpcd does: what arrived in one turn, at once."""

    def __init__(self, core, jobs):
        self.core = core
        self.jobs = jobs
        self.submitted = set()
        self.completed = set()
        self.unacked = []
        self.started = None
        self.submitted_at = None
        self.completed_at = None
        self._ack_call = None

    def send(self, frame):
        message = json.loads(frame)
        if message["type"] != "update":
            return
        self.unacked.append(message["seq"])
        if message["status"] == JobStatus.SUBMITTED:
            self.submitted.add(message["job"])
            if len(self.submitted) == self.jobs and self.submitted_at is None:
                self.submitted_at = time.monotonic()
        elif message["status"] == JobStatus.COMPLETED:
            self.completed.add(message["job"])
            if len(self.completed) == self.jobs:
                self.completed_at = time.monotonic()
                reactor.stop()
        if self._ack_call is None:
            self._ack_call = reactor.callLater(0, self._ack)

    def _ack(self):
        self._ack_call = None
        seqs, self.unacked = self.unacked, []
        self.core.frame_received(wire.encode("ack", seqs=seqs))

    def burst(self):
        self.core.connected(self.send)
        self.core.frame_received(wire.encode(
            "welcome", protocol=wire.PROTOCOL_VERSION, cluster="1", resume_token="r"))
        self.started = time.monotonic()
        for job in range(1, self.jobs + 1):
            self.core.frame_received(wire.encode(
                "submit", id=job, job=job, parameters={"script": "true"}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hpc-bench-state-") as tmp:
        settings = AgentSettings(tmp, {"HPC_SCHEDULER_CLASS": f"{__name__}.Instant",
                                       "HPC_JOB_WORKING_DIRECTORY": "jobs"})
        state, close_state = open_state(os.path.join(tmp, "state.sqlite3"), reactor)
        pool = ThreadPool(minthreads=1, maxthreads=4, name="bench-scheduler")
        core = AgentCore(settings, state, reactor, pool, start_transfer=None)
        hpcd = Hpcd(core, args.jobs)

        def start():
            pool.start()
            core.poller.start()
            hpcd.burst()

        reactor.callWhenRunning(start)
        reactor.callLater(args.timeout, reactor.stop)
        reactor.run()
        core.poller.stop()
        pool.stop()
        close_state()
        state.close()
    if hpcd.completed_at is None:
        print(f"timed out after {args.timeout:.0f} s: {len(hpcd.submitted)} SUBMITTED, "
              f"{len(hpcd.completed)} COMPLETED of {args.jobs}", file=sys.stderr)
        return 1
    elapsed = hpcd.completed_at - hpcd.started
    print(f"agent_state_updates: {3 * args.jobs / elapsed:.0f} updates/s")
    print(f"agent_submitted: {args.jobs / (hpcd.submitted_at - hpcd.started):.0f} jobs/s")
    print(f"({args.jobs} jobs, {elapsed:.2f} s to the last COMPLETED)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
