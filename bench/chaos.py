"""The long chaos run of issue 9: many jobs, many faults, the counts and
recovery times.

    .venv/bin/python bench/chaos.py [--jobs 1200] [--faults 15] [--seed N]

A PostgreSQL of the run's own, a real hpcd and a real agent (tests/chaos_kit.py);
faults of every kind at random moments from the seed (printed: pass it back
with --seed to replay a run), each stop, cut or database outage held 20-90 s.
Prints ``name: value unit`` lines: the jobs and the problems found (each 0 in a good
run) and, per kind of fault, the seconds from its end until a job submitted
since it began completed (or, with none, until the cluster was online
again).  Exits 1 when a problem was found, keeping the run's directory.

Takes about as long as the faults last: some 15 to 25 minutes with the
defaults.  As root with iproute2 it includes network cuts (namespaces).
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests"), REPO]

import chaos_kit  # noqa: E402

if __name__ == "__main__":
    sys.exit(chaos_kit.main(jobs=1200, faults=15, hold=(20.0, 90.0), rate=5.0, drain=300.0))
