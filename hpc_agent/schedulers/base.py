"""The scheduler interface a site extends.

A site subclasses one of the built-in schedulers (or :class:`Scheduler`
itself) and names its class in the agent setting ``HPC_SCHEDULER_CLASS``.
The interface is the seed project's: one instance per job, built as
``Scheduler(settings, ui_id, job_id)`` where ``ui_id`` is the job's id in the
Django database and ``job_id`` the scheduler's own id (``None`` before
submission).  On top of it come two class methods the agent prefers when a
class provides them, because they ask the scheduler once for many jobs:
:meth:`Scheduler.status_many` and :meth:`Scheduler.find_submitted`.

Methods here are plain blocking Python: the agent calls them on a worker
thread, never on its event loop, so a subclass may run commands with
:mod:`subprocess` freely.
"""

import dataclasses
import os
import re
import shutil

from hpc_agent.status import JobStatus


class InvalidParameters(ValueError):
    """The job's parameters cannot be submitted; the message says why."""


class SchedulerError(RuntimeError):
    """The scheduler failed in a way that may pass (retry later)."""


@dataclasses.dataclass(frozen=True)
class JobState:
    """What a scheduler says about one job.

    ``started`` (a Unix time, or None) says the job did start running: a job
    that started and finished between two polls is then still recorded as
    RUNNING before its end, so its history shows every phase.
    """

    status: JobStatus
    detail: str = ""
    started: float = None


#: ``array`` accepts "0-9", "1,3,5", "1-99:2" or "0-9%2" (Slurm's syntax,
#: which each built-in scheduler translates), or an integer N meaning 0..N-1.
_ARRAY_RE = re.compile(r"^\d+(-\d+(:\d+)?)?(,\d+(-\d+(:\d+)?)?)*(%\d+)?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """The built-in job parameters, validated.

    ``script`` is the body of a bash script run in the job's working
    directory.  The others are optional resource requests; a scheduler that
    cannot honour one says so at submit time instead of ignoring it.
    """

    script: str
    name: str = None
    nodes: int = None
    tasks: int = None
    cpus_per_task: int = None
    memory_mb: int = None
    walltime_seconds: int = None
    queue: str = None
    account: str = None
    environment: dict = None
    array: str = None

    @classmethod
    def from_parameters(cls, parameters):
        """Validate a job's parameters; raise InvalidParameters naming the field."""
        if not isinstance(parameters, dict):
            raise InvalidParameters(
                f"job parameters must be a JSON object, not {type(parameters).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(parameters) - known)
        if unknown:
            raise InvalidParameters(
                f"unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"the built-in schedulers take {', '.join(sorted(known))}")
        script = parameters.get("script")
        if not isinstance(script, str) or not script.strip():
            raise InvalidParameters("'script' must be a non-empty string (a bash script body)")
        values = {"script": script}
        for field in ("nodes", "tasks", "cpus_per_task", "memory_mb", "walltime_seconds"):
            value = parameters.get(field)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidParameters(f"{field!r} must be a positive integer, got {value!r}")
            values[field] = value
        for field in ("name", "queue", "account"):
            value = parameters.get(field)
            if value is None:
                continue
            if not isinstance(value, str) or not _NAME_RE.match(value):
                raise InvalidParameters(
                    f"{field!r} must be 1-64 characters of letters, digits and _.+-, "
                    f"got {value!r}")
            values[field] = value
        env = parameters.get("environment")
        if env is not None:
            if not isinstance(env, dict) or not all(
                    isinstance(k, str) and _ENV_NAME_RE.match(k) and isinstance(v, str)
                    and "\0" not in v for k, v in env.items()):
                raise InvalidParameters(
                    "'environment' must map variable names to string values")
            values["environment"] = dict(env)
        array = parameters.get("array")
        if array is not None:
            if isinstance(array, int) and not isinstance(array, bool):
                if array < 1:
                    raise InvalidParameters(f"'array' must be at least 1, got {array}")
                array = f"0-{array - 1}"
            if not isinstance(array, str) or not _ARRAY_RE.match(array):
                raise InvalidParameters(
                    f"'array' must be a count or indices like '0-9', '1,3,5', '1-99:2', "
                    f"got {array!r}")
            values["array"] = array
        return cls(**values)


class Scheduler:
    """Base class of every scheduler; the seed's interface plus batch calls."""

    #: Seconds between status polls while jobs change, and when nothing has
    #: changed for a while.  The agent adapts between the two and never polls
    #: more often than the fast one.
    poll_fast_seconds = 2.0
    poll_slow_seconds = 30.0
    #: Whether polls count against ``HPC_SCHEDULER_COMMANDS_PER_MINUTE``.
    rate_limited = True

    def __init__(self, settings, ui_id, job_id=None):
        self.settings = settings
        self.ui_id = ui_id
        self.job_id = job_id

    # -- the seed's interface --------------------------------------------------

    def get_working_directory(self):
        """Where the job runs: ``HPC_JOB_WORKING_DIRECTORY/<ui_id>/``."""
        return os.path.join(self.settings.HPC_JOB_WORKING_DIRECTORY, str(self.ui_id))

    @property
    def tag(self):
        """The name every built-in scheduler gives the job, to find it again:
        ``<HPC_JOB_TAG_PREFIX>-<ui_id>``, by default ``hpc-12``."""
        return f"{self.settings.HPC_JOB_TAG_PREFIX}-{self.ui_id}"

    def submit(self, parameters):
        """Submit the job; return the scheduler's id for it (a string)."""
        raise NotImplementedError

    def status(self):
        """Return this job's :class:`JobState`."""
        raise NotImplementedError

    def cancel(self):
        """Ask the scheduler to stop the job.  The end state comes from status()."""
        raise NotImplementedError

    def delete_data(self):
        """Remove the job's working directory."""
        path = self.get_working_directory()
        if os.path.lexists(path):
            shutil.rmtree(path)

    def file_send_start(self, path):
        """Called before a file of this job is sent (a hook for sites)."""

    def file_send_end(self, path):
        """Called after a file of this job was sent (a hook for sites)."""

    # -- batch calls ---------------------------------------------------------

    @classmethod
    def status_many(cls, settings, jobs):
        """States of many jobs at once: ``{ui_id: JobState}``.

        ``jobs`` is a list of ``(ui_id, job_id)``.  The default asks each job
        in turn; the built-in schedulers ask the scheduler once.  A job left
        out of the answer is one whose state could not be decided this time.
        """
        return {ui_id: cls(settings, ui_id, job_id).status() for ui_id, job_id in jobs}

    @classmethod
    def find_submitted(cls, settings, ui_ids):
        """After a crash: which of these jobs did the scheduler accept?

        Returns ``{ui_id: job_id}`` for those found (by their tag), or ``None``
        when this scheduler cannot tell, in which case the agent reports the
        job as an error rather than risk running it twice.
        """
        return None
