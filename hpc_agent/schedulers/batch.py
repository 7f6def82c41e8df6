"""What the batch schedulers (Slurm, SGE, PBS) share.

:class:`BatchScheduler` holds it: the one place a scheduler command is run,
the job script and its hooks for sites, the job's tag, the seed's template
submission, arrays (in Slurm's syntax, which the job parameters use), and
the rule that folds an array's elements into one state.
"""

import collections
import os
import re
import shlex
import subprocess
import time

from hpc_agent.schedulers.base import (
    _NAME_RE, InvalidParameters, JobSpec, JobState, Scheduler, SchedulerError)
from hpc_agent.status import JobStatus

#: More array elements than this are refused rather than expanded in memory.
MAX_ARRAY_INDICES = 100_000

_S = JobStatus


class BatchScheduler(Scheduler):
    """A scheduler driven by command-line tools on the agent's host.

    Sites adapt submission with two hooks: :meth:`build_script` (the text of
    the job script) and :meth:`submit_arguments` (the submit command's
    options), for example::

        class Site(Slurm):
            def build_script(self, spec):
                return super().build_script(spec).replace(
                    "cd ", "module load python\\ncd ", 1)

            def submit_arguments(self, spec):
                return super().submit_arguments(spec) + ["--qos=long"]

    A class whose template attribute (``template_attribute``: Slurm's is
    ``slurm_template``) is set is a seed-style class instead: its ``submit``
    renders the template into the job script and submits that from the
    job's working directory, as the seed did, with nothing on the command
    line but the job's tag (which wins over the script's own job name).
    """

    #: Seconds a scheduler command may take before it counts as failed.
    #: Slurm's clients retry for about 10 s while slurmctld is down; SGE's
    #: qdel hangs about 60 s when qmaster is gone: neither may hold a worker
    #: thread for long.
    command_timeout = 30.0
    #: The command and fixed options that submit a script and print its id.
    submit_program = ()
    #: Variables dropped from the environment of every command, because a
    #: user's login environment can filter or reformat their output.
    ignored_environment = ()
    #: Submit errors that may pass (retry) rather than reject the job.
    transient_errors = re.compile(r"$^")
    #: Base name of the job's stdout/stderr files in its working directory.
    output_name = "hpc-job"
    #: The attribute that holds a seed-style class's template (a file path,
    #: relative to the agent directory); None: no seed counterpart.
    template_attribute = None

    # -- commands -------------------------------------------------------------

    @classmethod
    def run(cls, argv, timeout=None, cwd=None):
        """Run one scheduler command; return its :class:`subprocess.CompletedProcess`.

        Every process a scheduler class starts goes through here, so tests
        replace this one method to script answers or to count processes.
        ``cwd`` is given only for a seed-style submission (from the job's
        working directory).
        """
        timeout = cls.command_timeout if timeout is None else timeout
        env = {k: v for k, v in os.environ.items()
               if not (cls.ignored_environment and k.startswith(cls.ignored_environment))}
        try:
            return subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                errors="replace", timeout=timeout, env=env, cwd=cwd)
        except subprocess.TimeoutExpired:
            raise SchedulerError(f"{argv[0]} did not answer within {timeout:g} s") from None
        except OSError as e:
            raise SchedulerError(f"cannot run {argv[0]}: {e.strerror}") from None

    @classmethod
    def call(cls, argv, timeout=None):
        """run() and return its output; a failure raises SchedulerError."""
        result = cls.run(argv, timeout)
        if result.returncode != 0:
            raise SchedulerError(f"{argv[0]} failed: {error_text(result)}")
        return result.stdout

    # -- submission -----------------------------------------------------------

    @property
    def seed_style(self):
        return (self.template_attribute is not None
                and getattr(self, self.template_attribute, None) is not None)

    def script_path(self):
        return os.path.join(self.own_control_dir(), "job.sh")

    def scheduler_job_name(self, spec):
        """The tag, then the user's ``name``: ``hpc-12`` or ``hpc-12.render``."""
        return self.tagged(spec.name)

    def tagged(self, name):
        """``<tag>.<name>``, or the tag alone when ``name`` is empty or not a
        plain name (1-64 letters, digits and _.+-)."""
        if name and name != self.tag and _NAME_RE.fullmatch(str(name)):
            return f"{self.tag}.{name}"
        return self.tag

    def build_script(self, spec):
        """The job script's text (a hook for sites).

        The environment is exported in the script, quoted by shlex, rather
        than passed with ``--export``/``-v``, whose comma-separated syntax
        cannot carry every value.
        """
        lines = ["#!/bin/bash", f"# Job {self.ui_id}, written by the hpc-job-controller agent."]
        lines += [f"export {name}={shlex.quote(value)}"
                  for name, value in sorted((spec.environment or {}).items())]
        lines += [f"cd {shlex.quote(self.get_working_directory())} || exit 1", "",
                  spec.script.rstrip("\n"), ""]
        return "\n".join(lines)

    def submit_arguments(self, spec):
        """The submit command's options for ``spec`` (a hook for sites).

        Raise InvalidParameters for anything the scheduler cannot honour.
        """
        raise NotImplementedError

    def parse_submitted(self, output):
        """The job id from the submit command's output."""
        raise NotImplementedError

    def _submit(self, job_parameters):
        if self.seed_style:
            self.prepare_working_directory(empty=True)
            self.new_control_dir()
        return self.submit(job_parameters)

    def submit(self, job_parameters):
        if self.seed_style:
            return self.submit_template()
        spec = JobSpec.from_parameters(job_parameters)
        # Options first: a refused job leaves nothing behind on disk.
        argv = [*self.submit_program, *self.submit_arguments(spec), self.script_path()]
        self.prepare_working_directory()
        self.new_control_dir()
        with open(self.script_path(), "w") as f:
            f.write(self.build_script(spec))
        if spec.array:
            with open(self.array_path(), "w") as f:
                f.write(spec.array)
        return self.submit_script(argv)

    def submit_template(self):
        """The seed's submit: the template, rendered, submitted from the job's
        working directory; returns the id."""
        script = self.template_script_path()
        text = self.render_template(getattr(self, self.template_attribute))
        self.prepare_working_directory()
        if not os.path.isdir(os.path.dirname(script)):  # submit() called without _submit()
            if os.path.dirname(script) == self.own_control_dir():
                self.new_control_dir()
            else:
                os.makedirs(os.path.dirname(script), mode=0o700)
        with open(script, "w") as f:
            f.write(text)
        argv = [*self.submit_program, *self.template_submit_arguments(), script]
        return self.submit_script(argv, cwd=self.get_working_directory())

    def template_script_path(self):
        """Where a seed-style class's rendered template is written."""
        return os.path.join(self.own_control_dir(), f"{self.ui_id}.sh")

    def template_submit_arguments(self):
        """A seed-style submission's options: only what the agent needs."""
        raise NotImplementedError

    def submit_script(self, argv, cwd=None):
        """Run the submit command ``argv``; the job id, or an exception that
        says whether to retry."""
        result = self.run(argv) if cwd is None else self.run(argv, cwd=cwd)
        if result.returncode != 0:
            message = error_text(result)
            if self.transient_errors.search(message):
                raise SchedulerError(f"{argv[0]} failed: {message}")
            raise InvalidParameters(f"{type(self).__name__} refused the job: {message}")
        return self.parse_submitted(result.stdout)

    def array_path(self):
        return os.path.join(self.control_dir(), "array")

    def expected_indices(self):
        """An array job's indices, as submitted; None for a plain job.

        Accounting learns an array's elements one by one: a state is decided
        only once every element is known, not from the first few.
        """
        try:
            with open(self.array_path()) as f:
                return array_indices(parse_array(f.read().strip())[0])
        except (OSError, ValueError, InvalidParameters):
            return None

    # -- state ----------------------------------------------------------------

    def status(self):
        # batch_status, not status_many: a subclass's status() may call this.
        state = self.batch_status(self.settings, [(self.ui_id, self.job_id)]).get(self.ui_id)
        if state is None:
            raise SchedulerError(
                f"job {self.job_id} ({self.tag}) is neither queued nor in accounting yet")
        return state

    @classmethod
    def tags(cls, settings, ui_ids):
        """``{tag: ui_id}`` for these jobs."""
        return {cls(settings, ui_id, None).tag: ui_id for ui_id in ui_ids}

    def cancel_marker(self):
        """A file cancel() leaves, for schedulers that forget jobs deleted
        before they started (SGE and PBS keep no record of them)."""
        return os.path.join(self.control_dir(), "cancelled")

    def mark_cancelled(self):
        os.makedirs(self.control_dir(), exist_ok=True)
        with open(self.cancel_marker(), "w"):
            pass


