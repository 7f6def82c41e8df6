"""How fast Django's lookups through hpcd are: is_connected() and file lists.

    .venv/bin/python bench/lookups.py [--calls 2000] [--entries 10000 100000]

A real hpcd and a local agent.  ``is_connected()`` is called ``--calls``
times (after a warm-up), and the database queries it makes in the Django
process are counted; then a job directory of N files (100 per subdirectory,
as bench/agent_files.py makes them) is listed end to end with
``fetch_remote_file_list("/", True)`` (Django -> hpcd -> agent, in pages),
best of three.  Prints ``name: value unit`` lines.
"""

import argparse
import os
import statistics
import sys
import time

from _env import local_cluster

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from agent_files import make_tree  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--entries", type=int, nargs="*", default=[10_000, 100_000])
    args = parser.parse_args()
    with local_cluster() as (cluster, daemon, agent):
        from django.db import connection
        from django.test.utils import CaptureQueriesContext

        from djangoapp.models import HpcJob
        from harness import FINAL, agent_pid, wait_status

        # For a profiler (py-spy record --pid).
        print(f"pids: hpcd {daemon.process.pid} agent {agent_pid(agent)} django {os.getpid()}",
              file=sys.stderr, flush=True)

        for _ in range(50):
            assert cluster.is_connected()
        times = []
        with CaptureQueriesContext(connection) as queries:
            for _ in range(args.calls):
                started = time.perf_counter()
                cluster.is_connected()
                times.append(time.perf_counter() - started)
        times.sort()
        print(f"is_connected_median: {statistics.median(times) * 1000:.3f} ms")
        print(f"is_connected_p99: {times[int(len(times) * 0.99)] * 1000:.3f} ms")
        print(f"is_connected_queries: {len(queries) / args.calls:.2f} per call")

        for entries in args.entries:
            job = HpcJob.objects.create()
            job.submit({"script": "true"})
            wait_status(job, FINAL, timeout=60)
            make_tree(os.path.join(agent, "jobs", str(job.pk)), entries)
            best = None
            print(f"fetching a list of {entries}", file=sys.stderr, flush=True)
            for _ in range(3):
                started = time.perf_counter()
                listing = job.fetch_remote_file_list("/", True)
                elapsed = time.perf_counter() - started
                best = elapsed if best is None else min(best, elapsed)
            assert len(listing) >= entries, len(listing)
            print(f"file_list_{entries}: {best:.3f} s")


if __name__ == "__main__":
    main()
