"""bench/file_views.py keeps working, at a small size; its byte count is
checked (the agent sends only the range asked for), never its timings."""

import os
import re
import subprocess
import sys

from harness import REPO


def test_a_ranged_read_makes_the_agent_send_only_the_range():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HPC_IPC", "HPC_TEST_SQLITE", "DJANGO_"))}
    done = subprocess.run([sys.executable, os.path.join(REPO, "bench", "file_views.py"),
                           "--size-mib", "8", "--upload-mib", "4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(r"^range_last_mib_of_8mib_agent_bytes: 1048576 bytes$", out, re.M), out
    for name in ("range_last_mib_of_8mib", "head_8mib", "checksum_8mib", "upload_4mib"):
        assert re.search(rf"^{name}: [\d.]+ ", out, re.M), out
