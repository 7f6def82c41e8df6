"""Jobs as plain processes on the agent's own host.

Each job gets a runner (:mod:`hpc_agent.runner`, a few lines of bash) in a
session of its own; the runner reports through files in the job's control
directory (see :mod:`hpc_agent.schedulers.base`), so jobs survive an agent
restart and the agent needs no bookkeeping of its own.  Status checks only
read a few small files, so the agent can poll often and a finished job shows
within a fraction of a second.

A class with a ``local_template`` (the seed's ``scheduler.local.Local`` and
its subclasses) works as the seed's Local did: ``submit`` is a hook whose
value is ignored; ``_submit`` empties the working directory, calls it,
writes the template rendered with ``generate_template_dict()`` as the job
script (an executable: its ``#!`` line chooses the interpreter), starts it,
and returns the id.  Its output goes to ``log.out`` and ``log.err`` in the
working directory, as in the seed.
"""

import json
import numbers
import os
import signal
import time

from hpc_agent import runner
from hpc_agent.schedulers.base import (
    InvalidParameters, JobSpec, JobState, Scheduler, SchedulerError)
from hpc_agent.status import JobStatus


#: Seconds a restarted agent waits for a runner of the one before to start its
#: job or to say that it never will (it takes milliseconds).
GO_WAIT_SECONDS = 10.0
#: A file in a job's control directory: a cancel was sent to its runner.
CANCEL_MARK = "cancel-sent"


