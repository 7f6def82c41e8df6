"""How long the agent takes to list a job directory, as hpcd asks for it.

    .venv/bin/python bench/agent_files.py [--entries 10000 100000]

Makes a directory of ``N`` files (100 per subdirectory) for each size, and
times ``hpc_agent.files.list_files`` (a recursive listing, as
``fetch_remote_file_list("/", True)`` asks) and the first page of the reply.
Prints ``agent_file_list_<N>: seconds s`` per size (best of three).
"""

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from hpc_agent import files, wire  # noqa: E402


def make_tree(root, entries):
    for i in range(entries):
        directory = os.path.join(root, f"d{i // 100:05}")
        if i % 100 == 0:
            os.mkdir(directory)
        with open(os.path.join(directory, f"output-{i:07}.dat"), "wb") as f:
            f.write(b"x" * (i % 7))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    for entries in args.entries:
        with tempfile.TemporaryDirectory(prefix="hpc-bench-files-") as tmp:
            job = os.path.join(tmp, "jobs", "1")
            os.makedirs(job)
            make_tree(job, entries)
            best = None
            for _ in range(3):
                started = time.perf_counter()
                listing = files.list_files([job], "/", True, job_relative=True)
                files.page(listing, 0, None, wire.MAX_CONTROL_MESSAGE - 64 * 1024)
                elapsed = time.perf_counter() - started
                best = elapsed if best is None else min(best, elapsed)
            assert len(listing) == entries + (entries + 99) // 100
            print(f"agent_file_list_{entries}: {best:.3f} s")


if __name__ == "__main__":
    main()
