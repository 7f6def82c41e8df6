"""setup.cfg lists every package of the project, so `pip install .` (not only
an editable install, which serves the whole tree) ships all of them."""

import configparser
import os

from harness import REPO


def test_every_package_directory_is_in_setup_cfg():
    setup = configparser.ConfigParser()
    setup.read(os.path.join(REPO, "setup.cfg"))
    listed = set(setup["options"]["packages"].split())
    found = set()
    for top in ("hpc_agent", "hpcd", "djangoapp"):
        for directory, _, files in os.walk(os.path.join(REPO, top)):
            if "__init__.py" in files:
                found.add(os.path.relpath(directory, REPO).replace(os.sep, "."))
    assert "hpcd.ssh" in found
    assert found - listed == set()
