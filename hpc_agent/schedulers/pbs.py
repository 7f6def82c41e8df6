"""PBS Professional / OpenPBS (:class:`PBS`) and Torque (:class:`Torque`).

No PBS server can run on the machines this project is tested on: this module
is tested against outputs written from the vendors' documented formats
(tests/data/schedulers/pbs), never against a real server.  What it relies on:

* ``qsub`` prints the job id, ``1234.server`` (an array: ``1234[].server``).
* ``qstat -f -F json`` (PBS Pro 19 and later) prints ``{"Jobs": {id: {...}}}``;
  older PBS Pro and Torque print the ``qstat -f`` text format, ``Job Id: ...``
  then indented ``key = value`` lines whose long values continue on lines
  starting with a tab.  Some PBS Pro versions print JSON that does not parse
  (unescaped quotes in Variable_List): the text format is asked for then.
* Finished jobs: PBS Pro keeps them for ``qstat -x`` only when the server has
  ``job_history_enable = True`` (off by default); Torque keeps them in state C
  for ``keep_completed`` seconds and has no ``-x`` (there it means XML).  A job
  gone beyond that is left undecided: configure the server.
* Exit_status: 0-127 the script's exit; 128 and up a signal; negative values
  PBS's own (PBS Pro -29 walltime, -27/-26 memory; Torque -11, -10); a job
  deleted before it ran has none.  A job PBS deletes leaves no trace either
  way, so cancel() leaves a marker in the job's directory.
"""

import json
import os
import pwd
import re

from hpc_agent.schedulers.base import InvalidParameters, JobState, SchedulerError
from hpc_agent.schedulers.batch import (
    BatchScheduler, aggregate, array_indices, as_single_range, compact, error_text,
    exit_detail, parse_array, parse_time, tag_of)
from hpc_agent.status import JobStatus

_S = JobStatus

_LIVE_STATES = {
    "Q": (_S.QUEUED, ""), "T": (_S.QUEUED, "in transit"), "M": (_S.QUEUED, "moved"),
    "H": (_S.QUEUED, "held"), "W": (_S.QUEUED, "waiting for its start time"),
    "R": (_S.RUNNING, ""), "B": (_S.RUNNING, ""), "E": (_S.RUNNING, "exiting"),
    "S": (_S.RUNNING, "suspended"), "U": (_S.RUNNING, "suspended"),
}
#: Finished (PBS Pro), expired subjob (PBS Pro), completed (Torque).
_ENDED = {"F", "X", "C"}
#: Errors of qstat about one of the ids it was given, not about the server.
_UNKNOWN_JOB = re.compile(r"Unknown Job Id|has finished|Job has been deleted", re.IGNORECASE)
#: ``1234[5].server`` -> ("1234", "5"); ``1234[].server`` -> ("1234", "").
_SUBJOB = re.compile(r"(\d+)\[(\d*)\](.*)")


def parse_text(output):
    """``qstat -f`` text -> ``{job id: {attribute (lower case): value}}``."""
    jobs, attributes, key = {}, None, None
    for line in output.splitlines():
        if line.startswith("Job Id:"):
            attributes = jobs.setdefault(line.split(":", 1)[1].strip(), {})
        elif line.startswith("\t") and attributes is not None and key:
            attributes[key] += line.strip()  # a long value, continued
        elif " = " in line and attributes is not None:
            key, _, value = line.strip().partition(" = ")
            key = key.lower()
            attributes[key] = value
    return jobs


