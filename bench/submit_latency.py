"""How soon a job's states reach the database, and how many jobs per second.

    .venv/bin/python bench/submit_latency.py [--jobs 200]

First single trivial jobs one at a time (submit to COMPLETED in the
database: the seed polled every 60 s and took about 57 s), then a burst of
back-to-back submits (the seed's server froze after 5-28 of 200).
"""

import argparse
import statistics
import time

from _env import local_cluster


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--single", type=int, default=20)
    args = parser.parse_args()
    with local_cluster() as (cluster, daemon, agent):
        from djangoapp.models import HpcJob, JobStatus
        from harness import FINAL, wait_for, wait_status

        latencies = []
        for _ in range(args.single):
            job = HpcJob.objects.create()
            started = time.monotonic()
            job.submit({"script": "true"})
            wait_status(job, FINAL, timeout=60)
            latencies.append(time.monotonic() - started)
            assert job.status == JobStatus.COMPLETED
        latencies.sort()
        print(f"single job, submit -> COMPLETED in the database ({args.single} runs): "
              f"median {statistics.median(latencies) * 1000:.0f} ms, "
              f"max {latencies[-1] * 1000:.0f} ms")

        jobs = [HpcJob.objects.create() for _ in range(args.jobs)]
        started = time.monotonic()
        for job in jobs:
            job.submit({"script": "true"})
        submitted = time.monotonic() - started
        ids = [j.pk for j in jobs]
        finals = [int(s) for s in FINAL]
        wait_for(lambda: HpcJob.objects.filter(pk__in=ids, job_status__in=finals).count()
                 == len(ids), timeout=600, interval=0.2)
        elapsed = time.monotonic() - started
        completed = HpcJob.objects.filter(pk__in=ids, job_status=JobStatus.COMPLETED).count()
        print(f"{args.jobs} back-to-back submits: {submitted:.1f} s to submit "
              f"({args.jobs / submitted:.0f}/s), all final after {elapsed:.1f} s "
              f"({args.jobs / elapsed:.0f} jobs/s end to end); {completed} COMPLETED")


if __name__ == "__main__":
    main()
