"""Slurm: sbatch, squeue, sacct, scancel.

As measured on a real 22.05 with slurmdbd (tests/integration):

* One ``squeue --user=<uid> --states=all --array`` asks the controller once
  for every job of the agent's user (a server-side user filter), including
  jobs that ended less than MinJobAge (300 s) ago, with their exit codes.  So
  a poll is one process whatever the number of jobs, and most jobs are
  decided without accounting.
* A job gone from squeue is looked up in ``sacct`` (one call for all of them).
  Without slurmdbd, sacct says "accounting storage is disabled" and
  ``sacct -c`` reads the job completion file instead; that file loses array
  indices (its parser rejects ``ArrayJobId``) and numbers elements by their
  own job ids, so there elements are matched by the job's tag.
"""
import collections
import math
import os
import re

from hpc_agent.schedulers.base import JobState, SchedulerError
from hpc_agent.schedulers.batch import (
    BatchScheduler, aggregate, array_indices, error_text, exit_detail, parse_array, parse_time,
    tag_of)
from hpc_agent.status import JobStatus

_S = JobStatus

_SLURM_STATES = {
    "PENDING": (_S.QUEUED, ""), "CONFIGURING": (_S.QUEUED, "configuring nodes"),
    "REQUEUED": (_S.QUEUED, "requeued"), "REQUEUE_HOLD": (_S.QUEUED, "requeued, held"),
    "REQUEUE_FED": (_S.QUEUED, "requeued"), "RESV_DEL_HOLD": (_S.QUEUED, "held"),
    "SPECIAL_EXIT": (_S.QUEUED, "held after a special exit"),
    "RUNNING": (_S.RUNNING, ""), "COMPLETING": (_S.RUNNING, ""),
    "SIGNALING": (_S.RUNNING, ""), "STAGE_OUT": (_S.RUNNING, ""),
    "RESIZING": (_S.RUNNING, ""),
    "SUSPENDED": (_S.RUNNING, "suspended"), "STOPPED": (_S.RUNNING, "stopped"),
    "COMPLETED": (_S.COMPLETED, ""), "CANCELLED": (_S.CANCELLED, ""),
    "TIMEOUT": (_S.WALL_TIME_EXCEEDED, "time limit reached"),
    "OUT_OF_MEMORY": (_S.OUT_OF_MEMORY, "out of memory"),
    "NODE_FAIL": (_S.ERROR, "node failure"), "BOOT_FAIL": (_S.ERROR, "node boot failure"),
    "PREEMPTED": (_S.ERROR, "preempted"), "DEADLINE": (_S.ERROR, "deadline reached"),
    "REVOKED": (_S.ERROR, "revoked by the federation"),
}

#: Reasons squeue gives that say nothing a user needs.
_QUIET_REASONS = {"None", "Priority", "Resources", "NonZeroExitCode", ""}

#: "123", "123_4", "123_[5-9%2]"; steps ("123.batch") do not match.
_SACCT_ID = re.compile(r"(\d+)(?:_(\d+|\[[^\]]*\]))?(?:\+\d+)?")


def slurm_state(state, exit_code=(0, 0), reason="", start=""):
    """A JobState from Slurm's state ("FAILED", "CANCELLED by 1001"), or None.

    ``exit_code`` is ``(code, signal)``; ``start`` Slurm's StartTime.  None
    for a state this code does not know: the job is left undecided rather
    than guessed.
    """
    word, _, by = state.partition(" by ")
    if word == "FAILED":
        status = _S.ERROR
        detail = (exit_detail(*exit_code) if any(exit_code) else
                  f"failed ({reason})" if reason not in _QUIET_REASONS else "failed")
    elif word in _SLURM_STATES:
        status, detail = _SLURM_STATES[word]
        if by:
            detail = f"cancelled by uid {by}"
        elif status == _S.QUEUED and reason not in _QUIET_REASONS:
            detail = ", ".join(filter(None, [detail, reason]))
    else:
        return None
    # A cancelled job may never have run, though Slurm gives it a start time.
    ran = status not in (_S.QUEUED, _S.CANCELLED)
    return JobState(status, detail, parse_time(start, "%Y-%m-%dT%H:%M:%S") if ran else None)


