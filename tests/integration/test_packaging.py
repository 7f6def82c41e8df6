"""`twistd hpcd` is found after both install commands the README gives.

Twisted discovers plugins by scanning sys.path for twisted/plugins; an
editable install served by an import hook hides the project from that scan
(DESIGN.md section 10), which setup.cfg's package_dir avoids.  Each case
installs the project into a fresh virtual environment (without dependencies:
those come from the running environment through PYTHONPATH, which does not
process .pth files, so only the fresh install can make the plugin visible).
"""

import os
import subprocess
import sys
import sysconfig

import pytest

from harness import REPO


@pytest.mark.parametrize("editable", [False, True], ids=["pip install .", "pip install -e ."])
def test_twistd_finds_the_hpcd_plugin(tmp_path, editable):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    target = ["-e", REPO] if editable else [REPO]
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps",
                    "--disable-pip-version-check", *target], check=True, cwd=tmp_path,
                   timeout=600)
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"])
    env.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
         "hpcd", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--settings" in result.stdout
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import hpcd; print(hpcd.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    if editable:
        assert where.startswith(REPO)
    else:
        assert where.startswith(str(venv))
