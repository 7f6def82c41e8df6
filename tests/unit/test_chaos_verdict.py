"""The chaos run's verdict (tests/chaos_kit.py) finds each kind of damage,
from hand-made rows and ledgers."""

from chaos_kit import Fault, plan, read_ledger, report_lines, verdict
from hpc_agent.status import JobStatus as S

#: A complete, clean history of one job.
DONE = [(S.DRAFT, S.PENDING), (S.PENDING, S.SUBMITTING), (S.SUBMITTING, S.RUNNING),
        (S.RUNNING, S.COMPLETED)]
CANCELLED = [(S.DRAFT, S.PENDING), (S.PENDING, S.SUBMITTING), (S.SUBMITTING, S.RUNNING),
             (S.RUNNING, S.CANCELLING), (S.CANCELLING, S.CANCELLED)]


def judge(jobs, history=None, ledger=None, cancelled=frozenset()):
    history = history if history is not None else {
        j: (CANCELLED if state == S.CANCELLED else DONE) for j, state in jobs.items()}
    ledger = ledger if ledger is not None else {j: [f"n{j}"] for j in jobs}
    return verdict(jobs, history, ledger, cancelled)


def counts(result):
    return {name: result[name] for name in
            ("lost", "ran_twice", "wrong_final", "stuck", "backwards", "stray")}


def test_a_clean_run_has_no_problem():
    result = judge({1: S.COMPLETED, 2: S.COMPLETED, 3: S.CANCELLED}, cancelled={3})
    assert result["jobs"] == 3
    assert set(counts(result).values()) == {0}


def test_a_cancelled_job_may_have_run_once_or_not_at_all():
    jobs = {1: S.CANCELLED, 2: S.CANCELLED, 3: S.COMPLETED}
    ledger = {1: ["a"], 3: ["c"]}  # 2 never started; 3 completed before the cancel
    result = judge(jobs, ledger=ledger, cancelled={1, 2, 3})
    assert set(counts(result).values()) == {0}


def test_a_completed_job_without_a_ledger_line_is_lost():
    result = judge({1: S.COMPLETED, 2: S.COMPLETED}, ledger={1: ["a"]})
    assert result["lost"] == 1
    assert result["problems"]["lost"][0][0] == 2


def test_a_completed_job_that_was_cancelled_too_still_had_to_run():
    result = judge({1: S.COMPLETED}, ledger={}, cancelled={1})
    assert result["lost"] == 1


def test_a_job_that_ran_twice_is_found():
    result = judge({1: S.COMPLETED, 2: S.CANCELLED}, ledger={1: ["a", "b"], 2: ["c", "d"]},
                   cancelled={2})
    assert result["ran_twice"] == 2
    assert result["lost"] == 0


def test_a_job_left_unfinished_is_stuck():
    history = {1: DONE, 2: DONE[:3]}
    result = judge({1: S.COMPLETED, 2: S.RUNNING}, history=history)
    assert result["stuck"] == 1
    assert result["problems"]["stuck"] == [(2, "left RUNNING")]
    assert result["backwards"] == 0


def test_a_job_that_never_left_pending_is_stuck_and_lost():
    result = judge({1: S.PENDING}, history={1: DONE[:1]}, ledger={})
    assert result["stuck"] == 1
    assert result["lost"] == 1


def test_an_error_or_an_unasked_cancel_is_a_wrong_final_state():
    history = {1: DONE[:3] + [(S.RUNNING, S.ERROR)], 2: CANCELLED, 3: CANCELLED}
    result = judge({1: S.ERROR, 2: S.CANCELLED, 3: S.CANCELLED}, history=history,
                   cancelled={3})
    assert result["wrong_final"] == 2
    assert result["problems"]["wrong_final"] == [(1, "ended ERROR"), (2, "ended CANCELLED")]


def test_without_the_runs_cancels_the_history_says_which_were_cancelled():
    history = {1: CANCELLED, 2: DONE[:3] + [(S.RUNNING, S.CANCELLED)]}
    result = verdict({1: S.CANCELLED, 2: S.CANCELLED}, history, {}, None)
    assert set(counts(result).values()) == {0}
    result = verdict({1: S.ERROR}, {1: DONE[:3] + [(S.RUNNING, S.ERROR)]}, {1: ["a"]}, None)
    assert result["wrong_final"] == 1


def test_a_history_moving_backwards_is_found():
    backwards = DONE + [(S.COMPLETED, S.RUNNING), (S.RUNNING, S.COMPLETED)]
    result = judge({1: S.COMPLETED}, history={1: backwards})
    assert result["backwards"] == 1
    assert "RUNNING" in result["problems"]["backwards"][0][1]


def test_a_history_with_a_gap_or_a_wrong_end_is_found():
    gap = [(S.DRAFT, S.PENDING), (S.SUBMITTING, S.RUNNING), (S.RUNNING, S.COMPLETED)]
    not_draft = DONE[1:]
    wrong_end = DONE[:3]
    result = judge({1: S.COMPLETED, 2: S.COMPLETED, 3: S.COMPLETED},
                   history={1: gap, 2: not_draft, 3: wrong_end})
    assert result["backwards"] == 3


def test_ledger_lines_of_no_job_are_strays():
    result = judge({1: S.COMPLETED}, ledger={1: ["a"], 7: ["x"], None: ["garbage"]})
    assert result["stray"] == 2


def test_the_ledger_is_read_line_by_line(tmp_path):
    path = tmp_path / "ledger"
    path.write_text("1 aaa\n2 bbb\n1 ccc\nhalf a line\n")
    assert read_ledger(str(path)) == {1: ["aaa", "ccc"], 2: ["bbb"], None: ["half a line"]}
    assert read_ledger(str(tmp_path / "none")) == {}


def test_the_report_is_name_value_unit_lines():
    result = judge({1: S.COMPLETED}, ledger={})
    lines = report_lines(result, {"hpcd_kill": [1.5, 2.5], "agent_stop": [None]})
    assert "jobs: 1 jobs" in lines
    assert "lost: 1 jobs" in lines
    assert "recovery_hpcd_kill_max: 2.50 s" in lines
    assert "recovery_hpcd_kill_mean: 2.00 s" in lines
    assert "recovery_agent_stop_timed_out: 1 faults" in lines


def test_a_plan_is_replayed_from_its_seed_and_has_every_kind():
    kinds = ["hpcd_kill", "agent_stop", "postgres_restart"]
    one = plan(7, 100, 6, kinds, (20, 90))
    two = plan(7, 100, 6, kinds, (20, 90))
    assert [repr(f) for f in one] == [repr(f) for f in two]
    assert {f.kind for f in one} == set(kinds)
    assert [f.after_job for f in one] == sorted(f.after_job for f in one)
    for fault in one:
        assert isinstance(fault, Fault)
        assert fault.hold <= (2.0 if fault.kind == "hpcd_kill" else 90)
    assert [repr(f) for f in plan(8, 100, 6, kinds, (20, 90))] != [repr(f) for f in one]