class PBS(BatchScheduler):
    """PBS Professional and OpenPBS."""

    # A PBS server answers one request per job id a qstat names, and sites
    # throttle qstat: poll more gently than Slurm's single RPC.
    poll_fast_seconds = 5.0
    poll_slow_seconds = 60.0
    submit_program = ("qsub",)
    # PBS_QSTAT_NO_COMPLETE hides finished jobs from Torque's qstat.
    ignored_environment = ("PBS_QSTAT_",)
    transient_errors = re.compile(
        r"cannot connect|Connection refused|timed out|communication failure|"
        r"Server .*down|would exceed .*limit", re.IGNORECASE)
    #: qstat options that add finished jobs (PBS Pro's history).
    history_options = ("-x",)
    #: Whether ``qstat -F json`` is tried; cleared once qstat refuses it.
    json_output = True
    #: Added to an array job's output names: each element's own file.
    array_output_suffix = "-^array_index^"
    #: Negative Exit_status values that mean a limit was exceeded.
    limit_exit_statuses = {
        -29: (_S.WALL_TIME_EXCEEDED, "walltime exceeded"),
        -28: (_S.WALL_TIME_EXCEEDED, "CPU time exceeded"),
        -27: (_S.OUT_OF_MEMORY, "memory limit exceeded"),
        -26: (_S.OUT_OF_MEMORY, "virtual memory limit exceeded"),
    }

    # -- submission -----------------------------------------------------------

    def submit_arguments(self, spec):
        suffix = self.array_output_suffix if spec.array else ""
        directory = self.get_working_directory()
        if ":" in directory:
            raise InvalidParameters(
                f"the job directory {directory!r} holds ':', which PBS reads as host:path")
        # PBS starts jobs in $HOME and has no working-directory option on
        # PBS Pro: the script cds, and the output paths are absolute.
        args = ["-N", self.scheduler_job_name(spec), "-S", "/bin/bash",
                "-o", os.path.join(directory, f"{self.output_name}{suffix}.out"),
                "-e", os.path.join(directory, f"{self.output_name}{suffix}.err")]
        args += self.resource_arguments(spec)
        if spec.walltime_seconds:
            minutes, secs = divmod(spec.walltime_seconds, 60)
            args += ["-l", f"walltime={minutes // 60:02d}:{minutes % 60:02d}:{secs:02d}"]
        if spec.queue:
            args += ["-q", spec.queue]
        if spec.account:
            args += ["-A", spec.account]
        if spec.array:
            args += self.array_arguments(spec.array)
        return args

    def per_node(self, spec):
        """``(nodes, tasks per node, cpus per node)``; tasks must fill nodes evenly."""
        nodes, tasks = spec.nodes or 1, spec.tasks or spec.nodes or 1
        if tasks % nodes:
            raise InvalidParameters(
                f"'tasks' ({tasks}) must be a multiple of 'nodes' ({nodes}) on PBS, "
                "which gives every node the same share")
        return nodes, tasks // nodes, tasks // nodes * (spec.cpus_per_task or 1)

    def resource_arguments(self, spec):
        """``-l select=...`` chunks, one per node; memory is per node, as in Slurm."""
        if not (spec.nodes or spec.tasks or spec.cpus_per_task or spec.memory_mb):
            return []
        nodes, tasks, cpus = self.per_node(spec)
        chunk = f"select={nodes}:ncpus={cpus}:mpiprocs={tasks}"
        if spec.memory_mb:
            chunk += f":mem={spec.memory_mb}mb"
        return ["-l", chunk] + (["-l", "place=scatter"] if nodes > 1 else [])

    def array_arguments(self, array):
        ranges, limit = parse_array(array)
        run = as_single_range(array_indices(ranges))
        if run is None:
            raise InvalidParameters(
                f"'array' {array!r} cannot be expressed for PBS, which takes one range "
                "with a step: use a form like '1-99:2'")
        return ["-J", "{}-{}:{}".format(*run) + (f"%{limit}" if limit else "")]

    def parse_submitted(self, output):
        return output.strip().splitlines()[-1]

    def cancel(self):
        self.mark_cancelled()
        result = self.run(["qdel", str(self.job_id)])
        if result.returncode != 0 and not _UNKNOWN_JOB.search(error_text(result)):
            raise SchedulerError(f"qdel failed: {error_text(result)}")

    # -- queries --------------------------------------------------------------

    @classmethod
    def qstat(cls, job_ids):
        """``{job id: attributes}`` for these jobs and their subjobs, in one qstat."""
        if not job_ids:
            return {}
        base = ["qstat", "-f", *cls.history_options, "-t"]
        if cls.json_output:
            result = cls.run([*base, "-F", "json", *job_ids])
            if re.search(r"invalid option|usage", result.stderr, re.IGNORECASE):
                cls.json_output = False  # older than PBS Pro 19, or Torque
            else:
                check(result)
                try:
                    jobs = json.loads(result.stdout or "{}").get("Jobs", {})
                except ValueError:
                    jobs = None  # ask for the text format, just this time
                if jobs is not None:
                    return {job_id: {k.lower(): v for k, v in attributes.items()}
                            for job_id, attributes in jobs.items()}
        result = cls.run([*base, *job_ids])
        check(result)
        return parse_text(result.stdout)

    def end_state(self, attributes):
        """A finished job's JobState from its qstat attributes."""
        started = parse_time(str(attributes.get("stime", "")), "%a %b %d %H:%M:%S %Y")
        cancelled = os.path.exists(self.cancel_marker())
        status = attributes.get("exit_status")
        if status is None:
            # Finished without an exit status: deleted before it ran.
            return JobState(_S.CANCELLED, "deleted before it started")
        status = int(status)
        if status == 0:
            return JobState(_S.COMPLETED, started=started)
        if status in self.limit_exit_statuses:
            return JobState(*self.limit_exit_statuses[status], started)
        if status >= 128 and status != 254:
            signal = status - 256 if status > 256 else status % 128
            if "walltime" in str(attributes.get("comment", "")).lower():
                return JobState(_S.WALL_TIME_EXCEEDED, "walltime exceeded", started)
            if cancelled:
                return JobState(_S.CANCELLED, "deleted while running", started)
            return JobState(_S.ERROR, exit_detail(status, signal), started)
        if status > 0:
            return JobState(_S.ERROR, exit_detail(status), started)
        return JobState(_S.ERROR, f"PBS could not run the job (Exit_status {status})", started)

    def state_of(self, attributes):
        code = attributes.get("job_state", "")
        if code in _ENDED:
            return self.end_state(attributes)
        if code in _LIVE_STATES:
            return JobState(*_LIVE_STATES[code])
        return None

    # -- batch calls ----------------------------------------------------------

    @classmethod
    def batch_status(cls, settings, jobs):
        jobs = [(ui_id, str(job_id)) for ui_id, job_id in jobs if job_id]
        known = cls.qstat([job_id for _, job_id in jobs])
        subjobs = {}
        for job_id, attributes in known.items():
            match = _SUBJOB.fullmatch(job_id)
            if match and match[2]:
                subjobs.setdefault((match[1], match[3]), []).append((int(match[2]), attributes))
        answer = {}
        for ui_id, job_id in jobs:
            job = cls(settings, ui_id, job_id)
            match = _SUBJOB.fullmatch(job_id)
            elements = [(index, job.state_of(attributes))
                        for index, attributes in subjobs.get((match[1], match[3]), [])
                        ] if match else []
            if elements:
                state = (aggregate(elements)
                         if all(s is not None for _, s in elements) else None)
            else:
                # A plain job, or an array whose subjobs are no longer listed.
                state = job.state_of(known[job_id]) if job_id in known else None
            if state is not None:
                answer[ui_id] = state
        return answer

    @classmethod
    def find_submitted(cls, settings, ui_ids):
        tags = cls.tags(settings, ui_ids)
        user = pwd.getpwuid(os.geteuid()).pw_name
        ids = cls.call(["qselect", *cls.history_options, "-u", user]).split()
        found = {}
        for job_id, attributes in cls.qstat(ids).items():
            ui_id = tags.get(tag_of(str(attributes.get("job_name", ""))))
            match = _SUBJOB.fullmatch(job_id)
            if ui_id is not None and not (match and match[2]):
                found[ui_id] = job_id
        return found


