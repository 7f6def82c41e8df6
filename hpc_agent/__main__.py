"""``python -m hpc_agent``: start the agent; ``python -m hpc_agent init DIR``.

hpcd runs ``cd AGENT_DIR && venv/bin/python -m hpc_agent`` (over SSH, or as a
local process) and writes one JSON line to its standard input::

    {"token": "<single-use token>", "url": "ws://hpcd-host:8001"}

so the secret never appears in a process list, the environment or a shell
history.  The agent checks its settings, detaches into the background, takes
over the directory's lock from any earlier agent, and only then reports
success on standard output and exits the foreground process: the launch
command's exit status tells hpcd whether an agent now runs.
"""

import gc
import json
import os
import sys

from hpc_agent import __version__
from hpc_agent.config import TEMPLATE, AgentSettings

MAX_STDIN = 64 * 1024


def init(directory):
    """Write a commented settings.py (never over an existing one)."""
    os.umask(0o077)  # the agent's files are its user's only
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "settings.py")
    if os.path.exists(path):
        print(f"{path} exists; left as it is")
    else:
        with open(path, "w") as f:
            f.write(TEMPLATE)
        print(f"wrote {path}")
    for sub in ("log", "jobs"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    if not os.path.exists(os.path.join(directory, "venv")):
        print(f"next: create {os.path.join(directory, 'venv')} with this project installed")
    return 0


def status(directory):
    """What an admin on the cluster wants to know: is the agent running, and
    what does its state hold."""
    from hpc_agent.lock import holder
    from hpc_agent.state import AgentState

    settings = AgentSettings.load(directory)
    pid = holder(os.path.join(settings.BASE_DIR, "agent.lock"))
    print(f"agent directory  {settings.BASE_DIR}")
    print(f"agent            {'running, pid %d' % pid if pid else 'not running'}")
    print(f"scheduler        {settings.HPC_SCHEDULER_CLASS}")
    if not os.path.exists(settings.HPC_STATE_FILE):
        print("state            none yet (the agent never ran here)")
        return 0
    state = AgentState(settings.HPC_STATE_FILE)
    try:
        counts = state.counts()
        print("installation     " + (state.get_meta(state.INSTALLATION)
                                     or "none yet (bound on the first welcome from hpcd)"))
        print("jobs             " + (", ".join(f"{n} {s.name}" for s, n in counts) or "none"))
        print(f"unacknowledged   {state.outbox_size()} updates waiting for hpcd")
    finally:
        state.close()
    return 0


def stop(directory):
    """Ask the directory's agent to stop (its jobs keep running)."""
    import signal

    from hpc_agent.lock import holder

    pid = holder(os.path.join(os.path.abspath(directory), "agent.lock"))
    if pid is None:
        print("no agent is running there")
        return 1
    os.kill(pid, signal.SIGTERM)
    print(f"asked agent pid {pid} to stop")
    return 0


def read_launch_credentials(stream):
    data = stream.read(MAX_STDIN + 1)
    if len(data) > MAX_STDIN:
        raise ValueError("launch data on standard input is too long")
    try:
        launch = json.loads(data)
        token, url = launch["token"], launch["url"]
    except (ValueError, KeyError, TypeError):
        raise ValueError("standard input must be one JSON object with 'token' and 'url'; "
                         "the agent is meant to be started by hpcd") from None
    if not isinstance(token, str) or not isinstance(url, str):
        raise ValueError("'token' and 'url' must be strings")
    return token, url


def launch(foreground=False):
    # No cyclic garbage collection until the agent runs (hpc_agent.main turns
    # it back on): starting makes some 90,000 objects that live as long as the
    # agent (Twisted's, Autobahn's and the agent's modules), and the
    # collector's passes over them cost a seventh of an agent's start, which
    # counts when hpcd starts fifty agents at once on one small host.
    gc.disable()
    # Everything the agent writes (state, logs) is its user's only.
    os.umask(0o077)
    base_dir = os.getcwd()
    try:
        token, url = read_launch_credentials(sys.stdin)
        settings = AgentSettings.load(base_dir)
        settings.scheduler_class()
        url = settings.HPC_WEBSOCKET_SERVER or url
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"the hpcd URL {url!r} must start with ws:// or wss://")
        os.makedirs(settings.HPC_LOG_DIRECTORY, exist_ok=True)
    except Exception as e:
        print(f"hpc-agent: cannot start in {base_dir}: {e}", file=sys.stderr)
        return 2
    if foreground:
        from hpc_agent.main import run
        return run(settings, url, token, ready=lambda pid: None)
    return _detach(settings, url, token)


def _detach(settings, url, token):
    """Fork into the background; the parent exits with the child's verdict."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end) as status:
            verdict = status.read()
        if verdict.startswith("ok "):
            print(f"hpc-agent {__version__} started, pid {verdict.split()[1]}", flush=True)
            # Out at once, without the interpreter's teardown (a fifth of this
            # process's CPU): nothing here needs it, and hpcd may be starting
            # fifty agents on one host.
            os._exit(0)
        print(f"hpc-agent: {verdict.strip() or 'the agent died while starting'}",
              file=sys.stderr)
        return 1
    os.close(read_end)
    os.setsid()
    # From here on nothing may hold the launcher's pipes (an SSH session
    # stays open while any process holds them).
    log_path = os.path.join(settings.HPC_LOG_DIRECTORY, "agent.out")
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)

    def ready(pid):
        os.write(write_end, f"ok {pid}\n".encode())
        os.close(write_end)

    try:
        from hpc_agent.main import run
        code = run(settings, url, token, ready=ready)
    except BaseException as e:
        try:
            os.write(write_end, f"{type(e).__name__}: {e}\n".encode())
        except OSError:
            pass
        raise
    os._exit(code)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        # hpcd's launch, by far the most common: argparse (and the gettext it
        # imports) would be a few ms more of each of fifty agents launched at once.
        return launch()
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hpc_agent",
                                     description="The hpc-job-controller cluster agent.")
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--foreground", action="store_true",
                        help="do not detach (for debugging; logs go to the log directory)")
    sub = parser.add_subparsers(dest="command")
    for name, text in (("init", "write a commented settings.py into DIR"),
                       ("status", "show whether DIR's agent runs and what its state holds"),
                       ("stop", "stop DIR's agent (its jobs keep running)")):
        sub.add_parser(name, help=text).add_argument("directory", nargs="?" if name != "init"
                                                     else None, default=".")
    args = parser.parse_args(argv)
    commands = {"init": init, "status": status, "stop": stop}
    if args.command in commands:
        return commands[args.command](args.directory)
    return launch(foreground=args.foreground)


if __name__ == "__main__":
    sys.exit(main())
