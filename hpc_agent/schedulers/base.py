"""The scheduler interface a site extends.

A site subclasses one of the built-in schedulers (or :class:`Scheduler`
itself) and names its class in the agent setting ``HPC_SCHEDULER_CLASS``.
The interface is the seed project's (django_hpc_job_controller): one
instance per job, built as ``Scheduler(settings, ui_id, job_id)`` where
``ui_id`` is the job's id in the Django database and ``job_id`` the
scheduler's own id (``None`` before submission).

**Submission.**  The agent calls ``_submit(job_parameters)``, the seed's
entry point (through :func:`submit_job`).  It prepares the job's working
directory, calls ``submit(job_parameters)`` with the parameters exactly as
the portal passed them (a JSON object arrives as a dict, a JSON string stays
a string) and returns the scheduler's id.  An id of None is the seed's way of
saying the submission failed: the job becomes ERROR.

**Two kinds of subclass**, told apart by what the class defines:

* This project's own: the built-in ``submit`` takes a JSON object such as
  ``{"script": "...", "walltime_seconds": 600}`` (:class:`JobSpec`) and sites
  adapt it through hooks (``build_script``, ``submit_arguments``).
* The seed's: a Local subclass with a ``local_template``, or a Slurm subclass
  with a ``slurm_template`` (a class attribute, or set in ``__init__`` as the
  seed's portals do).  Such a class gets the seed's behaviour: ``_submit``
  empties the working directory first, and the job script is the template
  rendered with ``template % self.generate_template_dict()``; ``submit`` is
  the seed's (for Local a hook whose value is ignored, for Slurm the sbatch
  call whose value is the id).  The seed's module names
  (``scheduler.slurm.Slurm``...) name these classes with the seed's default
  templates: see :mod:`hpc_agent.seedcompat`.

**Status.**  ``status()`` returns a :class:`JobState`, or the seed's
``(JobStatus, info)`` pair (``(None, None)``: cannot tell yet).  The agent
asks :meth:`Scheduler.status_many` for all its active jobs at once; the
built-in schedulers answer that with one scheduler command
(``batch_status``), except in a subclass that overrides ``status``: there
every job's own ``status()`` is asked, so the override is what counts.

**The agent's files.**  What the agent keeps for a job (its script, the local
runner's records, markers) lives in the job's *control directory*,
``HPC_CONTROL_DIRECTORY/<ui_id>``, outside the working directory: it never
shows in the job's file list and cannot be fetched as the job's output.  Jobs
started by an agent from before this layout keep theirs in
``<working directory>/.hpc``, which is still read, so jobs running across an
upgrade stay tracked.

Methods here are plain blocking Python: the agent calls them on a worker
thread, never on its event loop, so a subclass may run commands with
:mod:`subprocess` freely.
"""

import dataclasses
import logging
import os
import re
import shutil

from hpc_agent.status import JobStatus

#: Where jobs started by an agent older than the control directory keep the
#: agent's files: inside their working directory.
LEGACY_CONTROL_DIR = ".hpc"


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

    def __iter__(self):
        """Unpacks as the seed's ``(JobStatus, info)`` pair, for code written
        for it (``status, info = super().status()``)."""
        return iter((self.status, self.detail))


