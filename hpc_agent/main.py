"""Assembling a running agent: lock, state, core, connection, reactor."""

import gc
import os
import stat
import sys

from twisted.internet import defer, task
from twisted.logger import (FilteringLogObserver, Logger, LogLevel,
                            LogLevelFilterPredicate, globalLogBeginner, textFileLogObserver)
from twisted.python.logfile import LogFile
from twisted.python.threadpool import ThreadPool

from hpc_agent import __version__, lock, malloc
from hpc_agent.agent import AgentCore
from hpc_agent.connection import Link
from hpc_agent.state import AgentState, ThreadWriter
from hpc_agent.transfer import send_file
from hpc_agent.upload import receive_file

log = Logger()


def nvx_active():
    """Whether Autobahn's C helpers for masking and UTF-8 are in use.

    Without them client-to-server throughput drops to about 10 MB/s.
    """
    try:
        from autobahn import nvx  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("AUTOBAHN_USE_NVX", "1") not in ("0", "false")


def log_file(directory):
    """``agent.log`` in ``directory``, rotated at 10 MB with five old files
    kept (agent.log.1 ... .5): agents run for months."""
    return LogFile("agent.log", directory, rotateLength=10_000_000, maxRotatedFiles=5)


def _start_logging(settings):
    observer = textFileLogObserver(log_file(settings.HPC_LOG_DIRECTORY))
    level = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(observer, [level])],
                                     redirectStandardIO=False)


def _private(path, mode=None):
    """Take group and other access away from ``path`` (or set ``mode``);
    never through a symlink."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        return
    wanted = stat.S_IMODE(st.st_mode) & 0o700 if mode is None else mode
    if stat.S_IMODE(st.st_mode) != wanted:
        os.chmod(path, wanted)


def tighten_permissions(settings):
    """The agent's own files are its user's only: its state (job parameters,
    environments), its settings and its logs, whatever the umask was when
    they were made.  The directory itself gets HPC_AGENT_DIRECTORY_MODE."""
    if settings.HPC_AGENT_DIRECTORY_MODE is not None:
        _private(settings.BASE_DIR, settings.HPC_AGENT_DIRECTORY_MODE)
    for suffix in ("", "-wal", "-shm", "-journal"):
        _private(settings.HPC_STATE_FILE + suffix)
    for name in ("settings.py", "agent.lock"):
        _private(os.path.join(settings.BASE_DIR, name))
    _private(settings.HPC_LOG_DIRECTORY)
    try:
        names = os.listdir(settings.HPC_LOG_DIRECTORY)
    except OSError:
        names = []
    for name in names:
        _private(os.path.join(settings.HPC_LOG_DIRECTORY, name))


def run(settings, url, token, ready):
    """Run the agent until it is told to stop or gives up; returns an exit code.

    ``ready(pid)`` is called once the agent holds the directory's lock and
    its state is open: from then on the launch has succeeded.
    """
    malloc.keep_freed_memory()
    # Whatever the agent creates is its user's only.
    os.umask(0o077)
    lock_fd = lock.take_over(os.path.join(settings.BASE_DIR, "agent.lock"),
                             log=lambda m: print(m, file=sys.stderr))

    from twisted.internet import reactor

    writer = ThreadWriter(reactor)
    state = AgentState(settings.HPC_STATE_FILE, writer=writer)
    tighten_permissions(settings)
    _start_logging(settings)

    nvx = nvx_active()
    log.info("hpc-agent {version} pid {pid} in {dir}; scheduler {scheduler}; "
             "autobahn NVX {nvx}", version=__version__, pid=os.getpid(),
             dir=settings.BASE_DIR, scheduler=settings.HPC_SCHEDULER_CLASS,
             nvx="active" if nvx else "NOT active (slow transfers)")
    if state.journal != "WAL":
        log.info("the state file {path} is on a network file system: a rollback journal "
                 "instead of WAL (HPC_STATE_FILE on a local disk is faster)",
                 path=settings.HPC_STATE_FILE)
    pool = ThreadPool(minthreads=1, maxthreads=4, name="hpc-agent-scheduler")
    # File work has threads of its own: a hung file system must not stop
    # submits, polls and cancels.
    file_pool = ThreadPool(minthreads=1, maxthreads=4, name="hpc-agent-files")

    def start_transfer(file_token, source):
        return send_file(reactor, url, file_token, source, settings.HPC_FILE_CHUNK_SIZE,
                         settings.HPC_TLS_CA_FILE)

    def start_upload(file_token, sink):
        return receive_file(reactor, url, file_token, sink, settings.HPC_TLS_CA_FILE)

    core = AgentCore(settings, state, reactor, pool, start_transfer, nvx=nvx,
                     file_pool=file_pool, start_upload=start_upload)
    outcome = {"code": 0, "stopping": False}

    def give_up(why):
        outcome["code"] = 3
        if reactor.running and not outcome["stopping"]:
            reactor.stop()

    link = Link(reactor, core, url, token, settings.HPC_RECONNECT_SECONDS,
                settings.HPC_TLS_CA_FILE, give_up, ping_seconds=settings.HPC_PING_SECONDS,
                handshake_timeout=settings.HPC_HANDSHAKE_TIMEOUT_SECONDS)

    # Once a day, forget jobs deleted more than a week ago.
    pruning = task.LoopingCall(state.prune)
    pruning.clock = reactor

    def start():
        # The collector was off while the agent started (hpc_agent.__main__).
        # What exists by now lives as long as the agent: frozen, later
        # collections leave it out.  (The imports' little garbage, some 2,000
        # objects, stays too: finding it would cost as much as was saved.)
        gc.freeze()
        gc.enable()
        writer.start()
        pool.start()
        file_pool.start()
        ready(os.getpid())
        link.start()
        core.reconcile().addErrback(lambda f: log.failure("reconciling failed", f))
        core.poller.start()
        pruning.start(86400, now=True).addErrback(
            lambda f: log.failure("pruning the agent's state failed", f))

    @defer.inlineCallbacks
    def stop():
        outcome["stopping"] = True
        if pruning.running:
            pruning.stop()
        core.poller.stop()
        yield link.stop()
        # What was recorded is on disk before the agent exits.
        yield state.when_durable()
        pool.stop()
        if core.files.stuck == 0:
            # (A thread stuck on a hung file system would never join.)
            file_pool.stop()
        writer.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()
    state.close()
    os.close(lock_fd)
    log.info("hpc-agent pid {pid} stopped", pid=os.getpid())
    return outcome["code"]