def check(result):
    """Raise for a qstat failure other than an unknown or finished job id."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.returncode != 0 and not (lines and all(map(_UNKNOWN_JOB.search, lines))):
        raise SchedulerError(f"qstat failed: {error_text(result)}")


class Torque(PBS):
    """Torque (and PBS versions that share its syntax).

    Finished jobs stay visible in state C for the server's ``keep_completed``
    seconds only; set it (for example to 600) or their ends are never seen.
    """

    history_options = ()
    json_output = False
    limit_exit_statuses = {
        -11: (_S.WALL_TIME_EXCEEDED, "walltime exceeded"),
        -12: (_S.WALL_TIME_EXCEEDED, "CPU time exceeded"),
        -10: (_S.OUT_OF_MEMORY, "memory limit exceeded"),
    }
    # Torque appends "-<index>" to each element's output path by itself.
    array_output_suffix = ""

    def resource_arguments(self, spec):
        if not (spec.nodes or spec.tasks or spec.cpus_per_task or spec.memory_mb):
            return []
        nodes, _, cpus = self.per_node(spec)
        args = ["-l", f"nodes={nodes}:ppn={cpus}"]
        # Torque's mem is for the whole job.
        return args + (["-l", f"mem={spec.memory_mb * nodes}mb"] if spec.memory_mb else [])

    def array_arguments(self, array):
        # Torque takes a list of ranges, without steps.
        ranges, limit = parse_array(array)
        return ["-t", compact(array_indices(ranges)) + (f"%{limit}" if limit else "")]
