"""Jobs as plain processes on the agent's own host.

Each job gets a runner (:mod:`hpc_agent.runner`) in a session of its own;
the runner reports through files in ``<working directory>/.hpc/``, so jobs
survive an agent restart and the agent needs no child-process bookkeeping.
Status checks only read a few small files, so the agent can poll often and a
finished job shows within a fraction of a second.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

from hpc_agent import runner
from hpc_agent.schedulers.base import InvalidParameters, JobSpec, JobState, Scheduler
from hpc_agent.status import JobStatus

CONTROL_DIR = ".hpc"


class Local(Scheduler):
    """Runs each job's script with bash on this host."""

    poll_fast_seconds = 0.25
    poll_slow_seconds = 5.0
    # A poll reads files; it runs no scheduler command worth rationing.
    rate_limited = False

    def control_dir(self):
        return os.path.join(self.get_working_directory(), CONTROL_DIR)

    def _read(self, name):
        try:
            with open(os.path.join(self.control_dir(), name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def build_script(self, spec):
        """The bash script for a validated :class:`JobSpec` (a hook for sites)."""
        return spec.script

    def submit(self, parameters):
        spec = JobSpec.from_parameters(parameters)
        unsupported = [f for f in ("nodes", "queue", "account", "array")
                       if getattr(spec, f) is not None]
        if spec.nodes == 1:
            unsupported.remove("nodes")
        if unsupported:
            raise InvalidParameters(
                f"the local scheduler cannot honour {', '.join(map(repr, unsupported))}: "
                "it runs one process on the agent's host")
        control = self.control_dir()
        os.makedirs(control, exist_ok=True)
        with open(os.path.join(control, "job.sh"), "w") as f:
            f.write(self.build_script(spec))
        runner.write_json(os.path.join(control, "spec.json"), {
            "walltime_seconds": spec.walltime_seconds,
            "memory_mb": spec.memory_mb,
            "environment": spec.environment,
        })
        with open(os.path.join(control, "runner.log"), "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "hpc_agent.runner", control],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True, close_fds=True)
        # The runner is not ours to wait for (it outlives the agent), but a
        # thread reaps it so it leaves no zombie while the agent lives.
        threading.Thread(target=process.wait, name="hpc-runner-reaper", daemon=True).start()
        deadline = time.monotonic() + 10
        while (info := self._read("runner.json")) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise InvalidParameters(
                    f"the job runner did not start: see {control}/runner.log")
            time.sleep(0.01)
        return str(info["pid"])

    def status(self):
        result = self._read("result.json")
        if result is not None:
            return _state_of(result)
        info = self._read("runner.json")
        if info is None:
            return JobState(JobStatus.ERROR, "the job never started (no runner record)")
        if runner.process_start_time(info["pid"]) == info["start"]:
            return JobState(JobStatus.RUNNING)
        # The runner may have finished between the two reads.
        result = self._read("result.json")
        if result is not None:
            return _state_of(result)
        return JobState(JobStatus.ERROR, "the job's runner process vanished (killed?)")

    def cancel(self):
        info = self._read("runner.json")
        if info is None or self._read("result.json") is not None:
            return
        if runner.process_start_time(info["pid"]) == info["start"]:
            os.kill(info["pid"], signal.SIGTERM)
        else:
            # The runner is gone; stop whatever is left of the job itself.
            try:
                os.killpg(info["pgid"], signal.SIGKILL)
            except ProcessLookupError:
                pass

    @classmethod
    def find_submitted(cls, settings, ui_ids):
        found = {}
        for ui_id in ui_ids:
            info = cls(settings, ui_id)._read("runner.json")
            if info is not None:
                found[ui_id] = str(info["pid"])
        return found


def _state_of(result):
    started = result["started"]
    if result["stopped"] == "cancelled":
        return JobState(JobStatus.CANCELLED, started=started)
    if result["stopped"] == "walltime":
        return JobState(JobStatus.WALL_TIME_EXCEEDED, "the job exceeded its walltime",
                        started=started)
    if result["exit_code"] == 0:
        return JobState(JobStatus.COMPLETED, started=started)
    if result["signal"] is not None:
        name = signal.Signals(result["signal"]).name
        return JobState(JobStatus.ERROR, f"killed by signal {result['signal']} ({name})",
                        started=started)
    return JobState(JobStatus.ERROR, f"exit code {result['exit_code']}", started=started)
