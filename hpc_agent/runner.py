"""Runs one local job, independently of the agent: a small bash program.

The Local scheduler starts :data:`RUNNER` with bash, in a session of its own,
so the agent can die, restart and hand over while jobs keep running.  Bash
starts in about a millisecond where a Python runner took tens, and holds a
fraction of the memory while its job runs.  The runner

* waits for the word ``go`` on its standard input.  The agent knows the
  runner's pid as soon as it has started it; it records the pid (with the
  process's start time, which tells it from a later process with the same
  pid) in ``runner.json`` and only then says go.  A runner that reads
  anything else (the agent died first) exits without running the job, so a
  job runs only if its record exists and cannot run twice (when the record
  was written, the runner leaves a result that says the job never ran);
* runs the job in a process group of its own, in the working directory, with
  its output appended to the given files and, if asked, an address-space
  limit (``ulimit -v``, the only per-job memory limit a plain process has
  without cgroups);
* enforces the walltime, and forwards a cancel (SIGTERM to the runner) to the
  job's whole process group: SIGTERM, then SIGKILL after
  :data:`GRACE_SECONDS`;
* records the job's process group in ``pgid`` (so a cancel can stop the job
  even if the runner was killed) and its outcome in ``result.json``, written
  last: ``{"exit_code", "signal", "stopped": null|"cancelled"|"walltime"|"not
  started", "started", "finished"}``.  As a shell reports it, a job whose exit status is
  128+N is recorded as killed by signal N.  A reader trusts result.json only
  once the runner has exited.

A runner from an agent older than this (``python -m hpc_agent.runner``) kept
``pgid`` and ``started`` in runner.json instead; both layouts are read.
"""

import json
import os
import shutil
import subprocess

#: Seconds between SIGTERM and SIGKILL when a job is stopped.
GRACE_SECONDS = 10

#: The runner.  Arguments: control directory, working directory, walltime in
#: seconds (0: none), memory limit in KiB (0: none), stdout file, stderr file,
#: the sleep program, the grace seconds, then the job's command.  Its own
#: variables start with _hpc_ (they are not exported, so the job never sees
#: them), and it runs no program but sleep and the job: the job's environment
#: (PATH included) is the runner's.
RUNNER = r'''
# _hpc_later SECONDS COMMAND...: COMMAND after SECONDS, unless the runner
# died meanwhile (its pid may be another process's by then).
_hpc_later() {
    "$_hpc_sleep" "$1"
    read -r _hpc_s < "/proc/$BASHPID/stat" || return
    _hpc_s=${_hpc_s##*) }
    _hpc_s=${_hpc_s#* }
    [ "${_hpc_s%% *}" = "$_hpc_me" ] || return
    shift
    "$@"
}

_hpc_now() {
    _hpc_t=${EPOCHREALTIME/,/.}
    [ -n "$_hpc_t" ] || _hpc_t=null
}

# _hpc_timer SECONDS COMMAND...: _hpc_later in the background, in a process
# group of its own (so that killing the group stops its sleep too); its pid
# in _hpc_timer.  Job control (set -m) is on only while a group is made: with
# it, wait would also return when the job is stopped (SIGSTOP), not only
# when it ends.
_hpc_timer() {
    set -m
    _hpc_later "$@" &
    _hpc_timer=$!
    set +m
}

# Stop the job: SIGTERM to its group now, SIGKILL after the grace period.
_hpc_stop_job() {
    [ -n "$_hpc_pg" ] && [ -n "$_hpc_stop" ] && [ -z "$_hpc_grace" ] || return 0
    kill -TERM -- "-$_hpc_pg" 2>/dev/null
    kill -CONT -- "-$_hpc_pg" 2>/dev/null  # a stopped job acts on it now
    _hpc_timer "$_hpc_grace_seconds" kill -KILL -- "-$_hpc_pg"
    _hpc_grace=$_hpc_timer
}

# _hpc_result EXIT_CODE SIGNAL STOPPED STARTED: the job's outcome, as JSON.
_hpc_result() {
    _hpc_now
    printf '{"exit_code": %s, "signal": %s, "stopped": %s, "started": %s, "finished": %s}\n' \
        "$1" "$2" "$3" "$4" "$_hpc_t" >"$_hpc_c/result.json"
}

# A trapped signal also ends the wait below early: _hpc_woke says so.
_hpc_on_signal() {
    _hpc_woke=1
    [ -n "$_hpc_stop" ] || _hpc_stop=$1
    _hpc_stop_job
}

_hpc_c=$1 _hpc_w=$2 _hpc_wall=$3 _hpc_mem=$4 _hpc_out=$5 _hpc_err=$6
_hpc_sleep=$7 _hpc_grace_seconds=$8
shift 8
_hpc_me=$BASHPID _hpc_stop= _hpc_pg= _hpc_watch= _hpc_grace= _hpc_woke= _hpc_rc=
_hpc_started=null
trap '_hpc_on_signal cancelled' TERM INT HUP
trap '_hpc_on_signal walltime' USR1
IFS= read -r _hpc_go || _hpc_go=
exec </dev/null
if [ "$_hpc_go" != go ]; then
    # The agent stopped before saying go.  If it had recorded this runner,
    # say that the job never ran; if not, leave no trace (it submits again).
    [ -e "$_hpc_c/runner.json" ] || exit 0
    _hpc_result null null '"not started"' null
    exit 0
fi

if [ -z "$_hpc_stop" ]; then
    _hpc_now
    _hpc_started=$_hpc_t
    set -m  # the job's own process group
    (
        cd -- "$_hpc_w" || exit 1
        if [ "$_hpc_mem" != 0 ]; then ulimit -v "$_hpc_mem" || exit 1; fi
        exec "$@"
    ) >>"$_hpc_out" 2>>"$_hpc_err" &
    _hpc_pg=$!
    set +m
    printf '%s\n' "$_hpc_pg" >"$_hpc_c/pgid"
    if [ "$_hpc_wall" != 0 ]; then
        _hpc_timer "$_hpc_wall" kill -USR1 "$_hpc_me"
        _hpc_watch=$_hpc_timer
    fi
    _hpc_stop_job  # a cancel that came while the job was starting
    # wait returns early when a trapped signal comes: wait again until it
    # returns the job's own status (bash keeps it for a second wait).
    while :; do
        _hpc_woke=
        wait "$_hpc_pg"
        _hpc_rc=$?
        [ -n "$_hpc_woke" ] || break
    done
    [ -z "$_hpc_watch" ] || kill -- "-$_hpc_watch" 2>/dev/null
    [ -z "$_hpc_grace" ] || kill -- "-$_hpc_grace" 2>/dev/null
    # Leave nothing of the job behind, as a batch scheduler would.
    kill -KILL -- "-$_hpc_pg" 2>/dev/null
fi

_hpc_code=null _hpc_signal=null
if [ -z "$_hpc_rc" ]; then
    :
elif [ "$_hpc_rc" -gt 128 ] && [ "$_hpc_rc" -le 192 ]; then
    _hpc_signal=$((_hpc_rc - 128))
else
    _hpc_code=$_hpc_rc
fi
_hpc_stopped=null
[ -z "$_hpc_stop" ] || _hpc_stopped="\"$_hpc_stop\""
_hpc_result "$_hpc_code" "$_hpc_signal" "$_hpc_stopped" "$_hpc_started"
'''