def error_text(result):
    """What a failed command said, for an error message."""
    return (result.stderr.strip() or result.stdout.strip()
            or f"exit status {result.returncode}")


def tag_of(job_name):
    """``hpc-12`` for a job named ``hpc-12`` or ``hpc-12.render``."""
    return job_name.split(".", 1)[0]


# -- arrays -------------------------------------------------------------------

def parse_array(text):
    """Slurm's array syntax -> ``([(first, last, step), ...], limit or None)``.

    ``"1-99:2%3"`` -> ``([(1, 99, 2)], 3)``.  SGE prints task ranges the same
    way ("3-5:1"), so this reads those too.
    """
    body, _, limit = text.strip("[]").partition("%")
    ranges = []
    for part in body.split(","):
        bounds, _, step = part.partition(":")
        first, _, last = bounds.partition("-")
        first, last, step = int(first), int(last or first), int(step or 1)
        if last < first or step < 1:
            raise InvalidParameters(f"'array' range {part!r} is empty")
        ranges.append((first, last, step))
    return ranges, (int(limit) if limit else None)


def array_indices(ranges):
    """The sorted indices of parsed ranges."""
    if sum((last - first) // step + 1 for first, last, step in ranges) > MAX_ARRAY_INDICES:
        raise InvalidParameters(f"'array' has more than {MAX_ARRAY_INDICES} elements")
    return sorted({i for first, last, step in ranges for i in range(first, last + 1, step)})


def as_single_range(indices):
    """``(first, last, step)`` when the indices are one arithmetic run, else None."""
    step = indices[1] - indices[0] if len(indices) > 1 else 1
    if indices != list(range(indices[0], indices[-1] + 1, step)):
        return None
    return indices[0], indices[-1], step


def compact(indices):
    """``[1, 2, 3, 7]`` -> ``"1-3,7"``."""
    runs = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


#: How bad an element's end is, for the state of an array whose elements all ended.
_SEVERITY = [_S.COMPLETED, _S.CANCELLED, _S.WALL_TIME_EXCEEDED, _S.OUT_OF_MEMORY, _S.ERROR]
#: "FAILED" reads better than "ERROR" in a count of elements.
_LABELS = {_S.ERROR: "FAILED"}


def aggregate(elements):
    """One JobState for an array from ``[(index or None, JobState), ...]``.

    RUNNING while any element runs, QUEUED while any waits, then COMPLETED
    when all completed, ERROR when any failed, else the worst end.  The detail
    counts elements by state: "array: 8 COMPLETED, 2 FAILED (exit code 3: 4,7)".
    """
    statuses = {state.status for _, state in elements}
    if _S.RUNNING in statuses:
        status = _S.RUNNING
    elif _S.QUEUED in statuses:
        status = _S.QUEUED
    else:
        status = max(statuses, key=_SEVERITY.index)
    groups = collections.defaultdict(lambda: collections.defaultdict(list))
    for index, state in elements:
        groups[state.status][state.detail].append(index)
    parts = []
    for element_status in sorted(groups, reverse=True):
        by_detail = groups[element_status]
        count = sum(map(len, by_detail.values()))
        notes = [f"{detail}: {compact(i for i in indices if i is not None)}"
                 if any(i is not None for i in indices) else detail
                 for detail, indices in sorted(by_detail.items()) if detail]
        label = _LABELS.get(element_status, element_status.name)
        parts.append(f"{count} {label}" + (f" ({'; '.join(notes)})" if notes else ""))
    starts = [state.started for _, state in elements if state.started is not None]
    return JobState(status, "array: " + ", ".join(parts), min(starts, default=None))


def exit_detail(code, signal=0):
    """"exit code 3" or "killed by signal 9"."""
    return f"killed by signal {signal}" if signal else f"exit code {code}"


# -- Slurm ----------------------------------------------------------------------

#: Slurm job state -> (status, detail); FAILED is decided by its exit code.


def parse_time(text, layout):
    """Seconds since the epoch for a local time string; None if it is not one."""
    try:
        return time.mktime(time.strptime(text.strip(), layout))
    except ValueError:
        return None
