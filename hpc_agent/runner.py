"""Runs one local job, independently of the agent.

``python -m hpc_agent.runner CONTROL_DIR`` is what the Local scheduler
starts.  It lives in a session of its own, so the agent can die, restart and
hand over while jobs keep running; it runs the job's script in a process
group of its own, enforces the walltime, forwards a cancel (SIGTERM to the
runner) to the job's whole process group, and writes the outcome to
``CONTROL_DIR/result.json`` atomically.  The agent reads that file; it never
has to be the job's parent.

Files in CONTROL_DIR: ``spec.json`` (input: script, walltime_seconds,
environment, memory_mb), ``runner.json`` (pid and start time of this runner,
pgid of the job), ``result.json`` (output).
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time

#: Seconds between SIGTERM and SIGKILL when a job is stopped.
GRACE_SECONDS = 10


def process_start_time(pid):
    """The kernel's start time of ``pid`` (clock ticks since boot), or None.

    Together with the pid it identifies a process across pid reuse.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses.
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def write_json(path, data):
    """Write ``data`` to ``path`` so a reader sees all of it or nothing."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Runner:
    def __init__(self, control_dir):
        self.control_dir = control_dir
        with open(os.path.join(control_dir, "spec.json")) as f:
            self.spec = json.load(f)
        self.workdir = os.path.dirname(control_dir)
        self.child = None
        self.stop_reason = None

    def _limit_memory(self):
        # Runs in the child before exec: an address-space cap is the only
        # per-job memory limit a plain process has without cgroups.
        limit = self.spec["memory_mb"] * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def run(self):
        # Before the job starts, so a cancel can never find the runner
        # unprepared (exec resets the handlers in the child).
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        env = dict(os.environ, **(self.spec.get("environment") or {}),
                   HPC_JOB_WORKING_DIRECTORY=self.workdir)
        with open(os.path.join(self.workdir, "hpc-job.out"), "ab") as out, \
                open(os.path.join(self.workdir, "hpc-job.err"), "ab") as err:
            self.child = subprocess.Popen(
                ["/bin/bash", os.path.join(self.control_dir, "job.sh")],
                cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                process_group=0,
                preexec_fn=self._limit_memory if self.spec.get("memory_mb") else None)
        started = time.time()
        write_json(os.path.join(self.control_dir, "runner.json"), {
            "pid": os.getpid(), "start": process_start_time(os.getpid()),
            "pgid": self.child.pid, "started": started})

        walltime = self.spec.get("walltime_seconds")
        deadline = started + walltime if walltime else None
        kill_at = None
        while True:
            # Short waits: the signal handler only sets a flag, and the loop
            # acts on it, so no work happens inside a handler.
            try:
                code = self.child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.time()
            if self.stop_reason is None and deadline is not None and now >= deadline:
                self.stop_reason = "walltime"
            if self.stop_reason is not None and kill_at is None:
                self._killpg(signal.SIGTERM)
                kill_at = now + GRACE_SECONDS
            elif kill_at is not None and now >= kill_at:
                self._killpg(signal.SIGKILL)
        # Leave nothing of the job behind, as a batch scheduler would.
        self._killpg(signal.SIGKILL)
        result = {
            "exit_code": code if code >= 0 else None,
            "signal": -code if code < 0 else None,
            "stopped": self.stop_reason,
            "started": started,
            "finished": time.time(),
        }
        write_json(os.path.join(self.control_dir, "result.json"), result)

    def _on_signal(self, signum, frame):
        if self.stop_reason is None:
            self.stop_reason = "cancelled"

    def _killpg(self, sig):
        try:
            os.killpg(self.child.pid, sig)
        except ProcessLookupError:
            pass


def main(argv):
    if len(argv) != 2:
        sys.exit("usage: python -m hpc_agent.runner CONTROL_DIR")
    if os.getpid() != os.getsid(0):
        os.setsid()
    Runner(argv[1]).run()


if __name__ == "__main__":
    main(sys.argv)
