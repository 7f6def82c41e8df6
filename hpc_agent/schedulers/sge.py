"""Son of Grid Engine and its kin (qsub, qstat -xml, qacct, qdel).

As measured on a real SoGE 8.1.9 (tests/integration):

* ``qsub -terse`` prints ``123``, or ``123.1-10:1`` for an array.  That whole
  string is the job id: the task range in it is how the agent knows, once the
  array has left qstat, that qacct has a record for every task.
* ``qstat -xml -u <user>`` lists running tasks one by one and pending tasks as
  ranges ("3-5:1"); finished jobs leave it at once.
* ``qacct -j`` reads the accounting file, where a finished job appears 4-6 s
  after it left qstat: until then the job is left undecided.  Job numbers
  restart when the qmaster's spool is reset while the accounting file stays,
  so records are matched by job number *and* tag.
* A job deleted before it started leaves no accounting record at all, so
  cancel() leaves a marker in the job's directory and a vanished job with the
  marker and no record is CANCELLED.
* qdel hangs about 60 s when the qmaster is down: command_timeout bounds it.
"""

import math
import os
import pwd
import re
import xml.etree.ElementTree as ElementTree

from hpc_agent.schedulers.base import InvalidParameters, JobState, SchedulerError
from hpc_agent.schedulers.batch import (
    BatchScheduler, aggregate, array_indices, as_single_range, error_text, exit_detail,
    parse_array, parse_time, tag_of)
from hpc_agent.status import JobStatus

_S = JobStatus

#: qacct's "failed" codes that end a job in a state of their own; the others
#: mean Grid Engine could not run it ("26 : opening input/output file").
_LIMIT_EXCEEDED = 37    # qmaster enforced h_rt, h_cpu, or h_vmem limit
_KILLED_AFTER_START = 100  # assumedly after job: qdel of a running job


def sge_live_state(state):
    """A JobState from a qstat state code ("qw", "hqw", "r", "Eqw", "dr"...)."""
    if set(state) & set("sST"):
        return JobState(_S.RUNNING, "suspended")
    if "d" in state:
        return JobState(_S.RUNNING if "r" in state else _S.QUEUED, "being deleted")
    if "r" in state or "t" in state:
        return JobState(_S.RUNNING)
    if "E" in state:
        # Eqw stays queued until someone clears it (qmod -cj) or deletes it.
        return JobState(_S.QUEUED, "Grid Engine error state (Eqw): see qstat -j")
    return JobState(_S.QUEUED, "held" if "h" in state else "")


def sge_end_state(record, cancelled=False):
    """A JobState from one qacct record (a dict of its lines)."""
    failed, _, failure = record.get("failed", "0").partition(":")
    failed = int(failed.strip() or 0)
    exit_status = int(record.get("exit_status", "0").split()[0])
    started = parse_time(record.get("start_time", ""), "%a %b %d %H:%M:%S %Y")
    if failed == 0:
        if exit_status == 0:
            return JobState(_S.COMPLETED, started=started)
        return JobState(_S.ERROR, exit_detail(exit_status), started)
    if failed == _LIMIT_EXCEEDED:
        limits = dict(re.findall(r"\b(h_rt|h_cpu|h_vmem)=([^,\s]+)", record.get("category", "")))
        wallclock = float(record.get("ru_wallclock", "0").rstrip("s") or 0)
        if "h_vmem" in limits and not ("h_rt" in limits and wallclock >= seconds(limits["h_rt"])):
            return JobState(_S.OUT_OF_MEMORY, "h_vmem limit exceeded", started)
        return JobState(_S.WALL_TIME_EXCEEDED, "time limit exceeded", started)
    if failed == _KILLED_AFTER_START and (cancelled or exit_status in (137, 143)):
        return JobState(_S.CANCELLED, "deleted while running", started)
    return JobState(_S.ERROR, f"Grid Engine could not run the job: {failure.strip()} "
                              f"(failed {failed})")


def seconds(duration):
    """Seconds in an SGE time value: "90", "0:1:30" or "00:01:30"."""
    total = 0.0
    for part in duration.split(":"):
        total = total * 60 + float(part or 0)
    return total


