"""The agent's settings: ``settings.py`` in the agent directory.

The agent never imports Django; its settings are a plain Python file whose
upper-case names override the defaults below.  ``python -m hpc_agent init
DIR`` writes a commented one.
"""

import os
import re
import runpy

DEFAULTS = {
    # Where the agent writes its log files (relative to the agent directory).
    "HPC_LOG_DIRECTORY": "log",
    # The hpcd websocket URL as seen from this cluster (ws://host:port or
    # wss://host:port, no path).  None: use the address hpcd gives at launch.
    "HPC_WEBSOCKET_SERVER": None,
    # Dotted path of the scheduler class (a subclass of
    # hpc_agent.schedulers.base.Scheduler).  The seed's names work too:
    # "scheduler.slurm.Slurm", or "settings.mysite.MySlurm" for a file in a
    # settings/ directory here (see hpc_agent/seedcompat.py).
    "HPC_SCHEDULER_CLASS": "hpc_agent.schedulers.local.Local",
    # Jobs run in HPC_JOB_WORKING_DIRECTORY/<job id>/.
    "HPC_JOB_WORKING_DIRECTORY": "/tmp/jobs",
    # The mode of each job's working directory: 0o700, only the agent's user.
    # A site sharing job output with the user's group sets 0o750 (read) or
    # 0o770 (read and write); never writable by others.
    "HPC_JOB_DIRECTORY_MODE": 0o700,
    # The agent's own files for each job (scripts, the local runner's
    # records) go in HPC_CONTROL_DIRECTORY/<job id>/, outside the job's
    # working directory, so they are never listed or fetched as job output.
    "HPC_CONTROL_DIRECTORY": "control",
    # Roots outside a job's directory that files may be listed and fetched
    # from when no job is named (HpcCluster.fetch_remote_file with ui_id=None).
    # Empty: only inside HPC_JOB_WORKING_DIRECTORY.
    "HPC_ALLOWED_FILE_ROOTS": [],
    # The agent's durable state (jobs and unacknowledged updates), SQLite.
    "HPC_STATE_FILE": "state.sqlite3",
    # Seconds the agent keeps trying to reconnect (with its resume token)
    # after losing hpcd, before it exits and leaves the relaunch to hpcd.
    "HPC_RECONNECT_SECONDS": 600,
    # Seconds between websocket pings to hpcd; three intervals without an
    # answer count as a lost connection (then the agent reconnects).
    "HPC_PING_SECONDS": 10,
    # Seconds the agent waits for hpcd to complete a websocket opening
    # handshake; as long as hpcd waits (its openHandshakeTimeout), since a busy
    # hpcd (many agents launched at once) may take longer than Autobahn's 5 s.
    "HPC_HANDSHAKE_TIMEOUT_SECONDS": 15,
    # Seconds one blocking file operation may take (listing, opening, reading
    # a chunk, a checksum without progress) before its request is answered
    # with an error: a hung file system must not hold the agent.  Below
    # hpcd's HPC_AGENT_REQUEST_TIMEOUT, so the error arrives first.
    "HPC_FILE_TIMEOUT_SECONDS": 20,
    # Permissions the agent gives its own directory when it starts (it keeps
    # its state, settings and logs private in any case).  None: leave the
    # directory as the site set it, e.g. to share job output with a group.
    "HPC_AGENT_DIRECTORY_MODE": 0o700,
    # A CA bundle to verify hpcd's TLS certificate with (wss:// only).
    # None: the system's trust store.
    "HPC_TLS_CA_FILE": None,
    # Bytes per binary frame when sending a file.
    "HPC_FILE_CHUNK_SIZE": 1024 * 1024,
    # Most scheduler polls per minute: sites throttle users who hammer their
    # scheduler.
    "HPC_SCHEDULER_COMMANDS_PER_MINUTE": 120,
    # Jobs are named <prefix>-<job id> in the scheduler, which is how the
    # agent finds a job again after a crash.  Installations sharing a cluster
    # account need different prefixes (letters, digits, _).
    "HPC_JOB_TAG_PREFIX": "hpc",
}


