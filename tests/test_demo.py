"""`ponder demo` at toy size (configs/experiments/demo_tiny.yaml), end to end in a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs.load import load_config
from search.scaling import demo_rows, markdown_table, pool_rows

ROOT = Path(__file__).resolve().parents[1]


def _demo(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device: faster compiles on 2 cores
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", "tools.cli", "demo", "--config", "experiments/demo_tiny",
                           "--run-dir", str(run_dir), "--no-progress", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    process = _demo(run_dir)
    assert process.returncode == 0, process.stderr[-3000:]
    return run_dir, process.stdout


def test_demo_writes_a_table_a_plot_and_a_row_per_strategy_and_budget(demo_run):
    run_dir, out = demo_run
    cfg = load_config("experiments/demo_tiny")
    expected = [(row.name, row.budget) for row in demo_rows(cfg.demo)]
    # SFT policy: greedy and sample at x1; best_of_n three ways, beam, dvts and mcts at every budget above 1.
    # RL policy: greedy and sample at x1 and best_of_n three ways at every budget above 1.
    above_1 = sum(b > 1 for b in cfg.demo.budgets)
    assert cfg.demo.rl_steps > 0 and cfg.demo.rl_strategies == ["greedy", "sample", "best_of_n"]
    assert len(expected) == 2 + 6 * above_1 + 2 + 3 * above_1

    results = json.loads((run_dir / "results.json").read_text())
    assert [(r["name"], r["budget"]) for r in results["rows"]] == expected
    for row in results["rows"]:
        assert row["problems"] == cfg.demo.problems
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["tokens_per_problem"] > 0 and row["problems_per_s"] > 0
    for policy in ("sft", "rl"):
        rows = [r for r in results["rows"] if r["policy"] == policy]
        assert [r["strategy"] for r in rows[:2]] == ["greedy", "sample"] and rows[0]["size"] == "n=1"
        sample = rows[1]
        # a bigger budget spends more tokens than one sample of the same policy (what the plot's x-axis claims)
        assert rows[2:] and all(r["tokens_per_problem"] > sample["tokens_per_problem"] for r in rows[2:])
    # one program per strategy and budget (and the ORM's forward, compiled by the first ORM row): the RL
    # policy's rows, and rows reading another row's pool, compile nothing
    compiled = {(r["policy"], r["name"], r["budget"]): r["compile_seconds"] for r in results["rows"]}
    assert compiled["sft", "sample", 1] > 0 and compiled["sft", "best_of_n/majority", cfg.demo.budgets[-1]] > 0
    assert compiled["sft", "greedy", 1] > 0
    assert compiled["sft", "best_of_n/orm-weighted", cfg.demo.budgets[1]] > 0
    assert all(seconds == 0 for (policy, name, _), seconds in compiled.items()
               if (policy == "rl" and "orm" not in name) or name == "best_of_n/prm-weighted")
    assert f"search: compiling its {sum(s > 0 for s in compiled.values())} programs took" in out
    assert set(results["reward_eval"]) == set(results["reward_validation"]) == {"prm", "orm"}
    # AUCs on held-out train problems and on validation problems, the within-problem one on the screen
    assert all(m["problems"] == cfg.demo.reward_eval_problems for m in results["reward_validation"].values())
    for kind in ("prm", "orm"):
        for m, where in ((results["reward_validation"][kind], "validation problems"),
                         (results["reward_eval"][kind], "held-out train problems")):
            if m.get("steps"):
                assert not m["step_auc"] < 0.0 and not m["step_auc"] > 1.0  # NaN when 8 problems hold out one class
                assert m["within_pairs"] >= 0
                pooled = "step" if kind == "prm" else "outcome"
                assert f"{kind.upper()}: on {m['problems']} {where}" in out
                assert f"{pooled} AUC {m[f'{pooled}_auc']:.3f} over {m['records']} samples" in out
    assert results["stage_seconds"].keys() == {"policy", "rl", "pass@1", "reward data", "reward models", "search"}
    rl_metrics = [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in rl_metrics) == cfg.demo.rl_steps
    # pass@1 before and after RL over demo.pass_samples samples of every test problem
    pass_at_1 = results["pass_at_1"]
    assert pass_at_1["samples"] == cfg.demo.pass_samples > 1 and pass_at_1["problems"] == cfg.demo.problems
    assert pass_at_1["sft_skipped"] == pass_at_1["rl_skipped"] == 0
    for policy in ("sft", "rl"):  # a rate over problems x samples: a multiple of 1 / (problems x samples)
        count = pass_at_1[policy] * cfg.demo.problems * cfg.demo.pass_samples
        assert 0.0 <= pass_at_1[policy] <= 1.0 and abs(count - round(count)) < 1e-6
    assert f"RL: pass@1 on the {cfg.demo.problems} test problems ({cfg.demo.pass_samples} samples each" in out
    # the RL curve: an evaluation every rl.eval_every steps from the start, each with its rollouts' mean length
    curve = results["rl_curve"]
    assert [point["step"] for point in curve] == list(range(0, cfg.demo.rl_steps + 1, cfg.rl.eval_every))
    lengths = {m["step"]: m["completion_length"] for m in rl_metrics if "completion_length" in m}
    assert curve[0]["completion_length"] == pytest.approx(lengths[1])  # step 1's rollouts: the starting policy
    for point in curve:
        assert 0.0 <= point["pass_at_1"] <= 1.0
    # no rollout comes from the last params: with an evaluation every step the last window is empty
    assert all(0 < point["completion_length"] <= cfg.rl.max_new_tokens for point in curve[:-1])
    assert curve[-1]["completion_length"] is None
    assert f"RL curve: pass@1 on {cfg.rl.eval_problems} validation problems" in out

    for name in ("scaling.png", "coverage.png", "rl_curve.png"):
        png = (run_dir / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000, name
    # what it shows: the best search against the better of greedy and one sample, per policy
    assert [line.split(":")[0] for line in results["findings"]] == ["sft", "rl"]
    assert all(f"ponder demo: shows: {line}" in out for line in results["findings"])
    # coverage of the largest best-of-N pool: pass@k grows with k, no rule picks better than it, and all of
    # the pool is each row's own accuracy
    coverage = {int(k): row for k, row in results["coverage"].items()}
    largest = max(cfg.demo.budgets)
    bon = {r["name"].split("/")[1]: r["accuracy"] for r in results["rows"]
           if r["policy"] == "sft" and r["strategy"] == "best_of_n" and r["budget"] == largest}
    ks = sorted(coverage)
    assert ks[0] == 1 and ks[-1] >= largest and all(b == 2 * a for a, b in zip(ks, ks[1:-1], strict=False))
    assert set(coverage[1]) == {"pass_at_k", *bon}
    assert all(coverage[a]["pass_at_k"] <= coverage[b]["pass_at_k"] for a, b in zip(ks, ks[1:], strict=False))
    for k in (1, ks[-1]):  # exact at 1 and N (between: groups of k estimate it, see search/coverage.py)
        assert all(coverage[k][rule] <= coverage[k]["pass_at_k"] + 1e-9 for rule in bon)
    assert all(coverage[1][rule] == pytest.approx(coverage[1]["pass_at_k"]) for rule in bon)
    assert {rule: coverage[ks[-1]][rule] for rule in bon} == pytest.approx(bon)
    assert f"coverage: pass@k of the {ks[-1]} best-of-N chains per problem" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("strategy") and "accuracy" in line)
    table = lines[header + 2 : header + 2 + len(expected)]
    assert [line.split()[0] for line in table] == [name for name, _ in expected]
    assert markdown_table(results["rows"]).count("\n") == len(expected) + 1
    for name in ("policy", "problems.jsonl", "reward/data.jsonl", "reward/validation.jsonl", "reward/prm/config.yaml",
                 "reward/orm/config.yaml", "reward/prm/validation_eval.json", "reward/orm/validation_eval.json"):
        assert (run_dir / name).exists(), name


def test_a_second_run_skips_every_stage_and_keeps_the_results(demo_run):
    run_dir, _ = demo_run
    before = json.loads((run_dir / "results.json").read_text())["rows"]
    process = _demo(run_dir)
    assert process.returncode == 0, process.stderr[-3000:]
    # policy, RL, pass@1, reward data (train and validation), PRM, ORM, search
    assert process.stdout.count("skipping") == 8, process.stdout
    assert json.loads((run_dir / "results.json").read_text())["rows"] == before


def test_rl_rows_take_their_own_budgets_and_bad_budgets_name_the_key():
    cfg = load_config("experiments/demo", ["demo.budgets=[1, 4, 16, 64]", "demo.rl_steps=30", "demo.rl_budgets=[1, 4]"])
    rows = [(row.name, row.budget) for row in demo_rows(cfg.demo)]
    assert ("best_of_n/majority", 64) in rows and ("rl/best_of_n/majority", 4) in rows
    assert max(budget for name, budget in rows if name.startswith("rl/")) == 4
    assert [name for name, _ in rows if name.startswith("rl/")] == ["rl/greedy", "rl/sample", *(
        f"rl/best_of_n/{rule}" for rule in ("majority", "orm-weighted", "prm-weighted"))]
    unset = load_config("experiments/demo", ["demo.rl_steps=30", "demo.rl_budgets=null"])
    assert max(b for name, b in ((r.name, r.budget) for r in demo_rows(unset.demo)) if name.startswith("rl/")) == 64
    for bad in ("[]", "[0, 4]"):
        for key in ("rl_budgets", "best_of_n_budgets"):
            with pytest.raises(ValueError, match=f"demo.{key}"):
                load_config("experiments/demo", [f"demo.{key}={bad}"])


def test_best_of_n_rows_take_their_own_budgets():
    """demo.best_of_n_budgets sizes only the best-of-N rows (a larger pool for the coverage curve), and the
    coverage reads the largest of them."""
    cfg = load_config("experiments/demo", ["demo.budgets=[1, 4, 16]", "demo.best_of_n_budgets=[4, 16, 128]"])
    rows = demo_rows(cfg.demo, checker=True)
    budgets = {}
    for row in rows:
        if row.policy == "sft":
            budgets.setdefault(row.strategy, []).append(row.budget)
    assert budgets["best_of_n"] == [4, 16, 128] * 4 and budgets["beam"] == budgets["mcts"] == [4, 16]
    assert {(row.name, row.budget) for row in pool_rows(rows)} == {
        (f"best_of_n/{rule}", 128) for rule in ("majority", "orm-weighted", "prm-weighted", "checker")}
    unset = load_config("experiments/demo", ["demo.best_of_n_budgets=null", "demo.rl_steps=0"])
    assert max(row.budget for row in demo_rows(unset.demo) if row.strategy == "best_of_n") == 64
