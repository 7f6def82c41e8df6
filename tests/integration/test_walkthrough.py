"""The README's "Your own site, step by step", run as it stands.

The section's code blocks become one bash script, in order: ``sh`` blocks as
they are, and a ``python`` block whose first line reads ``# FILE, at the end``
appended to FILE.  Two things are adapted: ``SRC`` (the checkout) is set to
this repository, and port 8000 becomes a free one.  The script runs in an
empty temporary directory with a clean environment: a fresh virtual
environment, pip, a new Django project, hpcd, an agent made by
``hpc_install_agent``, a job, a view.  It needs the package index (pip).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from harness import REPO, free_port, kill_agent

SECTION = "## Your own site, step by step"


def walkthrough_script(port):
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    start = readme.index(SECTION)
    section = readme[start:readme.index("\n## ", start + 1)]
    section = section.split("### Troubleshooting")[0]
    lines = ["set -euo pipefail", "set -x"]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    assert [kind for kind, _ in blocks].count("sh") >= 6, "the section lost its steps"
    for kind, body in blocks:
        if kind == "sh":
            lines.append(body.replace("8000", str(port)))
        elif kind == "python":
            first, _, rest = body.partition("\n")
            match = re.fullmatch(r"# (\S+), at the end", first)
            assert match, f"a python block must say which file it extends: {first!r}"
            lines.append(f"cat >> {match.group(1)} <<'HPC_WALKTHROUGH_EOF'\n\n{rest}"
                         "HPC_WALKTHROUGH_EOF")
        else:
            raise AssertionError(f"unexpected {kind} block in the walkthrough")
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(900)
def test_the_readme_walkthrough_works_as_written():
    port = free_port()
    script = walkthrough_script(port)
    # The base interpreter (not this test environment's venv) plays the
    # user's python3; nothing of the test environment leaks in.
    base_bin = os.path.join(sys.base_prefix, "bin")
    env = {k: v for k, v in os.environ.items()
           if k in ("HOME", "LANG", "LC_ALL", "USER", "LOGNAME", "TMPDIR", "PIP_INDEX_URL",
                    "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONFIG_FILE")}
    env["PATH"] = os.pathsep.join([base_bin, "/usr/local/bin", "/usr/bin", "/bin"])
    env["SRC"] = REPO
    work = tempfile.mkdtemp(prefix="hpc-walk-")
    process = None
    try:
        with open(os.path.join(work, "walkthrough.sh"), "w") as f:
            f.write(script)
        process = subprocess.Popen(["bash", "walkthrough.sh"], cwd=work, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        output, _ = process.communicate(timeout=840)
        log = _read(os.path.join(work, "hpcd.log"))
        assert process.returncode == 0, f"{output}\n--- hpcd.log ---\n{log}"
        assert "job 1: COMPLETED" in output, output
        assert "hello from the cluster" in output, output
        assert re.search(r"^1 +localhost +online ", output, re.M), output
        assert "hpcd: answering" in output
        assert "cluster 1 job 1: RUNNING -> COMPLETED" in log
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _stop_leftovers(work)
        shutil.rmtree(work, ignore_errors=True)


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _stop_leftovers(work):
    """What a failed run left: runserver (its session), hpcd, the agent."""
    pid = _read(os.path.join(work, "hpcd.pid")).strip()
    if pid.isdigit():
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
    kill_agent(os.path.join(work, "agent"))
