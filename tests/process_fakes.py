"""Local processes without processes, for unit tests of hpcd's local shell.

``ProcessReactor`` is a MemoryReactorClock (``advance()`` runs its timers)
whose ``spawnProcess`` starts nothing: it hands the protocol a ``FakeProcess``
and records it in ``processes``.  The test then plays the process with
``output()``, ``exit()`` and ``killed_by()``, in the order a real one would.
tests/unit/hpcd/test_shells.py checks both against Twisted's interfaces and
against a real /bin/sh, so they cannot drift from what they stand in for.

``run_in_reactor()`` is for the few tests that start a real process.
"""

from twisted.internet import error
from twisted.internet.interfaces import IProcessTransport, IReactorProcess
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IProcessTransport)
class FakeProcess:
    """The transport of a spawned process; records what hpcd did to it."""

    pid = 4242

    def __init__(self, protocol, executable, args, env, path):
        self.protocol = protocol
        self.executable = executable
        self.args = list(args)
        self.env = env
        self.path = path
        self.stdin = b""
        self.stdin_closed = False
        self.signals = []
        self.ended = False

    # IProcessTransport, as hpcd calls it.

    def write(self, data):
        assert not self.stdin_closed, "written to a closed stdin"
        self.stdin += data

    def writeSequence(self, data):
        self.write(b"".join(data))

    def writeToChild(self, childFD, data):
        assert childFD == 0, "only stdin is open for writing"
        self.write(data)

    def closeStdin(self):
        self.stdin_closed = True

    def closeStdout(self):
        pass

    def closeStderr(self):
        pass

    def closeChildFD(self, descriptor):
        if descriptor == 0:
            self.closeStdin()

    def loseConnection(self):
        self.closeStdin()

    def getPeer(self):
        raise NotImplementedError()  # as Twisted's own processes do

    def getHost(self):
        raise NotImplementedError()

    def signalProcess(self, signalID):
        if self.ended:
            raise error.ProcessExitedAlready()
        self.signals.append(signalID)

    # Playing the process.

    def output(self, childFD, data):
        """The process writes ``data`` to its stdout (1) or stderr (2)."""
        self.protocol.childDataReceived(childFD, data)

    def exit(self, code=0):
        """The process exits with status ``code``."""
        self.ended = True
        reason = error.ProcessDone(0) if code == 0 else error.ProcessTerminated(exitCode=code)
        self.protocol.processEnded(Failure(reason))

    def killed_by(self, signal_number):
        """The process dies of signal ``signal_number``."""
        self.ended = True
        self.protocol.processEnded(Failure(error.ProcessTerminated(signal=signal_number)))


@implementer(IReactorProcess)
class ProcessReactor(MemoryReactorClock):
    """A MemoryReactorClock whose spawnProcess records a FakeProcess."""

    def __init__(self):
        super().__init__()
        self.processes = []
        self.refuse_with = None  # an OSError for spawnProcess to raise

    def spawnProcess(self, processProtocol, executable, args=(), env={}, path=None, uid=None,
                     gid=None, usePTY=0, childFDs=None):
        if self.refuse_with is not None:
            raise self.refuse_with
        process = FakeProcess(processProtocol, executable, args, env, path)
        self.processes.append(process)
        # A real process connects its protocol before spawnProcess returns.
        processProtocol.makeConnection(process)
        return process


def run_in_reactor(start):
    """``start(reactor)`` on a fresh real reactor, run until its Deferred fires.

    Returns the result, or raises what the Deferred failed with.  A private
    reactor (never the global one) runs in this thread, so it can install
    the SIGCHLD handler that tells it a process ended.
    """
    reactor = SelectReactor()
    outcome = []

    def go():
        start(reactor).addBoth(outcome.append).addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]
