"""Job states and the one transition table (hpc_agent.status)."""

import itertools

import pytest

from hpc_agent.status import (
    ACTIVE, ALLOWED_FROM, NEEDS_DISPATCH, TERMINAL, TIME_FIELDS, JobStatus as S, can_transition,
    is_terminal,
)

ALL = list(S)

#: The contract, written out: new state -> allowed predecessors.
_RUNNING_ON = {S.SUBMITTING, S.SUBMITTED, S.QUEUED, S.RUNNING}
EXPECTED = {
    S.DRAFT: set(),
    S.PENDING: {S.DRAFT},
    S.SUBMITTING: {S.PENDING},
    S.SUBMITTED: {S.SUBMITTING},
    S.QUEUED: {S.SUBMITTING, S.SUBMITTED},
    S.RUNNING: {S.SUBMITTING, S.SUBMITTED, S.QUEUED},
    S.CANCELLING: _RUNNING_ON,
    S.CANCELLED: {S.DRAFT, S.PENDING, S.CANCELLING} | _RUNNING_ON,
    S.DELETING: set(TERMINAL),
    S.DELETED: {S.DRAFT, S.DELETING},
    S.ERROR: {S.PENDING, S.CANCELLING} | _RUNNING_ON,
    S.WALL_TIME_EXCEEDED: {S.CANCELLING} | _RUNNING_ON,
    S.OUT_OF_MEMORY: {S.CANCELLING} | _RUNNING_ON,
    S.COMPLETED: {S.CANCELLING} | _RUNNING_ON,
}

#: Phases in the order a job lives them; every allowed step goes to a later phase.
PHASE = {S.DRAFT: 0, S.PENDING: 1, S.SUBMITTING: 2, S.SUBMITTED: 3, S.QUEUED: 4,
         S.RUNNING: 5, S.CANCELLING: 6, **{s: 7 for s in TERMINAL}, S.DELETING: 8,
         S.DELETED: 9}


def edges():
    return {(old, new) for new, olds in ALLOWED_FROM.items() for old in olds}


def test_the_stored_numbers_never_change():
    assert {s.name: s.value for s in S} == {
        "DRAFT": 0, "PENDING": 10, "SUBMITTING": 20, "SUBMITTED": 30, "QUEUED": 40,
        "RUNNING": 50, "CANCELLING": 60, "CANCELLED": 70, "DELETING": 80, "DELETED": 90,
        "ERROR": 400, "WALL_TIME_EXCEEDED": 401, "OUT_OF_MEMORY": 402, "COMPLETED": 500}


def test_the_transition_table_is_exactly_the_documented_one():
    assert {s: set(v) for s, v in ALLOWED_FROM.items()} == EXPECTED


@pytest.mark.parametrize("old,new", sorted(itertools.product(ALL, ALL)))
def test_can_transition_follows_the_table(old, new):
    assert can_transition(old, new) == (old in EXPECTED[new])
    assert can_transition(int(old), int(new)) == can_transition(old, new)


def test_every_allowed_step_moves_forward():
    assert all(PHASE[new] > PHASE[old] for old, new in edges())


def test_no_state_can_be_reached_again_once_left():
    reach = {s: {new for old, new in edges() if old == s} for s in ALL}
    changed = True
    while changed:  # transitive closure
        changed = False
        for s in ALL:
            more = set().union(*(reach[t] for t in reach[s])) - reach[s]
            if more:
                reach[s] |= more
                changed = True
    assert [s for s in ALL if s in reach[s]] == []


def test_no_state_moves_to_itself():
    assert not any(can_transition(s, s) for s in ALL)


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_terminal_states_only_go_to_deleting(state):
    assert [new for new in ALL if can_transition(state, new)] == [S.DELETING]
    assert is_terminal(state)


def test_deleted_is_entered_only_from_deleting_or_draft_and_left_never():
    assert {old for old in ALL if can_transition(old, S.DELETED)} == {S.DRAFT, S.DELETING}
    assert not any(can_transition(S.DELETED, new) for new in ALL)


def test_a_job_that_finished_before_the_cancel_reached_it_is_completed():
    assert can_transition(S.CANCELLING, S.COMPLETED)
    assert can_transition(S.CANCELLING, S.CANCELLED)


def test_a_late_report_never_moves_a_finished_job_back():
    assert not can_transition(S.COMPLETED, S.RUNNING)
    assert not can_transition(S.CANCELLED, S.COMPLETED)
    assert not can_transition(S.CANCELLED, S.RUNNING)
    assert not can_transition(S.RUNNING, S.QUEUED)
    assert not can_transition(S.CANCELLING, S.RUNNING)


def test_a_job_never_sent_to_a_cluster_is_cancelled_at_once():
    assert can_transition(S.PENDING, S.CANCELLED)
    assert not can_transition(S.PENDING, S.CANCELLING)


def test_a_pending_job_ends_only_cancelled_or_in_error():
    assert {s for s in TERMINAL if can_transition(S.PENDING, s)} == {S.CANCELLED, S.ERROR}


def test_terminal_active_and_dispatch_sets():
    assert TERMINAL == {S.CANCELLED, S.ERROR, S.WALL_TIME_EXCEEDED, S.OUT_OF_MEMORY,
                        S.COMPLETED}
    assert ACTIVE == {S.SUBMITTING, S.SUBMITTED, S.QUEUED, S.RUNNING, S.CANCELLING}
    assert NEEDS_DISPATCH == {S.PENDING, S.SUBMITTING, S.CANCELLING, S.DELETING}
    assert not TERMINAL & ACTIVE
    assert not is_terminal(S.DELETED) and not is_terminal(S.DELETING)


def test_labels_and_choices_are_human_readable():
    assert S.WALL_TIME_EXCEEDED.label == "Wall time exceeded"
    assert (500, "Completed") in S.choices()
    assert len(S.choices()) == len(ALL)


def test_unknown_state_numbers_are_refused():
    with pytest.raises(ValueError):
        can_transition(55, 50)


def test_every_time_field_is_a_field_of_the_job_model():
    from djangoapp.models import HpcJob

    for state, name in TIME_FIELDS.items():
        field = HpcJob._meta.get_field(name)
        assert field.get_internal_type() == "DateTimeField", (state, name)
    assert set(TIME_FIELDS) == {S.PENDING, S.SUBMITTING, S.SUBMITTED, S.QUEUED, S.RUNNING,
                                *TERMINAL}
