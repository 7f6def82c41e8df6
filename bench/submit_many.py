"""How many jobs per second reach the database as PENDING, one by one and in bulk.

    .venv/bin/python bench/submit_many.py [--jobs 10000] [--single 500]
    HPC_TEST_DB=postgres HPC_TEST_DB_NAME=test_hpc_bench .venv/bin/python bench/submit_many.py

No hpcd runs: the notification after each commit fails at once, which
submit() shrugs off (hpcd's scan would pick the jobs up).  ``submit`` is
HpcJob.submit() in a loop on saved drafts; ``submit_many`` is
HpcJob.objects.submit_many() on new jobs in one call, for HpcJob and for a
multi-table subclass (tests/testjobs' LabeledJob), which is what portals use.
The subclass's jobs are given their cluster beforehand: its choose_cluster
makes a query per job, a cost of that class and not of submit_many.
"""

import argparse
import time

from _db import database


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--single", type=int, default=500)
    args = parser.parse_args()
    with database() as vendor:
        from django.test import override_settings

        from djangoapp.models import HpcCluster, HpcJob, HpcJobStatusChange, JobStatus
        from testjobs.models import LabeledJob

        cluster = HpcCluster.objects.create(host_name="localhost", client_path="/bench",
                                            online=True)
        parameters = {"script": "true", "walltime_seconds": 60}

        drafts = [HpcJob.objects.create() for _ in range(args.single)]
        started = time.perf_counter()
        for job in drafts:
            job.submit(parameters)
        single = args.single / (time.perf_counter() - started)

        rates = {}
        for model in (HpcJob, LabeledJob):
            with override_settings(HPC_JOB_CLASS=f"{model._meta.label}"):
                jobs = [model(cluster=cluster if model is LabeledJob else None)
                        for _ in range(args.jobs)]
                started = time.perf_counter()
                model.objects.submit_many((job, parameters) for job in jobs)
                rates[model] = args.jobs / (time.perf_counter() - started)
        pending = HpcJob.objects.filter(job_status=JobStatus.PENDING).count()
        expected = args.single + 2 * args.jobs
        assert pending == expected, f"{pending} of {expected} jobs PENDING"
        assert HpcJobStatusChange.objects.count() == expected

        print(f"{vendor}: {args.single} submit() calls, then submit_many() of {args.jobs} "
              "new jobs of HpcJob and of a subclass")
        print(f"submit: {single:.0f} jobs/s")
        print(f"submit_many: {rates[HpcJob]:.0f} jobs/s")
        print(f"submit_many_subclass: {rates[LabeledJob]:.0f} jobs/s")


if __name__ == "__main__":
    main()
