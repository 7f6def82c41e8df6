"""Under load nothing freezes: the seed's server deadlocked after 5-28 of 200
back-to-back submits (a lock held across a round trip)."""

import time

from djangoapp.models import HpcJob, JobStatus
from harness import FINAL, wait_for


def test_two_hundred_back_to_back_submits_all_complete(local_cluster):
    jobs = [HpcJob.objects.create() for _ in range(200)]
    started = time.monotonic()
    for job in jobs:
        job.submit({"script": "true"})
    submitted = time.monotonic() - started
    assert submitted < 60, f"200 submits took {submitted:.0f} s"

    def all_final():
        done = HpcJob.objects.filter(pk__in=[j.pk for j in jobs],
                                     job_status__in=[int(s) for s in FINAL]).count()
        return done == len(jobs)

    wait_for(all_final, timeout=180, interval=0.5, what="200 jobs to finish")
    statuses = set(HpcJob.objects.filter(pk__in=[j.pk for j in jobs])
                   .values_list("job_status", flat=True))
    assert statuses == {JobStatus.COMPLETED}
    assert local_cluster.is_connected()