class Local(Scheduler):
    """Runs each job's script with bash on this host."""

    poll_fast_seconds = 0.25
    poll_slow_seconds = 5.0
    # A poll reads files; it runs no scheduler command worth rationing.
    rate_limited = False
    #: The seed's job template, a file path (relative to the agent directory).
    #: Setting it makes this a seed-style class.
    local_template = None
    #: Base name of a job's stdout and stderr files in its working directory,
    #: for this project's jobs and for seed-style ones.
    output_name = "hpc-job"
    seed_output_name = "log"

    #: Runners this process started and has not reaped yet, by pid.
    _children = {}

    @property
    def seed_style(self):
        return self.local_template is not None

    def _read(self, name, control=None):
        try:
            with open(os.path.join(control or self.control_dir(), name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    # -- submission -----------------------------------------------------------

    def build_script(self, spec):
        """The bash script for a validated :class:`JobSpec` (a hook for sites)."""
        return spec.script

    def generate_template_dict(self):
        """The values a seed-style template is rendered with (the seed's)."""
        return {"ui_job_id": self.ui_id}

    def get_local_script_file_path(self):
        """Where a seed-style job's rendered script is written."""
        return os.path.join(self.own_control_dir(), f"{self.ui_id}.sh")

    def _submit(self, job_parameters):
        if not self.seed_style:
            return self.submit(job_parameters)
        self.prepare_working_directory(empty=True)
        control = self.new_control_dir()
        self.submit(job_parameters)  # the seed's hook: its value is not the id
        script = self.get_local_script_file_path()
        with open(script, "w") as f:
            f.write(self.render_template(self.local_template))
        os.chmod(script, 0o700)
        return self._start(control, [script], self.seed_output_name)

    def submit(self, job_parameters):
        if self.seed_style:
            return None  # a hook for seed-style subclasses
        spec = JobSpec.from_parameters(job_parameters)
        unsupported = [f for f in ("nodes", "queue", "account", "array")
                       if getattr(spec, f) is not None]
        if spec.nodes == 1:
            unsupported.remove("nodes")
        if unsupported:
            raise InvalidParameters(
                f"the local scheduler cannot honour {', '.join(map(repr, unsupported))}: "
                "it runs one process on the agent's host")
        self.prepare_working_directory()
        control = self.new_control_dir()
        script = os.path.join(control, "job.sh")
        with open(script, "w") as f:
            f.write(self.build_script(spec))
        return self._start(control, ["/bin/bash", script], self.output_name,
                           spec.environment, spec.walltime_seconds, spec.memory_mb)

    def _start(self, control, command, output_name, environment=None, walltime_seconds=None,
               memory_mb=None):
        workdir = self.get_working_directory()
        env = dict(os.environ, **(environment or {}), HPC_JOB_WORKING_DIRECTORY=workdir)
        output = [os.path.join(workdir, f"{output_name}.{kind}") for kind in ("out", "err")]
        try:
            pid, process = runner.start(control, workdir, command, env, output,
                                        walltime_seconds, memory_mb)
        except OSError as e:
            # Out of processes, say: it may pass, and no record says it ran,
            # so the agent may try again.
            raise SchedulerError(f"the job runner did not start: {e}") from None
        # The runner outlives the agent but is its child while both live:
        # status() reaps it once it has ended.
        Local._children[pid] = process
        return str(pid)

    # -- state ----------------------------------------------------------------

    def _runner(self, control):
        """``(record, problem)``: the runner's pid and start time, or why not."""
        info = self._read("runner.json", control)
        if info is None:
            exists = os.path.exists(os.path.join(control, "runner.json"))
            return None, ("the job's runner record is unreadable" if exists else
                          "the job never started (no runner record)")
        if not (isinstance(info, dict) and _is_int(info.get("pid")) and info["pid"] > 0
                and _is_int(info.get("start"))):
            return None, f"the job's runner record is invalid: {info!r:.100}"
        return info, None

    def _alive(self, info):
        """Whether the recorded runner still runs (reaping it if it has ended)."""
        process = Local._children.get(info["pid"])
        if process is not None and process.poll() is not None:
            Local._children.pop(info["pid"], None)
        return runner.process_start_time(info["pid"]) == info["start"]

    def status(self):
        control = self.control_dir()
        info, problem = self._runner(control)
        if info is not None and self._alive(info):
            return JobState(JobStatus.RUNNING)
        # The runner writes its result last, so once it has ended the result
        # is whole (or the runner was killed before writing it).
        result = self._read("result.json", control)
        if result is not None or os.path.exists(os.path.join(control, "result.json")):
            return result_state(result)
        if info is None:
            return JobState(JobStatus.ERROR, problem)
        if (os.path.exists(os.path.join(control, CANCEL_MARK)) and not info.get("pgid")
                and not os.path.exists(os.path.join(control, "pgid"))):
            # The cancel's SIGTERM came before the runner had set its trap
            # (it had only just started): it died of it before starting the job.
            return JobState(JobStatus.CANCELLED, "cancelled before it started")
        return JobState(JobStatus.ERROR, "the job's runner process vanished (killed?)")

    def cancel(self):
        control = self.control_dir()
        info, _ = self._runner(control)
        if info is None:
            return
        if self._alive(info):
            # The runner stops the job's process group, and records why.  A
            # runner that has just started may not have set its trap yet and
            # die of the signal without a word: the mark, made first, tells
            # status() that it was cancelled, not lost.
            with open(os.path.join(control, CANCEL_MARK), "w"):
                pass
            os.kill(info["pid"], signal.SIGTERM)
            return
        if not _is_valid(self._read("result.json", control)):
            # No runner, and no word from it that the job ended (which it
            # writes after killing what was left): stop the job's group.
            pgid = info.get("pgid") or _read_int(os.path.join(control, "pgid"))
            if _is_int(pgid) and pgid > 1:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    @classmethod
    def find_submitted(cls, settings, ui_ids):
        found = {}
        for ui_id in ui_ids:
            job = cls(settings, ui_id, None)
            control = job.control_dir()
            info, _ = job._runner(control)
            if info is not None and not job._never_told_to_go(info, control):
                found[ui_id] = str(info["pid"])
        return found

    def _never_told_to_go(self, info, control, timeout=GO_WAIT_SECONDS):
        """Whether a recorded runner exited without running the job because
        the agent that started it died before saying go: then the job was not
        submitted, and submitting it again cannot run it twice.

        Asked after an agent's restart; a runner of the dead agent that has
        not yet acted on the word (or on the closed pipe) does so within
        moments, so this waits until it started the job or said it never will.
        """
        deadline = time.monotonic() + timeout
        while (self._alive(info) and not info.get("pgid")
               and not os.path.exists(os.path.join(control, "pgid"))
               and time.monotonic() < deadline):
            time.sleep(0.01)
        result = self._read("result.json", control)
        return isinstance(result, dict) and result.get("stopped") == "not started"


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _read_int(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


_INVALID = "the job runner's result record is invalid"


def result_state(result):
    """The JobState of a runner's ``result.json`` (None: missing or unparsable).

    A record that makes no sense (a signal 999, a missing field) makes this
    one job an error saying so; it never stops the poll of the others.
    """
    try:
        return _result_state(result)
    except ValueError as e:
        return JobState(JobStatus.ERROR, f"{_INVALID} ({e})")


def _is_valid(result):
    try:
        _result_state(result)
    except ValueError:
        return False
    return True


def _result_state(result):
    if not isinstance(result, dict):
        raise ValueError("not a JSON object" if result is not None else "not JSON")
    started = result.get("started")
    if started is not None and not (isinstance(started, numbers.Real)
                                    and not isinstance(started, bool)):
        raise ValueError(f"started is {started!r}")
    stopped = result.get("stopped")
    if stopped == "not started":
        return JobState(JobStatus.ERROR, "the job never ran: the agent stopped while starting "
                                         "it; submit it again")
    if stopped == "cancelled":
        return JobState(JobStatus.CANCELLED, started=started)
    if stopped == "walltime":
        return JobState(JobStatus.WALL_TIME_EXCEEDED, "the job exceeded its walltime",
                        started=started)
    if stopped is not None:
        raise ValueError(f"stopped is {stopped!r}")
    code, number = result.get("exit_code"), result.get("signal")
    if code is not None and not (_is_int(code) and code >= 0):
        raise ValueError(f"exit_code is {code!r}")
    if code == 0:
        return JobState(JobStatus.COMPLETED, started=started)
    if number is not None:
        if not (_is_int(number) and 0 < number < signal.NSIG):
            raise ValueError(f"signal {number!r} is not a signal")
        try:
            name = f" ({signal.Signals(number).name})"
        except ValueError:  # real-time signals have no name of their own
            name = ""
        return JobState(JobStatus.ERROR, f"killed by signal {number}{name}", started=started)
    if code is None:
        raise ValueError("neither an exit code nor a signal")
    return JobState(JobStatus.ERROR, f"exit code {code}", started=started)
