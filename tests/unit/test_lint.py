"""The code passes the project's lint settings (ruff.toml)."""

import shutil
import subprocess
import sys

import pytest

from harness import REPO


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or shutil.which("ruff", path=sys.prefix + "/bin")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' brings it)")
    result = subprocess.run([ruff, "check", "--no-cache", REPO], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
