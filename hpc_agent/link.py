"""The life of the agent's control connection, as a state machine.

:class:`LinkMachine` decides; it does no I/O.  The websocket protocol and
Twisted's ClientService (:mod:`hpc_agent.connection`) turn what happens on
the wire into its inputs, and it acts through a collaborator (``io``): which
credential the next attempt presents, when the agent may send updates, when
it gives up.  States are words; inputs are events::

    idle --start--> first attempt --opened--> greeting --welcomed--> online
                         |                       |                     |
                  timed out / unreachable        lost                 lost
                         v                       v                     v
                      retrying <-----------------+---------------------+
                         |  ^
                   refused  | a timeout, an unreachable hpcd
                         v  |
                       refused --still refused after REFUSAL_SECONDS--> stopped

* The launch token refused on the very first attempt: exit at once (hpcd
  gave it for this launch; nothing else will make it valid).
* A refusal later on (a launch token after a timed-out attempt, or the
  resume token while reconnecting) is "try again, then give up": hpcd may
  have been stopped and continued, and spent a token on a handshake the
  agent had already abandoned.  The agent keeps trying for
  ``REFUSAL_SECONDS`` before it exits and leaves the relaunch to hpcd.
* Nothing works for ``reconnect_seconds`` (the agent setting
  HPC_RECONNECT_SECONDS): exit.
* hpcd closes with a code that means "go away" (superseded by another agent,
  cluster removed, protocol mismatch): exit.

Retries back off exponentially, capped by a third of the resume grace period
hpcd announces in ``welcome``, so the agent is back before hpcd would launch
a replacement.
"""

from automat import MethodicalMachine
from twisted.logger import Logger

log = Logger()

#: Seconds between retries before the first, then doubling.
FIRST_RETRY_SECONDS = 0.5
#: Retry cap until hpcd says its resume grace period in ``welcome``: a third
#: of hpcd's default grace (HPC_AGENT_RESUME_GRACE_SECONDS, 15 s).
DEFAULT_MAX_BACKOFF = 5.0
#: Never retry more often than this, whatever hpcd's grace period.
MIN_MAX_BACKOFF = 0.5
#: How long refusals may go on (after the first attempt) before the agent exits.
REFUSAL_SECONDS = 30.0


