"""One Slurm poll cycle over thousands of active jobs, against the seed's way.

The agent asks about all its jobs with one ``Slurm.status_many`` (one squeue);
the seed ran one ``sacct -j ID`` per job.  This submits ``--jobs`` held jobs
(they never run), times one status_many (wall time, processes spawned) and
a sample of per-job sacct calls (extrapolated to all jobs, and said so), then
cancels the jobs.  Run it as the agent's user against a real Slurm, e.g.::

    runuser -u hpcuser -- env PYTHONPATH=. /usr/bin/python3 bench/slurm_poll.py
    python3 bench/slurm_poll.py --jobs 200      # a quick run
"""

import argparse
import concurrent.futures
import os
import subprocess
import tempfile
import time

import _env  # noqa: F401  (tests/ and the checkout on sys.path)
from hpc_agent.config import AgentSettings
from hpc_agent.schedulers.slurm import Slurm
from scheduler_fakes import counted


#: Slurm that runs its commands for real and records each one.
Counted = counted(Slurm)


#: Every job of one run has this name, so one filtered scancel ends them all
#: (scancel with a list of ids sends one RPC per job, throttled to ~10/s).
NAME = f"hpc-bench-{os.getpid()}"


def submit_held(count, parallel):
    """Submit ``count`` held one-line jobs, ``parallel`` sbatch at a time."""
    def one(_):
        return subprocess.run(
            ["sbatch", "--parsable", "--hold", f"--job-name={NAME}", "--output=/dev/null",
             "--wrap=true"], check=True, capture_output=True, text=True).stdout.strip()
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, range(count)))


def cancel():
    subprocess.run(["scancel", f"--user={os.getuid()}", f"--name={NAME}"], check=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000, help="held jobs to poll (5000)")
    parser.add_argument("--sample", type=int, default=200,
                        help="jobs asked one sacct each, the seed's way (200)")
    parser.add_argument("--parallel", type=int, default=16, help="sbatch at a time (16)")
    args = parser.parse_args()

    started = time.monotonic()
    try:
        job_ids = submit_held(args.jobs, args.parallel)
        print(f"submitted {len(job_ids)} held jobs in {time.monotonic() - started:.1f} s")
        with tempfile.TemporaryDirectory() as directory:
            settings = AgentSettings(directory)
            jobs = list(enumerate(job_ids))
            started = time.monotonic()
            states = Counted.status_many(settings, jobs)
            poll = time.monotonic() - started
        queued = sum(state.status.name == "QUEUED" for state in states.values())
        programs = ", ".join(s["argv"][0] for s in Counted.spawned)
        print(f"status_many: {poll:.3f} s wall, {len(Counted.spawned)} process(es) "
              f"({programs}), {len(states)} states ({queued} QUEUED)")

        sample = job_ids[:args.sample]
        started = time.monotonic()
        for job_id in sample:
            subprocess.run(["sacct", "-j", job_id], capture_output=True, check=False)
        per_job = (time.monotonic() - started) / len(sample)
        print(f"seed (one sacct -j per job): {per_job * 1000:.1f} ms per job measured on "
              f"{len(sample)} jobs; extrapolated to {len(job_ids)} jobs: "
              f"{per_job * len(job_ids):.1f} s and {len(job_ids)} processes")
        print(f"one poll cycle: {per_job * len(job_ids) / poll:.0f}x faster, "
              f"{len(job_ids) // max(1, len(Counted.spawned))}x fewer processes")
    finally:
        started = time.monotonic()
        cancel()
        print(f"cancelled the jobs in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
