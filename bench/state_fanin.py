"""How many job state changes reported by agents hpcd stores per second.

    .venv/bin/python bench/state_fanin.py [--changes 50000] [--batch 500]
    HPC_TEST_DB=postgres HPC_TEST_DB_NAME=test_hpc_bench .venv/bin/python bench/state_fanin.py

Calls hpcd's store function (apply_updates_thd) directly, with batches like
those an agent's updates gather into while the previous batch is written:
jobs in SUBMITTING each report SUBMITTED (with the scheduler's id), RUNNING
and COMPLETED, in the order a busy cluster reports them (``--order waves``:
every job's SUBMITTED, then every RUNNING, ...; ``--order jobs``: each job's
three updates together, as after a reconnect).  Checks afterwards that every
job is COMPLETED with one history row per change, then prints the rate.
"""

import argparse
import time

from _db import database


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=50000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--order", choices=["waves", "jobs"], default="waves")
    args = parser.parse_args()
    with database() as vendor:
        from djangoapp.models import HpcCluster, HpcJob, HpcJobStatusChange, JobStatus
        from hpcd import store

        cluster = HpcCluster.objects.create(host_name="localhost", client_path="/bench")
        count = max(1, args.changes // 3)
        HpcJob.objects.bulk_create(
            [HpcJob(cluster=cluster, job_status=JobStatus.SUBMITTING) for _ in range(count)],
            batch_size=1000)
        ids = list(HpcJob.objects.order_by("pk").values_list("pk", flat=True))
        steps = [(JobStatus.SUBMITTED, True), (JobStatus.RUNNING, False),
                 (JobStatus.COMPLETED, False)]
        if args.order == "waves":
            order = [(job, step) for step in steps for job in ids]
        else:
            order = [(job, step) for job in ids for step in steps]
        updates = [{"seq": seq, "job": job, "status": int(status), "detail": "",
                    "at": 0.0, "scheduler_id": str(900000 + job) if with_id else None}
                   for seq, (job, (status, with_id)) in enumerate(order, 1)]
        batches = [updates[i:i + args.batch] for i in range(0, len(updates), args.batch)]

        started = time.perf_counter()
        acked = 0
        for batch in batches:
            acked += len(store.apply_updates_thd(cluster.pk, batch))
        elapsed = time.perf_counter() - started

        assert acked == len(updates)
        done = HpcJob.objects.filter(job_status=JobStatus.COMPLETED).count()
        history = HpcJobStatusChange.objects.count()
        assert done == count, f"{done} of {count} jobs COMPLETED"
        assert history == len(updates), f"{history} history rows for {len(updates)} changes"
        print(f"{vendor}, {len(updates)} changes of {count} jobs in batches of {args.batch} "
              f"({args.order}): {elapsed:.2f} s")
        print(f"state_changes: {len(updates) / elapsed:.0f} changes/s")


if __name__ == "__main__":
    main()
