"""Coverage and baselines on the host, no model: pass@k, re-selection over groups of k chains, the demo's
greedy rows, findings and plots, on synthetic pools of real arithmetic problems."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest

from search.candidates import Candidate, pick_answer
from search.coverage import coverage, coverage_lines, pass_at_k, plot_coverage, sample_counts, selected_at_k
from search.runner import Searched
from search.scaling import BASELINES, Row, findings, plot_scaling, pool_rows, row_records, rows_for
from tasks import get_task


def test_pass_at_k_is_the_unbiased_estimator_on_exact_small_cases():
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # of 6 pairs only (wrong, wrong) misses
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0 and pass_at_k(3, 1, 3) == 1.0
    assert pass_at_k(10, 3, 20) == 1.0  # k past n: any right chain
    for n, c, k in itertools.product(range(1, 9), range(9), range(1, 9)):
        if c <= n and k <= n:
            exact = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
            # the mean over every k-subset of "holds a right chain"
            hits = [any(i < c for i in subset) for subset in itertools.combinations(range(n), k)]
            assert pass_at_k(n, c, k) == pytest.approx(sum(hits) / len(hits), abs=1e-12)


def test_sample_counts_double_up_to_n():
    assert sample_counts(64) == [1, 2, 4, 8, 16, 32, 64]
    assert sample_counts(6) == [1, 2, 4, 6] and sample_counts(1) == [1] and sample_counts(0) == []


def _entry(key, correct, score):
    return {"key": key, "correct": correct, "score": score}


def test_selection_over_disjoint_groups_of_k_in_order():
    # groups of 2: (A right, B wrong) and (B wrong, B wrong)
    pool = [_entry("A", True, 0.9), _entry("B", False, 0.1), _entry("B", False, 0.2), _entry("B", False, 0.3)]
    assert selected_at_k(pool, "best", 2) == 0.5  # A wins the first group on score, B the second
    assert selected_at_k(pool, "best", 4) == 1.0  # A has the highest score of all four
    assert selected_at_k(pool, "majority", 4) == 0.0  # B has three votes
    assert selected_at_k(pool, "weighted", 4) == 1.0  # 0.9 for A against 0.6 for B
    assert selected_at_k(pool, "majority", 1) == 0.25  # one chain: its own verdict
    assert selected_at_k(pool, "majority", 3) == 0.0  # one group (chains 0-2), the fourth left over
    # a chain without an answer never wins a vote, unless no chain of the group answers
    assert selected_at_k([_entry(None, False, 1.0), _entry("A", True, 0.0)], "best", 2) == 1.0


def test_coverage_table_on_synthetic_pools():
    right, wrong = [_entry("7", True, 0.8)], [_entry("5", False, 0.4)]
    pools = [right * 4, wrong * 4, right + wrong * 3, wrong * 2 + right * 2]  # c = 4, 0, 1, 2 of n = 4
    table = coverage({"majority": ("majority", pools), "prm-weighted": ("weighted", pools)})
    assert list(table) == [1, 2, 4]
    assert [row["pass_at_k"] for row in table.values()] == pytest.approx(
        [(1 + 0 + 1 / 4 + 2 / 4) / 4, (1 + 0 + 1 / 2 + 5 / 6) / 4, 3 / 4])
    assert table[1]["majority"] == table[1]["prm-weighted"] == pytest.approx(table[1]["pass_at_k"])
    # at k = 4: majority gets problems 0 and 3 (a 2-2 tie goes to the higher total score); weighted the same
    assert table[4]["majority"] == table[4]["prm-weighted"] == 0.5
    assert table[2]["majority"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)  # groups in order: (r, w), (w, w) ...
    ks = list(table)
    assert all(table[a]["pass_at_k"] <= table[b]["pass_at_k"] for a, b in itertools.pairwise(ks))
    assert all(row[label] <= row["pass_at_k"] + 1e-12 for row in table.values() for label in row)
    lines = coverage_lines(table)
    assert lines[0].split() == ["k", "pass_at_k", "majority", "prm-weighted"] and len(lines) == 4
    assert coverage({}) == {}


def test_pool_entries_and_row_records_agree_with_the_rows_own_pick(tmp_path):
    task = get_task("arithmetic")
    problems = [task.generate(0, i, 2, "test") for i in range(3)]

    def cand(i, answer, score):
        return Candidate(i, f"step\nAnswer: {answer}", answer, score, 0.0, True)

    searched = []
    for line, problem in enumerate(problems):
        cands = [cand(0, problem.answer, 0.2), cand(1, "-1", 0.9), cand(2, f" {problem.answer} ", 0.3),
                 Candidate(3, "no answer", None, 0.5, 0.0, False)]
        searched.append(Searched(line + 1, problem, cands, 40.0, 1.0, 1.0, 4.0))
    for select, name in (("majority", "best_of_n/majority"), ("best", "best_of_n/best")):
        row = Row(name, "best_of_n", "prm", select, 4)
        records = row_records(row, searched)
        for record, entry in zip(records, searched, strict=True):
            pool = record["pool"]
            assert [e["correct"] for e in pool] == [True, False, True, False]
            assert pool[0]["key"] == pool[2]["key"] and pool[3]["key"] is None
            assert record["correct"] == pick_answer(entry.problem, entry.candidates, select)[1]
            # the whole pool re-selected on the host is the row's own answer
            assert selected_at_k(pool, select, len(pool)) == float(record["correct"])
    assert "pool" not in row_records(Row("beam/prm", "beam", "prm", "weighted", 4), searched)[0]


def _summary(name, strategy, accuracy, tokens, budget=1, policy="sft"):
    return {"name": name, "strategy": strategy, "accuracy": accuracy, "tokens_per_problem": tokens,
            "budget": budget, "policy": policy}


def test_greedy_rows_and_findings_against_the_better_baseline(tmp_path):
    rows = rows_for([1, 4], ["greedy", "sample", "best_of_n"]) + rows_for([1, 4], ["greedy", "sample"], "rl")
    assert [r.name for r in rows][:2] == list(BASELINES) and rows[0].strategy == "greedy"
    assert [r.name for r in rows if r.policy == "rl"] == ["rl/greedy", "rl/sample"]
    assert [r.name for r in pool_rows(rows)] == [f"best_of_n/{rule}" for rule in
                                                  ("majority", "orm-weighted", "prm-weighted")]
    results = [_summary("greedy", "greedy", 0.80, 20), _summary("sample", "sample", 0.60, 22),
               _summary("best_of_n/majority", "best_of_n", 0.85, 88, 4),
               _summary("beam/prm", "beam", 0.70, 90, 4)]
    (line,) = findings(results)
    # the gain is over greedy (the better single answer), not over one sample
    assert "best single answer greedy" in line and "best search best_of_n/majority x4 85.0%" in line
    assert "+5.0 points over greedy" in line and "1 of 2 search rows beat it" in line
    plot_scaling(results, tmp_path / "scaling.png", "t")
    table = coverage({"majority": ("majority", [[_entry("1", True, 1.0), _entry("2", False, 0.5)]])})
    plot_coverage(table, tmp_path / "coverage.png", "t", {"greedy": 0.8})
    for name in ("scaling.png", "coverage.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_checker_row_picks_a_chain_the_prompt_only_verifier_accepts():
    """On countdown the checker row rescores the PRM pool's chains by the task's prompt-only verifier; the
    reference answer is garbage here, so a right pick proves it was never read. Arithmetic gets no such row."""
    from search.scaling import checkable_mixture, checker_scores

    task = get_task("countdown")
    searched = []
    for index in range(4):
        problem = task.generate(0, index, 1, "test")
        right = "\n".join(task.trace(problem)) + f"\nAnswer: {problem.answer}"
        wrong = "\n".join(task.trace(problem)[:1]) + "\nAnswer: 1 + 1"
        # The PRM liked the wrong chain better; garbage reference fields: the checker must not need them.
        cands = [Candidate(1, wrong, "1 + 1", 0.9, -1.0, True), Candidate(2, right, problem.answer, 0.2, -1.0, True)]
        blind = dataclasses.replace(problem, steps=("garbage",), meta={"numbers": [0], "target": 0})
        searched.append(Searched(index + 1, blind, cands, 40.0, 1.0, 1.0, 4.0))
    scores, seconds = checker_scores(searched, 0.0)
    assert scores == [[0.0, 1.0]] * 4 and seconds > 0
    row = Row("best_of_n/checker", "best_of_n", "checker", "best", 4)
    assert row.pool_scorer == "prm"
    records = row_records(row, searched, scores)
    assert [r["chain"].endswith(p.problem.answer) for r, p in zip(records, searched, strict=True)] == [True] * 4
    assert checkable_mixture({"countdown_d1_direct": 1.0, "sudoku_d1_direct": 1.0})
    assert not checkable_mixture({"countdown_d1_direct": 1.0, "arithmetic_d1_direct": 1.0})
    assert not checkable_mixture({"text": 1.0})
    names = [r.name for r in rows_for([1, 4], ["best_of_n"], checker=True)]
    assert "best_of_n/checker" in names and "best_of_n/checker" not in [r.name for r in rows_for([4], ["best_of_n"])]