class LinkMachine:
    """When to say hello, which credential to present, when to give up."""

    _machine = MethodicalMachine()

    def __init__(self, io, clock, reconnect_seconds, refusal_seconds=REFUSAL_SECONDS):
        self._io = io
        self._clock = clock
        self._reconnect_seconds = reconnect_seconds
        self._refusal_seconds = refusal_seconds
        self._deadline = None
        self._refusal_timer = None
        #: Attempts that failed since the last welcome (the backoff exponent).
        self.failures = 0
        self.max_backoff = DEFAULT_MAX_BACKOFF

    def retry_delay(self):
        """Seconds to wait before the next attempt (without jitter)."""
        exponent = min(max(0, self.failures - 1), 32)
        return min(self.max_backoff, FIRST_RETRY_SECONDS * 2 ** exponent)

    # -- states ----------------------------------------------------------------

    @_machine.state(initial=True)
    def idle(self):
        "Not started."

    @_machine.state()
    def first_attempt(self):
        "The first connection attempt, with the launch token."

    @_machine.state()
    def retrying(self):
        "Attempts failed or the connection was lost; trying again."

    @_machine.state()
    def refused(self):
        "hpcd refused the credential; trying again for a while."

    @_machine.state()
    def greeting(self):
        "The websocket is open and hello sent; waiting for welcome."

    @_machine.state()
    def online(self):
        "hpcd welcomed the agent: updates and requests flow."

    @_machine.state()
    def stopped(self):
        "Stopped, or given up: the agent exits."

    # -- inputs ----------------------------------------------------------------

    @_machine.input()
    def start(self):
        "The agent starts."

    @_machine.input()
    def attempt_failed(self, why):
        "An attempt ended before the websocket opened, not refused (a timeout, no route)."

    @_machine.input()
    def credential_refused(self, status):
        "hpcd answered the opening handshake with 401 or 403."

    @_machine.input()
    def opened(self):
        "The opening handshake completed."

    @_machine.input()
    def welcomed(self, resume_token, grace):
        "hpcd accepted the hello; ``grace`` is its resume grace period, or None."

    @_machine.input()
    def lost(self, code, reason):
        "The open connection closed (a drop, a ping timeout, hpcd restarting)."

    @_machine.input()
    def dismissed(self, code, reason):
        "hpcd closed the connection with a code that means: do not come back."

    @_machine.input()
    def deadline_passed(self):
        "Nothing worked for reconnect_seconds."

    @_machine.input()
    def refusals_went_on(self):
        "Refused for refusal_seconds."

    @_machine.input()
    def stop(self):
        "The agent stops (SIGTERM, or it gave up)."

    # -- outputs ---------------------------------------------------------------

    # Automat forbids calling outputs directly; timers are shared helpers.
    def _start_timer(self, name, delay, fire):
        self._cancel_timer(name)
        setattr(self, name, self._clock.callLater(delay, fire))

    def _cancel_timer(self, name):
        timer = getattr(self, name)
        if timer is not None and timer.active():
            timer.cancel()
        setattr(self, name, None)

    def _fire_deadline(self):
        self._deadline = None
        self.deadline_passed()

    def _fire_refusal_timer(self):
        self._refusal_timer = None
        self.refusals_went_on()

    @_machine.output()
    def _arm_deadline(self):
        self._start_timer("_deadline", self._reconnect_seconds, self._fire_deadline)

    @_machine.output()
    def _arm_refusal_timer(self):
        self._start_timer("_refusal_timer", self._refusal_seconds, self._fire_refusal_timer)

    @_machine.output()
    def _disarm_refusal_timer(self):
        self._cancel_timer("_refusal_timer")

    @_machine.output()
    def _disarm_timers(self):
        self._cancel_timer("_deadline")
        self._cancel_timer("_refusal_timer")

    @_machine.output()
    def _count_failure(self):
        self.failures += 1

    @_machine.output()
    def _note_refusal(self, status):
        log.warn("hpcd refused the agent's credential ({status}); trying again for up to "
                 "{s:.0f} s", status=status, s=self._refusal_seconds)

    @_machine.output()
    def _greet(self):
        self._io.greet()

    @_machine.output()
    def _take_welcome(self, resume_token, grace):
        # Every welcome rotates the credential; the one just used is spent.
        self._io.use_credential(resume_token)
        if grace:
            self.max_backoff = max(MIN_MAX_BACKOFF, grace / 3.0)
        self.failures = 0
        self._io.ready()

    @_machine.output()
    def _report_loss(self, code, reason):
        log.info("lost hpcd ({code} {reason}); reconnecting for up to {s:.0f} s",
                 code=code, reason=reason, s=self._reconnect_seconds)

    @_machine.output()
    def _give_up_refused_launch(self, status):
        self._io.give_up(f"hpcd refused the launch token ({status}); it is single-use "
                         "and short-lived: hpcd launches a new agent when it needs one")

    @_machine.output()
    def _give_up_refused(self):
        self._io.give_up(f"hpcd kept refusing the agent's credential for "
                         f"{self._refusal_seconds:.0f} s; hpcd launches a new agent when "
                         "it needs one")

    @_machine.output()
    def _give_up_unreachable(self):
        self._io.give_up(f"could not reach hpcd for {self._reconnect_seconds:.0f} s "
                         "(HPC_RECONNECT_SECONDS)")

    @_machine.output()
    def _give_up_dismissed(self, code, reason):
        self._io.give_up(f"hpcd closed the connection for good ({code}: {reason})")

    # -- transitions -----------------------------------------------------------

    idle.upon(start, enter=first_attempt, outputs=[_arm_deadline])
    idle.upon(stop, enter=stopped, outputs=[])

    first_attempt.upon(opened, enter=greeting, outputs=[_greet])
    first_attempt.upon(attempt_failed, enter=retrying, outputs=[_count_failure])
    first_attempt.upon(credential_refused, enter=stopped,
                       outputs=[_disarm_timers, _give_up_refused_launch])
    first_attempt.upon(deadline_passed, enter=stopped, outputs=[_give_up_unreachable])
    first_attempt.upon(stop, enter=stopped, outputs=[_disarm_timers])

    retrying.upon(opened, enter=greeting, outputs=[_greet])
    retrying.upon(attempt_failed, enter=retrying, outputs=[_count_failure])
    retrying.upon(credential_refused, enter=refused,
                  outputs=[_count_failure, _note_refusal, _arm_refusal_timer])
    retrying.upon(deadline_passed, enter=stopped, outputs=[_give_up_unreachable])
    retrying.upon(stop, enter=stopped, outputs=[_disarm_timers])

    refused.upon(opened, enter=greeting, outputs=[_disarm_refusal_timer, _greet])
    refused.upon(credential_refused, enter=refused, outputs=[_count_failure])
    # A timeout is not a refusal: hpcd may be stopped again.
    refused.upon(attempt_failed, enter=retrying,
                 outputs=[_count_failure, _disarm_refusal_timer])
    refused.upon(refusals_went_on, enter=stopped, outputs=[_disarm_timers, _give_up_refused])
    refused.upon(deadline_passed, enter=stopped,
                 outputs=[_disarm_timers, _give_up_unreachable])
    refused.upon(stop, enter=stopped, outputs=[_disarm_timers])

    greeting.upon(welcomed, enter=online, outputs=[_disarm_timers, _take_welcome])
    greeting.upon(lost, enter=retrying, outputs=[_count_failure])
    greeting.upon(dismissed, enter=stopped, outputs=[_disarm_timers, _give_up_dismissed])
    greeting.upon(deadline_passed, enter=stopped, outputs=[_give_up_unreachable])
    greeting.upon(stop, enter=stopped, outputs=[_disarm_timers])

    online.upon(welcomed, enter=online, outputs=[_take_welcome])
    online.upon(lost, enter=retrying, outputs=[_report_loss, _arm_deadline])
    online.upon(dismissed, enter=stopped, outputs=[_give_up_dismissed])
    online.upon(stop, enter=stopped, outputs=[])

    # After the end, the wire still reports how the connection closed.
    for _input in (start, attempt_failed, credential_refused, opened, welcomed, lost,
                   dismissed, deadline_passed, refusals_went_on, stop):
        stopped.upon(_input, enter=stopped, outputs=[])
    del _input
