"""Streaming a large job file to Django: throughput and memory of each process.

    .venv/bin/python bench/transfer.py [--size-mib 2048]

The file is created in a job's directory, fetched with
HpcJob.fetch_remote_file() and read to the end like a view's response would
be.  Prints MB/s and the peak resident memory of hpcd and the agent, which
must stay flat whatever the size (flow control end to end).
"""

import argparse
import os
import time

from _env import local_cluster, peak_rss_mib, rss_mib


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    args = parser.parse_args()
    with local_cluster() as (cluster, daemon, agent):
        from djangoapp.models import HpcJob
        from harness import FINAL, agent_pid, wait_status

        job = HpcJob.objects.create()
        job.submit({"script": f"head -c {args.size_mib}M /dev/urandom > big.bin"})
        wait_status(job, FINAL, timeout=600)
        size = os.path.getsize(os.path.join(agent, "jobs", str(job.pk), "big.bin"))
        hpcd_pid, agent_process = daemon.process.pid, agent_pid(agent)
        before = rss_mib(hpcd_pid), rss_mib(agent_process)
        started = time.monotonic()
        response = job.fetch_remote_file("big.bin")
        received = 0
        for chunk in response.streaming_content:
            received += len(chunk)
        elapsed = time.monotonic() - started
        assert received == size, (received, size)
        print(f"file: {size / 2**20:.0f} MiB in {elapsed:.2f} s = "
              f"{size / elapsed / 1e6:.0f} MB/s (agent -> hpcd -> Django, ws on loopback)")
        print(f"hpcd  RSS before {before[0]:.0f} MiB, peak {peak_rss_mib(hpcd_pid):.0f} MiB")
        print(f"agent RSS before {before[1]:.0f} MiB, peak {peak_rss_mib(agent_process):.0f} MiB")


if __name__ == "__main__":
    main()
