"""The agent's own files are its user's only (hpc_agent.main, hpc_agent.__main__)."""

import os
import stat
import subprocess
import sys

from hpc_agent.config import AgentSettings
from hpc_agent.main import tighten_permissions
from hpc_agent.state import AgentState

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def make_agent_dir(tmp_path):
    base = tmp_path / "agent"
    (base / "log").mkdir(parents=True)
    (base / "jobs").mkdir()
    (base / "settings.py").write_text("HPC_JOB_WORKING_DIRECTORY = 'jobs'\n")
    (base / "log" / "agent.log").write_text("...")
    (base / "log" / "agent.log.1").write_text("...")
    state = AgentState(str(base / "state.sqlite3"))
    state.set_status(1, 70, "secret parameters live here")
    for path in (base, base / "log", base / "jobs"):
        os.chmod(path, 0o755)
    for path in (base / "settings.py", base / "log" / "agent.log",
                 base / "log" / "agent.log.1", base / "state.sqlite3"):
        os.chmod(path, 0o644)
    return base, state


def test_an_agent_start_takes_group_and_other_access_away(tmp_path):
    """Issue 9: state.sqlite3, settings.py and the logs were world-readable."""
    base, state = make_agent_dir(tmp_path)
    try:
        os.chmod(str(base / "state.sqlite3") + "-wal", 0o664)
        tighten_permissions(AgentSettings(str(base)))
        assert mode(base) == 0o700
        for path in (base / "settings.py", base / "state.sqlite3",
                     str(base / "state.sqlite3") + "-wal", base / "log" / "agent.log",
                     base / "log" / "agent.log.1"):
            assert mode(path) == 0o600, path
        assert mode(base / "log") == 0o700
        assert mode(base / "jobs") == 0o755  # the scheduler's business
    finally:
        state.close()


def test_a_site_may_keep_its_own_mode_for_the_agent_directory(tmp_path):
    base, state = make_agent_dir(tmp_path)
    try:
        os.chmod(base, 0o750)
        tighten_permissions(AgentSettings(str(base), {"HPC_AGENT_DIRECTORY_MODE": None}))
        assert mode(base) == 0o750
        assert mode(base / "settings.py") == 0o600
    finally:
        state.close()


def test_symlinks_are_not_followed_when_tightening(tmp_path):
    base, state = make_agent_dir(tmp_path)
    try:
        shared = tmp_path / "shared-settings.py"
        shared.write_text("")
        os.chmod(shared, 0o644)
        os.unlink(base / "settings.py")
        os.symlink(shared, base / "settings.py")
        tighten_permissions(AgentSettings(str(base)))
        assert mode(shared) == 0o644
    finally:
        state.close()


def test_init_writes_private_files_whatever_the_umask(tmp_path):
    target = tmp_path / "new-agent"
    subprocess.run(f"umask 022 && {sys.executable} -m hpc_agent init {target}", shell=True,
                   cwd=REPO, check=True, capture_output=True)
    assert mode(target / "settings.py") == 0o600
    assert mode(target / "log") == 0o700 and mode(target / "jobs") == 0o700
