"""``python -m hpc_agent status DIR`` names the installation the directory serves."""

from hpc_agent.__main__ import status
from hpc_agent.state import AgentState


def test_status_names_the_bound_installation(tmp_path, capsys):
    (tmp_path / "settings.py").write_text("HPC_JOB_WORKING_DIRECTORY = 'jobs'\n")
    state = AgentState(str(tmp_path / "state.sqlite3"))
    state.set_status(1, 70, "")
    state.close()
    assert status(str(tmp_path)) == 0
    assert "none yet (bound on the first welcome from hpcd)" in capsys.readouterr().out
    state = AgentState(str(tmp_path / "state.sqlite3"))
    assert state.bind_installation("inst-a") == "inst-a"
    assert state.bind_installation("inst-b") == "inst-a"
    state.close()
    status(str(tmp_path))
    assert "installation     inst-a" in capsys.readouterr().out
