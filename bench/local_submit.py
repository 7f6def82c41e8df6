"""How many jobs per second the Local scheduler starts.

    .venv/bin/python bench/local_submit.py [--jobs 200]

Calls the agent's submission entry point of hpc_agent.schedulers.local.Local
directly (no hpcd, no agent, no database) for ``--jobs`` jobs whose script is
``true``, one after another, as the agent's worker thread does, and prints the
rate at which submit returned a durable id.  Then it waits until every job
has finished, so the machine is quiet again, and reports how long that took.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hpc_agent.config import AgentSettings  # noqa: E402
from hpc_agent.schedulers.local import Local  # noqa: E402
from hpc_agent.status import TERMINAL  # noqa: E402


def submit(job, parameters):
    # The agent calls _submit since the seed's entry point was adopted;
    # older trees only have submit.
    return (job._submit if hasattr(job, "_submit") else job.submit)(parameters)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hpc-bench-local-") as tmp:
        settings = AgentSettings(tmp, {"HPC_JOB_WORKING_DIRECTORY": os.path.join(tmp, "jobs")})
        jobs = []
        started = time.perf_counter()
        for ui_id in range(1, args.jobs + 1):
            job = Local(settings, ui_id)
            job.job_id = submit(job, {"script": "true"})
            jobs.append(job)
        elapsed = time.perf_counter() - started
        print(f"local_submit: {args.jobs / elapsed:.0f} jobs/s")
        print(f"local_submit_each: {elapsed / args.jobs * 1000:.2f} ms")
        deadline = time.monotonic() + 60 + args.jobs / 10
        pending = list(jobs)
        while pending and time.monotonic() < deadline:
            pending = [j for j in pending if j.status().status not in TERMINAL]
            time.sleep(0.05)
        print(f"local_all_finished: {time.perf_counter() - started:.2f} s"
              + (f" ({len(pending)} still running)" if pending else ""))


if __name__ == "__main__":
    main()
