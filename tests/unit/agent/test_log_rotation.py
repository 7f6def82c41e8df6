"""The agent's log rotates, keeping a bounded number of files (hpc_agent.main)."""

import os

from hpc_agent.main import log_file


def test_the_log_rotates_at_10_mb_and_keeps_five_old_files(tmp_path):
    log = log_file(str(tmp_path))
    chunk = "x" * 1_000_000 + "\n"
    for _ in range(75):  # 75 MB: seven rotations
        log.write(chunk)
    log.close()
    names = sorted(os.listdir(tmp_path))
    assert names == ["agent.log"] + [f"agent.log.{n}" for n in range(1, 6)]
    # A file is rotated before the write that finds it at 10 MB or more.
    assert all(os.path.getsize(tmp_path / n) < 10_000_000 + len(chunk) for n in names)
