"""One Django process submitting jobs, for bench/dispatch.py.

    python bench/_submitter.py JOBS submit|submit_many

Run with the environment of the benchmark's hpcd (its database and socket).
Sets Django up, prints ``ready``, waits for a line on stdin, then submits
JOBS new jobs (``submit``: HpcJob().submit() each; ``submit_many``: one
HpcJob.objects.submit_many() call) and prints ``done SECONDS``.
"""

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests"), REPO]

PARAMETERS = {"script": "true", "walltime_seconds": 60}


def main():
    jobs, via = int(sys.argv[1]), sys.argv[2]
    import django

    django.setup()
    from djangoapp.models import HpcJob

    HpcJob.objects.exists()  # connect before the start
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.monotonic()
    if via == "submit_many":
        HpcJob.objects.submit_many((HpcJob(), PARAMETERS) for _ in range(jobs))
    else:
        for _ in range(jobs):
            HpcJob().submit(PARAMETERS)
    print(f"done {time.monotonic() - started:.3f}", flush=True)


if __name__ == "__main__":
    main()