#: ``array`` accepts "0-9", "1,3,5", "1-99:2" or "0-9%2" (Slurm's syntax,
#: which each built-in scheduler translates), or an integer N meaning 0..N-1.
#: Every validating pattern is used with fullmatch: with match, "$" would
#: accept a trailing newline.
_ARRAY_RE = re.compile(r"\d+(-\d+(:\d+)?)?(,\d+(-\d+(:\d+)?)?)*(%\d+)?")
_NAME_RE = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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
            if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
                raise InvalidParameters(
                    f"{field!r} must be 1-64 characters of letters, digits and _.+-, "
                    f"got {value!r}")
            values[field] = value
        env = parameters.get("environment")
        if env is not None:
            if not isinstance(env, dict) or not all(
                    isinstance(k, str) and _ENV_NAME_RE.fullmatch(k) and isinstance(v, str)
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
            if not isinstance(array, str) or not _ARRAY_RE.fullmatch(array):
                raise InvalidParameters(
                    f"'array' must be a count or indices like '0-9', '1,3,5', '1-99:2', "
                    f"got {array!r}")
            values["array"] = array
        return cls(**values)


class SubmissionFailed(InvalidParameters):
    """The scheduler class returned no job id: the seed's way of saying that
    the submission failed."""


def job_state(value, where="status()"):
    """A :class:`JobState` from what a ``status()`` returned; None: undecided.

    Takes a JobState, the seed's ``(JobStatus, info)`` pair (a status of None
    means the scheduler could not tell), or a bare status.  Anything else makes
    the job an error naming what came back, rather than stopping the poll.
    """
    if value is None or isinstance(value, JobState):
        return value
    status, detail = value, ""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        status, info = value
        if status is None:
            return None
        detail = "" if info is None else str(info)
    if isinstance(status, int) and not isinstance(status, bool):
        try:
            return JobState(JobStatus(status), detail)
        except ValueError:
            pass
    return JobState(JobStatus.ERROR, f"{where} returned {value!r}, which is neither a JobState "
                                     "nor a (JobStatus, info) pair")


def submit_job(scheduler, job_parameters):
    """Submit through the seed's entry point; return the id as a string.

    This is what the agent runs (on a worker thread) for a new job.  An id of
    None (or empty) raises :class:`SubmissionFailed`.
    """
    job_id = scheduler._submit(job_parameters)
    if job_id is None or isinstance(job_id, bool) or not str(job_id).strip():
        raise SubmissionFailed(
            f"{type(scheduler).__name__} returned no job id ({job_id!r}), which means the "
            f"submission failed: see the agent's log and the job's working directory "
            f"{scheduler.get_working_directory()}")
    return str(job_id).strip()


def warn(message):
    """Log a warning in the agent's log (the standard logging module where
    Twisted is not installed: scheduler classes need only the standard library)."""
    try:
        from twisted.logger import Logger
    except ImportError:
        logging.getLogger("hpc_agent.schedulers").warning(message)
    else:
        Logger(namespace="hpc_agent.schedulers").warn("{message}", message=message)


def remove(path):
    """Remove a file, a symlink or a directory tree, if there is one."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


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

    def _submit(self, job_parameters):
        """Submit the job: the agent's entry point, as in the seed.

        Prepares the working directory, then returns what :meth:`submit`
        returns.  A subclass may override it for work before or after the
        submission, as the seed's portals did.
        """
        self.prepare_working_directory()
        return self.submit(job_parameters)

    def submit(self, job_parameters):
        """Submit the job; return the scheduler's id for it (None: it failed)."""
        raise NotImplementedError

    def status(self):
        """This job's :class:`JobState`, or the seed's ``(JobStatus, info)``."""
        raise NotImplementedError

    def cancel(self):
        """Ask the scheduler to stop the job.  The end state comes from status()."""
        raise NotImplementedError

    def delete_data(self):
        """Remove the job's working directory and the agent's files for it."""
        remove(self.get_working_directory())
        remove(self.own_control_dir())

    def file_send_start(self, file_path, extra_params=None):
        """Called before a file of this job is sent (a hook for sites).

        ``file_path`` is the path asked for and ``extra_params`` what the
        portal passed to ``fetch_remote_file(..., extra_params=...)``.
        Returns ``(path, ignore_prefix)``: the file to send instead (an
        archive made here, say) and whether it may lie outside the job's
        working directory.
        """
        return file_path, False

    def file_send_end(self, file_path, extra_params=None):
        """Called after a file of this job was sent, or failed to be (a hook
        for sites, to clean up what file_send_start made)."""

    def render_template(self, template):
        """A seed-style template, ``template % self.generate_template_dict()``.

        ``template`` is a file path, relative to the agent directory (the
        seed's client directory).
        """
        path = self.settings.path(template)
        name = type(self).__name__
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise InvalidParameters(
                f"{name}'s template {path} cannot be read ({e.strerror}); template paths are "
                f"taken from the agent directory {self.settings.BASE_DIR}") from None
        try:
            return text % self.generate_template_dict()
        except KeyError as e:
            raise InvalidParameters(
                f"the template {path} uses %({e.args[0]})s, which "
                f"{name}.generate_template_dict() does not give") from None
        except (TypeError, ValueError) as e:
            raise InvalidParameters(f"the template {path} cannot be rendered ({e}); a "
                                    "literal % is written %% in a template") from None

    # -- directories -----------------------------------------------------------

    def prepare_working_directory(self, empty=False):
        """Create the job's working directory with ``HPC_JOB_DIRECTORY_MODE``
        (0700 unless the site shares output with a group); ``empty``: remove
        whatever is in it first, as the seed's schedulers did."""
        path = self.get_working_directory()
        mode = self.settings.HPC_JOB_DIRECTORY_MODE
        if empty:
            remove(path)
        parent = os.path.dirname(os.path.normpath(path))
        if not os.path.isdir(parent):
            os.makedirs(parent, exist_ok=True)
            # The umask applies to a new directory: set the mode itself, or
            # a group could never reach its jobs.
            os.chmod(parent, mode)
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
        os.chmod(path, mode)
        return path

    def own_control_dir(self):
        """``HPC_CONTROL_DIRECTORY/<ui_id>``: where this agent keeps the job's files."""
        return os.path.join(self.settings.HPC_CONTROL_DIRECTORY, str(self.ui_id))

    def control_dir(self):
        """The job's control directory: its own, or for a job started before
        the agent kept it outside the working directory, the old one."""
        path = self.own_control_dir()
        if not os.path.isdir(path):
            legacy = os.path.join(self.get_working_directory(), LEGACY_CONTROL_DIR)
            if os.path.isdir(legacy):
                return legacy
        return path

    def new_control_dir(self):
        """An empty control directory for a new submission (readable by the
        agent's user only), whatever an earlier attempt left."""
        path = self.own_control_dir()
        remove(path)
        os.makedirs(self.settings.HPC_CONTROL_DIRECTORY, mode=0o700, exist_ok=True)
        os.mkdir(path, 0o700)
        return path

    # -- batch calls ---------------------------------------------------------

    #: A class method ``batch_status(settings, jobs)`` answering status_many
    #: with one scheduler command; the built-in schedulers have one.
    batch_status = None

    @classmethod
    def status_many(cls, settings, jobs):
        """States of many jobs at once: ``{ui_id: JobState}``.

        ``jobs`` is a list of ``(ui_id, job_id)``.  A job left out of the
        answer is one whose state could not be decided this time.  Asks the
        scheduler once (``batch_status``) where the class can; a subclass that
        overrides ``status`` is asked job by job, so its override is used.
        """
        if cls.batch_status is not None and not cls.overrides_status():
            return cls.batch_status(settings, jobs)
        return cls.status_each(settings, jobs)

    @classmethod
    def overrides_status(cls):
        """Whether ``status`` is not the one that came with ``batch_status``."""
        owner = next(k for k in cls.__mro__ if "batch_status" in vars(k))
        return cls.status is not owner.status

    #: (class name, ui_id) -> the last error logged for that job's status().
    _status_errors = {}

    @classmethod
    def status_each(cls, settings, jobs):
        """status_many by asking each job's ``status()``.

        A status() that raises leaves its job undecided (and is logged once
        per new error); it never stops the others from being answered.
        """
        answer = {}
        for ui_id, job_id in jobs:
            key = (cls.__qualname__, ui_id)
            try:
                state = job_state(cls(settings, ui_id, job_id).status(),
                                  f"{cls.__name__}.status()")
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                if cls._status_errors.get(key) != error:
                    cls._status_errors[key] = error
                    warn(f"{cls.__name__}.status() of job {ui_id} failed: {error}")
                continue
            cls._status_errors.pop(key, None)
            if state is not None:
                answer[ui_id] = state
        return answer

    @classmethod
    def find_submitted(cls, settings, ui_ids):
        """After a crash: which of these jobs did the scheduler accept?

        Returns ``{ui_id: job_id}`` for those found (by their tag), or ``None``
        when this scheduler cannot tell, in which case the agent reports the
        job as an error rather than risk running it twice.
        """
        return None