class Slurm(BatchScheduler):
    """Jobs submitted with sbatch, polled with squeue and sacct."""

    # squeue is one cheap RPC whatever the job count, so poll briskly.
    poll_fast_seconds = 2.0
    poll_slow_seconds = 30.0
    submit_program = ("sbatch", "--parsable")
    # SQUEUE_PARTITION, SQUEUE_STATES, SLURM_TIME_FORMAT... in a user's
    # login environment would filter or reshape what the agent parses.
    ignored_environment = ("SQUEUE_", "SACCT_", "SLURM_TIME_FORMAT")
    transient_errors = re.compile(
        r"Unable to contact|timed out|temporarily|Connection refused|Zero Bytes|"
        r"communication|MaxSubmitJob|submit limit", re.IGNORECASE)
    #: "sacct" (slurmdbd) or "jobcomp" (``sacct -c``); None: try sacct and
    #: switch to jobcomp, once, if it says accounting storage is disabled.
    accounting = None
    #: How far back find_submitted looks in accounting, in days.
    find_lookback_days = 30

    _SQUEUE_FIELDS = ("ArrayJobID", "ArrayTaskID", "State", "exit_code", "Reason",
                      "StartTime", "Name")

    # -- the seed's template machinery ------------------------------------------
    # A class with a slurm_template is seed-style (see BatchScheduler): these
    # attributes reach its template through generate_template_dict().

    template_attribute = "slurm_template"
    #: The job script template, a file path relative to the agent directory.
    slurm_template = None
    #: Nodes, tasks per node, memory (MB; the seed's template asks it per
    #: CPU), walltime in seconds, and a job name (by default the job's tag).
    nodes = 1
    tasks_per_node = 1
    memory = 100
    walltime = 60
    job_name = None

    def __init__(self, settings, ui_id, job_id=None):
        super().__init__(settings, ui_id, job_id)
        if self.job_name is None:
            self.job_name = self.tag

    def generate_template_dict(self):
        """The values a seed-style template is rendered with: the seed's keys.

        ``wt_hours:wt_minutes:wt_seconds`` is the walltime (the seed gave the
        total minutes as ``wt_minutes``, which made its own template's
        ``--time`` longer than asked above an hour).
        """
        walltime = int(self.walltime)
        return {"nodes": self.nodes, "tasks_per_node": self.tasks_per_node,
                "mem": self.memory, "wt_hours": walltime // 3600,
                "wt_minutes": walltime // 60 % 60, "wt_seconds": walltime % 60,
                "job_name": self.job_name, "ui_job_id": self.ui_id}

    def get_slurm_script_file_path(self):
        """Where the rendered template is written: the job's control directory."""
        return os.path.join(self.own_control_dir(), f"{self.ui_id}.sh")

    def template_script_path(self):
        return self.get_slurm_script_file_path()

    def template_submit_arguments(self):
        # On the command line, so it wins over the template's --job-name: the
        # tag is how the agent finds the job again after a crash.
        return [f"--job-name={self.tagged(self.job_name)}"]

    # -- submission -----------------------------------------------------------

    def submit_arguments(self, spec):
        suffix = "-%a" if spec.array else ""
        args = [f"--job-name={self.scheduler_job_name(spec)}",
                f"--chdir={self.get_working_directory()}",
                # Relative to --chdir, so no '%' in the directory is expanded.
                f"--output={self.output_name}{suffix}.out",
                f"--error={self.output_name}{suffix}.err"]
        options = {"nodes": "--nodes", "tasks": "--ntasks", "cpus_per_task": "--cpus-per-task",
                   "queue": "--partition", "account": "--account"}
        args += [f"{option}={getattr(spec, field)}" for field, option in options.items()
                 if getattr(spec, field) is not None]
        if spec.memory_mb:
            args.append(f"--mem={spec.memory_mb}M")
        if spec.walltime_seconds:
            # Slurm's time limits have a resolution of one minute.
            args.append(f"--time={math.ceil(spec.walltime_seconds / 60)}")
        if spec.array:
            parse_array(spec.array)  # refuses "5-3" with a message naming 'array'
            args.append(f"--array={spec.array}")
        return args

    def parse_submitted(self, output):
        # "123", or "123;cluster" on a multi-cluster setup.
        return output.strip().splitlines()[-1].split(";")[0]

    def cancel(self):
        result = self.run(["scancel", str(self.job_id)])
        if result.returncode != 0 and not re.search(
                r"Invalid job id|already completing or completed", error_text(result)):
            raise SchedulerError(f"scancel failed: {error_text(result)}")

    # -- the live view --------------------------------------------------------

    @classmethod
    def squeue(cls):
        """``{job id: (name, elements)}`` for every job of the agent's user.

        ``elements`` is ``[(array index or None, JobState or None), ...]``.
        """
        fields = ",".join(f"{field}:0|" for field in cls._SQUEUE_FIELDS[:-1])
        output = cls.call(["squeue", "--noheader", "--array", "--states=all",
                           f"--user={os.geteuid()}",
                           f"--Format={fields},{cls._SQUEUE_FIELDS[-1]}:0"])
        jobs = {}
        for line in output.splitlines():
            if line.count("|") < 6:
                continue
            job_id, index, state, status, reason, start, name = line.split("|", 6)
            # exit_code is a wait() status: the exit code in the high byte.
            status = int(status)
            element = (None if index == "N/A" else int(index),
                       slurm_state(state, (status >> 8, status & 0x7f), reason, start))
            jobs.setdefault(job_id, (name.strip(), []))[1].append(element)
        return jobs

    # -- accounting -----------------------------------------------------------

    @classmethod
    def sacct(cls, args):
        """``(rows, from_jobcomp)``: rows of JobID, State, ExitCode, Start, JobName
        (last: other jobs' names may hold the separator).

        The job completion file (``sacct -c``) serves when accounting storage
        is disabled; it ignores most filters, so ``args`` are dropped there.
        """
        fields = ["--noheader", "--parsable2", "--format=JobID,State,ExitCode,Start,JobName"]
        if cls.accounting != "jobcomp":
            result = cls.run(["sacct", "--allocations", *fields, *args])
            if result.returncode == 0:
                return _rows(result.stdout), False
            if "accounting storage is disabled" not in error_text(result):
                raise SchedulerError(f"sacct failed: {error_text(result)}")
            cls.accounting = "jobcomp"
        # Warns about its own ArrayJobId keys on stderr, and exits 0.
        return _rows(cls.call(["sacct", "-c", *fields])), True

    @classmethod
    def ended(cls, jobs):
        """``{job id: elements}`` from accounting for ``jobs``, a ``{job id: tag}``."""
        rows, from_jobcomp = cls.sacct([f"--jobs={','.join(jobs)}"])
        job_of_tag = {tag: job_id for job_id, tag in jobs.items()}
        found = collections.defaultdict(list)
        for row_id, state, exit_code, start, name in rows:
            match = _SACCT_ID.fullmatch(row_id)
            if not match:
                continue
            code, _, signal = exit_code.partition(":")
            element_state = slurm_state(state, (int(code or 0), int(signal or 0)), "", start)
            if from_jobcomp:
                # Elements have job ids of their own there (and no index):
                # match by tag, ignoring older jobs that had the same tag.
                job_id = job_of_tag.get(tag_of(name))
                if job_id and int(match[1]) >= int(job_id):
                    found[job_id].append((None, element_state))
                continue
            job_id, index = match[1], match[2]
            if job_id not in jobs:
                continue
            if index is None or index.isdigit():
                found[job_id].append((index and int(index), element_state))
            else:  # pending elements, as "123_[5-9%2]"
                found[job_id] += [(i, element_state)
                                  for i in array_indices(parse_array(index)[0])]
        return found

    # -- batch calls ----------------------------------------------------------

    @classmethod
    def batch_status(cls, settings, jobs):
        wanted = {str(job_id): ui_id for ui_id, job_id in jobs if job_id}
        live = cls.squeue()
        answer, missing = {}, {}
        for job_id, ui_id in wanted.items():
            elements = live.get(job_id, ("", []))[1]
            state = decide(elements)
            is_array = bool(elements) and elements[0][0] is not None
            if state is not None and (state.status in _ACTIVE or not is_array):
                answer[ui_id] = state
            else:
                # Gone from squeue, or an array whose early elements may have
                # left it already: accounting knows every element.
                missing[job_id] = cls(settings, ui_id, None).tag
        if missing:
            ended = cls.ended(missing)
            for job_id in missing:
                elements = merge(live.get(job_id, ("", []))[1], ended.get(job_id, []))
                expected = cls(settings, wanted[job_id], None).expected_indices()
                if expected is not None and not _complete(elements, expected):
                    continue  # accounting has not heard of every element yet
                state = decide(elements)
                if state is not None:
                    answer[wanted[job_id]] = state
        return answer

    @classmethod
    def find_submitted(cls, settings, ui_ids):
        tags = cls.tags(settings, ui_ids)
        found = {}
        for job_id, (name, _) in cls.squeue().items():
            ui_id = tags.get(tag_of(name))
            if ui_id is not None:
                found[ui_id] = max(found.get(ui_id, job_id), job_id, key=int)
        if len(found) == len(tags):
            return found
        rows, from_jobcomp = cls.sacct([f"--starttime=now-{cls.find_lookback_days}days"])
        in_accounting = collections.defaultdict(set)
        for row_id, *_, name in rows:
            match = _SACCT_ID.fullmatch(row_id)
            if match and tag_of(name) in tags:
                in_accounting[tags[tag_of(name)]].add(int(match[1]))
        for ui_id, job_ids in in_accounting.items():
            # The newest job with the tag; in the completion file an array's
            # elements have ids of their own above the array's, so its lowest.
            found.setdefault(ui_id, str(min(job_ids) if from_jobcomp else max(job_ids)))
        return found


_ACTIVE = (_S.QUEUED, _S.RUNNING)


def _rows(output):
    return [line.split("|", 4) for line in output.splitlines() if line.count("|") >= 4]


def merge(live, accounted):
    """A job's elements from squeue and accounting; squeue is fresher."""
    if not accounted:
        return live
    if any(index is None for index, _ in accounted):
        # A plain job, or the completion file (no indices): the longer list.
        return accounted if len(accounted) >= len(live) else live
    elements = dict(accounted)
    elements.update((index, state) for index, state in live if index is not None)
    return sorted(elements.items())


def _complete(elements, expected):
    """Whether an array's elements cover every submitted index.  The job
    completion file has no indices: there the count has to do."""
    if any(index is None for index, _ in elements):
        return len(elements) >= len(expected)
    return {index for index, _ in elements} >= set(expected)


def decide(elements):
    """The state of a job from its elements; None when it cannot be decided."""
    if not elements or any(state is None for _, state in elements):
        return None
    if len(elements) == 1 and elements[0][0] is None:
        return elements[0][1]
    return aggregate(elements)
