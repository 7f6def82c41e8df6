"""Streaming a large job file to Django: throughput against a plain socket
copy, and the memory of each process.

    .venv/bin/python bench/transfer.py [--size-mib 1024] [--size-mib 4608]

The file is created in a job's directory, fetched with
HpcJob.fetch_remote_file() and read to the end like a view's response would
be.  In the same run the same file is copied between two processes over a
plain loopback TCP socket, the best any relay could do on this machine; the
ratio of the two is the figure to watch.  Memory must stay flat whatever the
size (flow control end to end).  Prints ``name: value unit`` lines.
"""

import argparse
import os
import socket
import subprocess
import sys
import time

from _env import local_cluster, peak_rss_mib, rss_mib

CHUNK = 1024 * 1024

_SENDER = """
import socket, sys
with open(sys.argv[1], "rb") as f, socket.create_connection(("127.0.0.1", int(sys.argv[2]))) as s:
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            break
        s.sendall(chunk)
"""


def socket_copy_seconds(path):
    """Seconds to copy ``path`` from another process over loopback TCP."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        started = time.monotonic()
        sender = subprocess.Popen([sys.executable, "-c", _SENDER, path,
                                   str(listener.getsockname()[1])])
        conn, _ = listener.accept()
        buffer = bytearray(CHUNK)
        with conn:
            while conn.recv_into(buffer):
                pass
        elapsed = time.monotonic() - started
        sender.wait()
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, action="append",
                        help="file sizes to fetch (default: 1024)")
    args = parser.parse_args()
    sizes = args.size_mib or [1024]
    with local_cluster() as (cluster, daemon, agent):
        from djangoapp.models import HpcJob
        from harness import FINAL, agent_pid, wait_status

        hpcd_pid, agent_process = daemon.process.pid, agent_pid(agent)
        # For a profiler (py-spy record --pid).
        print(f"pids: hpcd {hpcd_pid} agent {agent_process} django {os.getpid()}",
              file=sys.stderr, flush=True)
        before = rss_mib(hpcd_pid), rss_mib(agent_process)
        for size_mib in sizes:
            job = HpcJob.objects.create()
            job.submit({"script": f"head -c {size_mib}M /dev/urandom > big.bin"})
            wait_status(job, FINAL, timeout=1200)
            path = os.path.join(agent, "jobs", str(job.pk), "big.bin")
            size = os.path.getsize(path)
            copy = socket_copy_seconds(path)
            print(f"fetching {size_mib} MiB", file=sys.stderr, flush=True)
            started = time.monotonic()
            received = 0
            for chunk in job.fetch_remote_file("big.bin").streaming_content:
                received += len(chunk)
            elapsed = time.monotonic() - started
            assert received == size, (received, size)
            name = f"download_{size_mib}mib"
            print(f"{name}: {size / elapsed / 1e6:.0f} MB/s")
            print(f"{name}_socket_copy: {size / copy / 1e6:.0f} MB/s")
            print(f"{name}_ratio: {copy / elapsed:.2f} of a socket copy")
            os.unlink(path)
        print(f"hpcd_rss: {before[0]:.0f} MiB before, {peak_rss_mib(hpcd_pid):.0f} MiB peak")
        print(f"agent_rss: {before[1]:.0f} MiB before, "
              f"{peak_rss_mib(agent_process):.0f} MiB peak")


if __name__ == "__main__":
    main()