_SLEEP = shutil.which("sleep") or "/bin/sleep"


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


def write_json(path, data, durable=True):
    """Write ``data`` to ``path`` so a reader sees all of it or nothing;
    ``durable``: on disk before returning (fsync)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


class RunnerFailed(OSError):
    """The runner could not be started or told to go."""


def start(control_dir, workdir, command, environment, output, walltime_seconds=None,
          memory_mb=None):
    """Start a runner for ``command``; return ``(pid, process)`` once it is
    recorded in ``control_dir/runner.json`` and told to go.

    ``environment`` is the job's whole environment, ``output`` the paths of
    its stdout and stderr files.  ``process`` is the runner's Popen: the
    runner is this process's child until this process ends, and whoever
    keeps the Popen should poll it now and then to reap it.
    """
    argv = ["hpc-runner", "--posix", "-c", RUNNER, "hpc-runner", control_dir, workdir,
            str(walltime_seconds or 0), str((memory_mb or 0) * 1024), *output, _SLEEP,
            str(GRACE_SECONDS), *command]
    # --posix: bash reads no BASH_ENV (the job's own bash still does); its
    # name in ps is hpc-runner.  The runner prints nothing of its own: what
    # goes wrong in starting the job goes to the job's stderr file.
    process = subprocess.Popen(
        argv, executable="/bin/bash", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env=environment, cwd=control_dir, start_new_session=True,
        close_fds=True)
    record = os.path.join(control_dir, "runner.json")
    try:
        start_time = process_start_time(process.pid)
        if start_time is None:
            raise RunnerFailed("the job runner exited as soon as it started")
        # Written in place, not fsynced (creating files is the slow part of
        # a submission): the runner reads "go" only once the record is
        # whole, and a crash of the machine ends the job too.
        with open(record, "x") as f:
            json.dump({"pid": process.pid, "start": start_time}, f)
        try:
            process.stdin.write(b"go\n")
            process.stdin.close()
        except OSError as e:
            os.unlink(record)
            raise RunnerFailed(f"the job runner did not take its start signal ({e})") from None
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process.pid, process