def parse_qacct(output):
    """qacct -j's records, as dicts of their ``key value`` lines."""
    records = []
    for block in re.split(r"^=+$", output, flags=re.MULTILINE):
        record = dict(line.split(None, 1) for line in block.strip().splitlines()
                      if len(line.split(None, 1)) == 2)
        if "jobnumber" in record:
            records.append({k: v.strip() for k, v in record.items()})
    return records


class SGE(BatchScheduler):
    """Jobs submitted with qsub, polled with qstat and qacct."""

    # qstat is cheap; qacct (a file scan) runs only for jobs that vanished.
    poll_fast_seconds = 2.0
    poll_slow_seconds = 30.0
    submit_program = ("qsub", "-terse")
    transient_errors = re.compile(
        r"unable to contact qmaster|commlib error|unable to send message|"
        r"can't connect|qmaster is not alive|Only \d+ jobs are allowed", re.IGNORECASE)
    #: The parallel environment for jobs of more than one slot (tasks x
    #: cpus_per_task), e.g. "smp"; None refuses them (sites name their own).
    parallel_environment = None
    #: The resource a memory request sets; Grid Engine counts it per slot.
    memory_resource = "h_vmem"

    # -- submission -----------------------------------------------------------

    def submit_arguments(self, spec):
        if spec.nodes and spec.nodes > 1:
            raise InvalidParameters(
                "'nodes' cannot be honoured by Grid Engine, whose parallel environment "
                "places a job's slots: request 'tasks' instead")
        slots = (spec.tasks or 1) * (spec.cpus_per_task or 1)
        suffix = "-$TASK_ID" if spec.array else ""
        args = ["-N", self.scheduler_job_name(spec), "-wd", self.get_working_directory(),
                # Relative to -wd; $TASK_ID is Grid Engine's, not a shell's.
                "-o", f"{self.output_name}{suffix}.out", "-e", f"{self.output_name}{suffix}.err",
                # Otherwise the queue's shell (often csh) runs the script.
                "-S", "/bin/bash"]
        if slots > 1:
            if not self.parallel_environment:
                raise InvalidParameters(
                    f"'tasks' x 'cpus_per_task' = {slots} slots needs a parallel environment, "
                    "and none is configured: the site sets SGE.parallel_environment")
            args += ["-pe", self.parallel_environment, str(slots)]
        if spec.walltime_seconds:
            args += ["-l", f"h_rt={spec.walltime_seconds}"]
        if spec.memory_mb:
            args += ["-l", f"{self.memory_resource}={math.ceil(spec.memory_mb / slots)}M"]
        if spec.queue:
            args += ["-q", spec.queue]
        if spec.account:
            args += ["-A", spec.account]
        if spec.array:
            args += sge_array_arguments(spec.array)
        return args

    def parse_submitted(self, output):
        return output.strip().splitlines()[-1]

    def cancel(self):
        self.mark_cancelled()
        result = self.run(["qdel", job_number(self.job_id)])
        if result.returncode != 0 and "does not exist" not in error_text(result):
            raise SchedulerError(f"qdel failed: {error_text(result)}")

    # -- queries --------------------------------------------------------------

    @classmethod
    def qstat(cls):
        """``{job number: (name, [(task or None, JobState), ...])}`` for the user's jobs."""
        user = pwd.getpwuid(os.geteuid()).pw_name
        try:
            root = ElementTree.fromstring(cls.call(["qstat", "-xml", "-u", user]))
        except ElementTree.ParseError as e:
            raise SchedulerError(f"qstat -xml printed XML that does not parse: {e}") from None
        jobs = {}
        for entry in root.iter("job_list"):
            state = sge_live_state(entry.findtext("state", ""))
            tasks = entry.findtext("tasks")
            elements = ([(None, state)] if not tasks else
                        [(i, state) for i in array_indices(parse_array(tasks)[0])])
            name = entry.findtext("JB_name", "")
            jobs.setdefault(entry.findtext("JB_job_number"), (name, []))[1].extend(elements)
        return jobs

    @classmethod
    def qacct(cls, job):
        """qacct's records for a job number or a job name pattern."""
        result = cls.run(["qacct", "-j", job])
        if result.returncode != 0:
            if "not found" in error_text(result):
                return []
            raise SchedulerError(f"qacct failed: {error_text(result)}")
        return parse_qacct(result.stdout)

    # -- batch calls ----------------------------------------------------------

    @classmethod
    def batch_status(cls, settings, jobs):
        live = cls.qstat()
        answer = {}
        for ui_id, job_id in jobs:
            if not job_id:
                continue
            elements = live.get(job_number(job_id), ("", []))[1]
            if elements:
                answer[ui_id] = (elements[0][1] if elements[0][0] is None
                                 else aggregate(elements))
                continue
            # Gone from qstat: one qacct per job (it takes one job number).
            job = cls(settings, ui_id, job_id)
            state = job.accounted_state(cls.qacct(job_number(job_id)))
            if state is not None:
                answer[ui_id] = state
        return answer

    def accounted_state(self, records):
        """This job's end from its qacct records; None while some are missing."""
        cancelled = os.path.exists(self.cancel_marker())
        tasks = {}
        for record in records:
            if tag_of(record.get("jobname", "")) == self.tag:
                task = record.get("taskid", "undefined")
                # The file is in time order: a later record of a task wins.
                tasks[None if task == "undefined" else int(task)] = sge_end_state(
                    record, cancelled)
        expected = task_range(self.job_id)
        if expected is None:
            if None in tasks:
                return tasks[None]
            return JobState(_S.CANCELLED, "deleted before it started") if cancelled else None
        missing = [i for i in expected if i not in tasks]
        if missing:
            if not cancelled:
                return None  # records still on their way to the accounting file
            tasks.update((i, JobState(_S.CANCELLED, "deleted before it started"))
                         for i in missing)
        return aggregate([(i, tasks[i]) for i in expected])

    @classmethod
    def find_submitted(cls, settings, ui_ids):
        tags = cls.tags(settings, ui_ids)
        found = {}
        for number, (name, elements) in cls.qstat().items():
            ui_id = tags.get(tag_of(name))
            if ui_id is not None:
                # An array's id carries its whole task range; qstat only
                # shows the tasks that are left, qstat -j shows them all.
                found[ui_id] = (number if elements[0][0] is None
                                else f"{number}.{cls.submitted_range(number)}")
        for tag, ui_id in tags.items():
            if ui_id in found:
                continue
            # qacct matches the name as a pattern: "hpc-12*" also finds
            # "hpc-12.render" (and "hpc-123", which tag_of() filters out).
            records = [r for r in cls.qacct(f"{tag}*") if tag_of(r.get("jobname", "")) == tag]
            if records:
                number = records[-1]["jobnumber"]
                tasks = [int(r["taskid"]) for r in records
                         if r["jobnumber"] == number and r.get("taskid") != "undefined"]
                found[ui_id] = (number if not tasks else
                                "{}.{}-{}:{}".format(number, *as_single_range(sorted(set(tasks)))))
        return found

    @classmethod
    def submitted_range(cls, number):
        match = re.search(r"^job-array tasks:\s*(\S+)", cls.call(["qstat", "-j", number]),
                          re.MULTILINE)
        if not match:
            raise SchedulerError(f"qstat -j {number} shows no task range for an array job")
        return match[1]


def job_number(job_id):
    """``"123"`` for ``"123"`` or ``"123.1-10:1"``."""
    return str(job_id).split(".", 1)[0]


def task_range(job_id):
    """The task ids in an array job's id (``"123.1-10:2"``), None for a plain job."""
    _, _, tasks = str(job_id).partition(".")
    return array_indices(parse_array(tasks)[0]) if tasks else None


def sge_array_arguments(array):
    """``-t`` (and ``-tc``) for Slurm's array syntax, or InvalidParameters."""
    ranges, limit = parse_array(array)
    indices = array_indices(ranges)
    run = as_single_range(indices)
    if run is None:
        raise InvalidParameters(
            f"'array' {array!r} cannot be expressed for Grid Engine, which takes one range "
            "with a step: use a form like '1-99:2'")
    if run[0] < 1:
        raise InvalidParameters(
            f"'array' {array!r} starts at {run[0]}, but Grid Engine numbers tasks from 1: "
            f"use '{run[0] + 1}-{run[1] + 1}:{run[2]}' and shift the index in the script")
    args = ["-t", "{}-{}:{}".format(*run)]
    return args + ["-tc", str(limit)] if limit else args
