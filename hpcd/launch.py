"""Starting a cluster's agent, and rationing SSH logins.

The agent is started as ``cd AGENT_DIR && venv/bin/python -m hpc_agent``
with a single JSON line on its standard input (the single-use token and the
URL to connect to), never in its arguments or environment.  The command
returns once the agent has detached and holds its directory (see
``hpc_agent.__main__``), so its exit status and output are the launch's
verdict.  For ``localhost`` /bin/sh runs it as a local process
(hpcd.shells.run_local); other hosts go over SSH (hpcd.ssh.run_command).
Both give a CommandResult, judged the same way.
"""

import collections
import json
import os
import shlex

from twisted.internet import defer, task
from twisted.logger import Logger

from hpcd import ssh
from hpcd.shells import SH, run_local, ssh_target

log = Logger()

#: The variables of hpcd's environment a local agent is started with.
_AGENT_ENVIRONMENT = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TMPDIR")


class LaunchFailed(Exception):
    """The agent did not start; the message says why, for the cluster's page."""


def launch_input(url, token):
    return json.dumps({"token": token, "url": url}).encode() + b"\n"


def _tail(data, limit=2000):
    text = data.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else "..." + text[-limit:]


class LoginLimiter:
    """At most ``per_minute`` SSH logins per cluster in any 60 s.

    Sites ban hosts that log in too often; every SSH login hpcd makes (agent
    launches and get_ssh_connection()) waits here for its turn.
    """

    def __init__(self, clock, per_minute):
        self._clock = clock
        self._per_minute = per_minute
        self._logins = collections.defaultdict(collections.deque)

    def delay(self, cluster_id):
        """Seconds until cluster ``cluster_id`` may log in again (0: now)."""
        logins = self._logins[cluster_id]
        now = self._clock.seconds()
        while logins and logins[0] <= now - 60:
            logins.popleft()
        if len(logins) < self._per_minute:
            return 0.0
        return logins[0] + 60 - now

    @defer.inlineCallbacks
    def acquire(self, cluster_id):
        """Fires when a login may happen, and counts it."""
        while (wait := self.delay(cluster_id)) > 0:
            log.info("cluster {id}: SSH login limit reached; waiting {s:.0f} s",
                     id=cluster_id, s=wait)
            yield task.deferLater(self._clock, wait, lambda: None)
        self._logins[cluster_id].append(self._clock.seconds())


def agent_command(client_path):
    """The shell command that starts the agent in ``client_path``."""
    return (f"cd {shlex.quote(client_path)} && "
            "if [ ! -x venv/bin/python ]; then "
            "echo \"$PWD/venv/bin/python not found: install the agent "
            "(manage.py hpc_install_agent)\" >&2; exit 127; fi && "
            "exec venv/bin/python -m hpc_agent")


class SSHLauncher:
    """Starts agents over SSH with Conch, the token on the command's stdin."""

    def __init__(self, reactor, limiter, timeout=60.0):
        self._reactor = reactor
        self._limiter = limiter
        self._timeout = timeout

    @defer.inlineCallbacks
    def launch(self, cluster, url, token):
        """Fires with the agent's start message, or fails with LaunchFailed."""
        yield self._limiter.acquire(cluster["id"])
        try:
            result = yield ssh.run_command(
                self._reactor, ssh_target(cluster), agent_command(cluster["client_path"]),
                stdin=launch_input(url, token), timeout=self._timeout)
        except ssh.SSHError as e:
            raise LaunchFailed(str(e)) from None
        return _verdict(result)


class LocalLauncher:
    """Starts agents on this host (clusters whose host_name is localhost) with run_local."""

    def __init__(self, reactor, timeout=60.0):
        self._reactor = reactor
        self._timeout = timeout

    def launch(self, cluster, url, token):
        """Fires with the agent's start message, or fails with LaunchFailed."""
        directory = cluster["client_path"]
        python = os.path.join(directory, "venv", "bin", "python")
        if not os.path.isdir(directory):
            return defer.fail(LaunchFailed(f"agent directory {directory} does not exist"))
        if not os.access(python, os.X_OK):
            return defer.fail(LaunchFailed(
                f"{python} not found: create the agent's virtual environment there "
                "(see the README, 'Installing an agent')"))
        env = {k: v for k, v in os.environ.items() if k in _AGENT_ENVIRONMENT}
        # The command an SSH launch runs, by the shell: given a working
        # directory instead, Twisted forks hpcd (a copy of its memory for each
        # of fifty agents launched at once) where it can use posix_spawn.
        ran = run_local(self._reactor, [SH, "-c", agent_command(directory)],
                        stdin=launch_input(url, token), timeout=self._timeout, env=env)
        return ran.addCallbacks(_verdict, _launch_failed)


class Launcher:
    """A local process for ``localhost``, SSH for every other host."""

    def __init__(self, local, remote):
        self._local = local
        self._remote = remote

    def launch(self, cluster, url, token):
        chosen = self._local if cluster["host_name"] == "localhost" else self._remote
        return chosen.launch(cluster, url, token)


def _verdict(result):
    """The agent's start message from its launch command's ssh.CommandResult, or LaunchFailed."""
    if result.exit_status != 0:
        how = (f"signal {result.signal}" if result.signal
               else f"exit status {result.exit_status}")
        raise LaunchFailed(f"the agent exited at once ({how}): "
                           f"{_tail(result.stderr) or _tail(result.stdout) or 'no output'}")
    return _tail(result.stdout) or "agent started"


def _launch_failed(failure):
    failure.trap(ssh.SSHError)
    raise LaunchFailed(str(failure.value))
