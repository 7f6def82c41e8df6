"""Job states and the one table of allowed transitions.

The numbers are the seed project's and are stored in users' databases: never
renumber them.  Every writer (the Django models, hpcd, the agent) asks
:func:`can_transition` before it changes a job's state, so a late or replayed
report can never move a job backwards (a job cancelled in the database does
not flip back to COMPLETED because the cluster said so afterwards).
"""

import enum


class JobStatus(enum.IntEnum):
    DRAFT = 0
    PENDING = 10
    SUBMITTING = 20
    SUBMITTED = 30
    QUEUED = 40
    RUNNING = 50
    CANCELLING = 60
    CANCELLED = 70
    DELETING = 80
    DELETED = 90
    ERROR = 400
    WALL_TIME_EXCEEDED = 401
    OUT_OF_MEMORY = 402
    COMPLETED = 500

    @property
    def label(self):
        return self.name.replace("_", " ").capitalize()

    @classmethod
    def choices(cls):
        """``(value, label)`` pairs for a Django field."""
        return [(s.value, s.label) for s in cls]

    @staticmethod
    def display_name(status):
        """The words the seed project showed for a state number (portals call
        ``JobStatus.display_name(n)``); "Unknown" for any other value."""
        try:
            return _DISPLAY_NAMES[JobStatus(status)]
        except (ValueError, TypeError):
            return "Unknown"


_DISPLAY_NAMES = {
    JobStatus.DRAFT: "Draft",
    JobStatus.PENDING: "Pending",
    JobStatus.SUBMITTING: "Submitting",
    JobStatus.SUBMITTED: "Submitted",
    JobStatus.QUEUED: "Queued",
    JobStatus.RUNNING: "Running",
    JobStatus.CANCELLING: "Cancelling",
    JobStatus.CANCELLED: "Cancelled",
    JobStatus.DELETING: "Deleting",
    JobStatus.DELETED: "Deleted",
    JobStatus.ERROR: "Error",
    JobStatus.WALL_TIME_EXCEEDED: "Wall Time Exceeded",
    JobStatus.OUT_OF_MEMORY: "Out of Memory",
    JobStatus.COMPLETED: "Completed",
}

#: Where a job's life ends, successfully or not.  Only deletion follows.
TERMINAL = frozenset({
    JobStatus.CANCELLED,
    JobStatus.ERROR,
    JobStatus.WALL_TIME_EXCEEDED,
    JobStatus.OUT_OF_MEMORY,
    JobStatus.COMPLETED,
})

#: The job is known to the cluster (or about to be) and not finished.
ACTIVE = frozenset({
    JobStatus.SUBMITTING,
    JobStatus.SUBMITTED,
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.CANCELLING,
})

#: States in which hpcd still owes the cluster a message; hpcd scans for them
#: at start and periodically, so a lost notification only delays.
NEEDS_DISPATCH = frozenset({
    JobStatus.PENDING,
    JobStatus.SUBMITTING,
    JobStatus.CANCELLING,
    JobStatus.DELETING,
})

_S = JobStatus
_progress = (_S.SUBMITTED, _S.QUEUED, _S.RUNNING)

#: new state -> the states it may be entered from.  Forward only: a state
#: never returns to one that precedes it, which is what makes at-least-once
#: delivery of reports (replays after a reconnect) harmless.
ALLOWED_FROM = {
    _S.DRAFT: frozenset(),
    _S.PENDING: frozenset({_S.DRAFT}),
    _S.SUBMITTING: frozenset({_S.PENDING}),
    _S.SUBMITTED: frozenset({_S.SUBMITTING}),
    _S.QUEUED: frozenset({_S.SUBMITTING, _S.SUBMITTED}),
    _S.RUNNING: frozenset({_S.SUBMITTING, _S.SUBMITTED, _S.QUEUED}),
    _S.CANCELLING: frozenset({_S.SUBMITTING, *_progress}),
    # A job never sent to a cluster is cancelled at once.
    _S.CANCELLED: frozenset({_S.DRAFT, _S.PENDING, _S.SUBMITTING, *_progress, _S.CANCELLING}),
    _S.DELETING: TERMINAL,
    _S.DELETED: frozenset({_S.DRAFT, _S.DELETING}),
}
# The scheduler's own verdict ends a job from any active state, including
# CANCELLING: a job that completed before the cancel reached it completed.
for _end in (_S.ERROR, _S.WALL_TIME_EXCEEDED, _S.OUT_OF_MEMORY, _S.COMPLETED):
    ALLOWED_FROM[_end] = frozenset({_S.SUBMITTING, *_progress, _S.CANCELLING})
# A job that cannot be dispatched at all (no cluster can take it) fails early.
ALLOWED_FROM[_S.ERROR] = ALLOWED_FROM[_S.ERROR] | {_S.PENDING}
del _end


def can_transition(old, new):
    """True when a job in state ``old`` may move to ``new``."""
    return JobStatus(old) in ALLOWED_FROM[JobStatus(new)]


def is_terminal(status):
    return JobStatus(status) in TERMINAL


#: The model field that records when a job entered each phase.
TIME_FIELDS = {
    _S.PENDING: "job_pending_time",
    _S.SUBMITTING: "job_submitting_time",
    _S.SUBMITTED: "job_submitted_time",
    _S.QUEUED: "job_queued_time",
    _S.RUNNING: "job_running_time",
    **{s: "job_finished_time" for s in TERMINAL},
}
