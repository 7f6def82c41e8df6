"""Assembling a running agent: lock, state, core, connection, reactor."""

import os
import sys

from twisted.internet import task
from twisted.logger import (FilteringLogObserver, Logger, LogLevel,
                            LogLevelFilterPredicate, globalLogBeginner, textFileLogObserver)
from twisted.python.logfile import LogFile
from twisted.python.threadpool import ThreadPool

from hpc_agent import __version__, lock
from hpc_agent.agent import AgentCore
from hpc_agent.connection import Link
from hpc_agent.state import AgentState
from hpc_agent.transfer import send_file

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


def run(settings, url, token, ready):
    """Run the agent until it is told to stop or gives up; returns an exit code.

    ``ready(pid)`` is called once the agent holds the directory's lock and
    its state is open: from then on the launch has succeeded.
    """
    lock_fd = lock.take_over(os.path.join(settings.BASE_DIR, "agent.lock"),
                             log=lambda m: print(m, file=sys.stderr))
    state = AgentState(settings.HPC_STATE_FILE)
    _start_logging(settings)

    from twisted.internet import reactor

    nvx = nvx_active()
    log.info("hpc-agent {version} pid {pid} in {dir}; scheduler {scheduler}; "
             "autobahn NVX {nvx}", version=__version__, pid=os.getpid(),
             dir=settings.BASE_DIR, scheduler=settings.HPC_SCHEDULER_CLASS,
             nvx="active" if nvx else "NOT active (slow transfers)")
    pool = ThreadPool(minthreads=1, maxthreads=4, name="hpc-agent-scheduler")

    def start_transfer(file_token, handle, name, size):
        return send_file(reactor, url, file_token, handle, name, size,
                         settings.HPC_FILE_CHUNK_SIZE, settings.HPC_TLS_CA_FILE)

    core = AgentCore(settings, state, reactor, pool, start_transfer, nvx=nvx)
    outcome = {"code": 0}

    def give_up(why):
        outcome["code"] = 3
        if reactor.running:
            reactor.stop()

    link = Link(reactor, core, url, token, settings.HPC_RECONNECT_SECONDS,
                settings.HPC_TLS_CA_FILE, give_up, ping_seconds=settings.HPC_PING_SECONDS)

    # Once a day, forget jobs deleted more than a week ago.
    pruning = task.LoopingCall(state.prune)
    pruning.clock = reactor

    def start():
        pool.start()
        ready(os.getpid())
        link.start()
        core.reconcile().addErrback(lambda f: log.failure("reconciling failed", f))
        core.poller.start()
        pruning.start(86400, now=True)

    def stop():
        pruning.stop()
        core.poller.stop()
        pool.stop()
        return link.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()
    state.close()
    os.close(lock_fd)
    log.info("hpc-agent pid {pid} stopped", pid=os.getpid())
    return outcome["code"]
