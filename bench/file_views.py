"""Files over HTTP (djangoapp.urls): a ranged read of a large file's end,
HEAD, a checksum, and an upload, through Django's test client with a live
hpcd and agent.

    .venv/bin/python bench/file_views.py [--size-mib 1024] [--upload-mib 256]

The ranged read asks for the last MiB of the file; "agent_bytes" is what
hpcd received from the agent for it (hpcd's transfer counter), which shows
that the agent seeks instead of sending what comes before.  Prints
``name: value unit`` lines.
"""

import argparse
import hashlib
import io
import os
import time

from _env import local_cluster, peak_rss_mib, rss_mib

MIB = 1024 * 1024


class Zeros(io.RawIOBase):
    """``size`` bytes to upload, made as they are read (no memory of their own)."""

    def __init__(self, size):
        self.left = size

    def read(self, n=-1):
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def transfer_bytes():
    from djangoapp import ipc, protocol

    return ipc.call(protocol.Status)["status"]["transfer_bytes"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--upload-mib", type=int, default=256)
    args = parser.parse_args()
    with local_cluster() as (cluster, daemon, agent):
        from django.contrib.auth import get_user_model
        from django.test import Client
        from django.test.utils import setup_test_environment
        from django.urls import reverse

        from djangoapp.models import HpcJob
        from harness import FINAL, agent_pid, wait_status

        setup_test_environment()
        client = Client()
        client.force_login(get_user_model().objects.create_user("b", is_staff=True))
        job = HpcJob.objects.create()
        job.submit({"script": "true"})
        wait_status(job, FINAL)
        size = args.size_mib * MIB
        path = os.path.join(agent, "jobs", str(job.pk), "big.bin")
        with open(path, "wb") as f:
            f.write(os.urandom(MIB) * args.size_mib)
        url = reverse("hpc:job-file", args=[job.pk, "big.bin"])

        before = transfer_bytes()
        started = time.monotonic()
        response = client.get(url, HTTP_RANGE=f"bytes=-{MIB}")
        body = b"".join(response.streaming_content)
        elapsed = time.monotonic() - started
        assert response.status_code == 206 and len(body) == MIB
        sent = transfer_bytes() - before
        print(f"range_last_mib_of_{args.size_mib}mib: {elapsed * 1000:.0f} ms")
        print(f"range_last_mib_of_{args.size_mib}mib_agent_bytes: {sent} bytes")

        started = time.monotonic()
        head = client.head(url)
        print(f"head_{args.size_mib}mib: {(time.monotonic() - started) * 1000:.0f} ms "
              f"(Content-Length {head['Content-Length']})")

        started = time.monotonic()
        checksum = job.file_checksum("big.bin")
        print(f"checksum_{args.size_mib}mib: {time.monotonic() - started:.2f} s "
              f"({size / (time.monotonic() - started) / 1e6:.0f} MB/s)")
        with open(path, "rb") as f:
            assert checksum["sha256"] == hashlib.file_digest(f, "sha256").hexdigest()
        os.unlink(path)

        hpcd_pid, agent_process = daemon.process.pid, agent_pid(agent)
        rss = rss_mib(hpcd_pid), rss_mib(agent_process)
        upload = args.upload_mib * MIB
        started = time.monotonic()
        result = job.upload_file("upload.bin", Zeros(upload))
        elapsed = time.monotonic() - started
        assert result["size"] == upload
        print(f"upload_{args.upload_mib}mib: {upload / elapsed / 1e6:.0f} MB/s")
        print(f"upload_hpcd_rss: {rss[0]:.0f} MiB before, {peak_rss_mib(hpcd_pid):.0f} MiB peak")
        print(f"upload_agent_rss: {rss[1]:.0f} MiB before, "
              f"{peak_rss_mib(agent_process):.0f} MiB peak")


if __name__ == "__main__":
    main()