class AgentSettings:
    """Attribute access to the defaults, overridden by a settings file."""

    def __init__(self, base_dir, overrides=None):
        self.BASE_DIR = os.path.abspath(base_dir)
        for name, value in DEFAULTS.items():
            setattr(self, name, value)
        for name, value in (overrides or {}).items():
            if name.isupper():
                setattr(self, name, value)
        # Relative paths are taken from the agent directory, once, here.
        for name in ("HPC_LOG_DIRECTORY", "HPC_JOB_WORKING_DIRECTORY", "HPC_STATE_FILE",
                     "HPC_CONTROL_DIRECTORY"):
            setattr(self, name, self.path(getattr(self, name)))
        self.HPC_ALLOWED_FILE_ROOTS = [self.path(p) for p in self.HPC_ALLOWED_FILE_ROOTS]
        if not re.fullmatch(r"[A-Za-z0-9_]{1,32}", str(self.HPC_JOB_TAG_PREFIX)):
            raise ValueError(f"HPC_JOB_TAG_PREFIX must be 1-32 letters, digits or _, "
                             f"not {self.HPC_JOB_TAG_PREFIX!r}")
        mode = self.HPC_JOB_DIRECTORY_MODE
        if (not isinstance(mode, int) or isinstance(mode, bool) or mode & ~0o777
                or mode & 0o700 != 0o700 or mode & 0o002):
            raise ValueError(f"HPC_JOB_DIRECTORY_MODE must be a mode like 0o700 or 0o750 that "
                             f"gives the agent's user rwx and others no write, not {mode!r}")

    @classmethod
    def load(cls, base_dir):
        """Read ``base_dir/settings.py`` (missing file: all defaults)."""
        path = os.path.join(base_dir, "settings.py")
        overrides = runpy.run_path(path) if os.path.exists(path) else {}
        return cls(base_dir, overrides)

    def path(self, value):
        """A settings path, relative ones taken from the agent directory."""
        return os.path.join(self.BASE_DIR, os.path.expanduser(value))

    def scheduler_class(self):
        """The class HPC_SCHEDULER_CLASS names, imported.

        The seed's module names (``scheduler.slurm``, ``settings.<file>``)
        resolve from here on in this process: see :mod:`hpc_agent.seedcompat`.
        """
        from hpc_agent import seedcompat

        return seedcompat.load_scheduler_class(self.HPC_SCHEDULER_CLASS, self.BASE_DIR)


TEMPLATE = '''\
"""Settings of the hpc-job-controller agent in this directory.

hpcd starts the agent here as ``venv/bin/python -m hpc_agent``; upper-case
names in this file override the defaults.  Paths may be relative to this
directory.
"""

# Where the agent writes its log files.
HPC_LOG_DIRECTORY = "log"

# The hpcd websocket URL as this cluster reaches it (ws://host:port or
# wss://host:port, no trailing slash).  None: the address hpcd gives at launch.
HPC_WEBSOCKET_SERVER = None

# The scheduler class: hpc_agent.schedulers.local.Local (processes on this
# host), .slurm.Slurm, .sge.SGE, .pbs.PBS (PBS Pro) or .pbs.Torque, or a subclass of your own
# (put it next to this file and name it here).  A scheduler file written for
# django_hpc_job_controller works as it is: put it (and its templates) in a
# settings/ directory here and name it "settings.<file>.<class>".
HPC_SCHEDULER_CLASS = "hpc_agent.schedulers.local.Local"

# Each job runs in HPC_JOB_WORKING_DIRECTORY/<job id>/.  On a cluster this
# must be on a file system the compute nodes share.
HPC_JOB_WORKING_DIRECTORY = "jobs"

# Job directories are private to this account (0o700).  To share job output
# with the account's group: 0o750 (read) or 0o770 (read and write).
# HPC_JOB_DIRECTORY_MODE = 0o700

# The agent's own files for each job (scripts, runner records), kept out of
# the job's directory.
# HPC_CONTROL_DIRECTORY = "control"

# Extra roots that files may be fetched from when no job is named.
# HPC_ALLOWED_FILE_ROOTS = ["/scratch/shared-results"]

# The agent's own state (SQLite).  Keep it on a local disk if you can.
# HPC_STATE_FILE = "state.sqlite3"

# Seconds to keep reconnecting to hpcd after a drop before exiting.
# HPC_RECONNECT_SECONDS = 600

# CA bundle for verifying hpcd's certificate when the URL is wss://.
# HPC_TLS_CA_FILE = None

# Seconds to wait for hpcd to complete a websocket opening handshake (as
# long as hpcd waits).
# HPC_HANDSHAKE_TIMEOUT_SECONDS = 15

# Seconds one blocking file operation (a listing, an open, a read) may take
# before its request fails: a hung file system must not hold the agent.
# HPC_FILE_TIMEOUT_SECONDS = 20

# Bytes per binary frame when sending a file.
# HPC_FILE_CHUNK_SIZE = 1024 * 1024

# Permissions the agent gives this directory when it starts; None leaves
# them as they are (to share job output with a group, say).
# HPC_AGENT_DIRECTORY_MODE = 0o700

# Most scheduler polls per minute.
# HPC_SCHEDULER_COMMANDS_PER_MINUTE = 120

# Jobs are named <prefix>-<job id> in the scheduler.  Installations sharing
# this cluster account need different prefixes.
# HPC_JOB_TAG_PREFIX = "hpc"

# Scheduler tools may need environment variables a non-interactive SSH
# login does not set; set them here, e.g.:
# import os
# os.environ.setdefault("SGE_ROOT", "/opt/sge")
'''
