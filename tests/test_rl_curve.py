"""The RL learning curve read back from an RL run's metrics.jsonl (train/rl_curve.py)."""

from __future__ import annotations

import json

from train.rl_curve import curve_lines, plot_rl_curve, rl_curve


def _write(path, records, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_each_evaluation_takes_the_lengths_of_the_rollouts_since_the_previous_one(tmp_path):
    # eval every 2 steps: step k's rollouts come from the params after k - 1 updates
    records = [{"step": 0, "pass_at_1": 0.25}]
    records += [{"step": k, "completion_length": 10.0 * k} for k in range(1, 6)]
    records += [{"step": 2, "pass_at_1": 0.5}, {"step": 4, "pass_at_1": 0.75}]
    metrics = tmp_path / "metrics.jsonl"
    _write(metrics, records)
    curve = rl_curve(metrics)
    assert [(p["step"], p["pass_at_1"]) for p in curve] == [(0, 0.25), (2, 0.5), (4, 0.75)]
    # eval 0: step 1's rollouts (the start); eval 2: steps 2 and 3; eval 4: steps 4 and 5
    assert [p["completion_length"] for p in curve] == [10.0, 25.0, 45.0]
    lines = curve_lines(curve)
    assert lines[0].split() == ["step", "pass@1", "length"] and lines[2].split() == ["2", "50.0%", "25.0"]


def test_a_resumed_run_counts_its_last_line_and_a_cut_line_is_skipped(tmp_path):
    records = [{"step": 0, "pass_at_1": 0.1}, {"step": 1, "completion_length": 4.0},
               {"step": 1, "completion_length": 8.0}, {"step": 1, "pass_at_1": 0.2}, {"step": 1, "pass_at_1": 0.3}]
    metrics = tmp_path / "metrics.jsonl"
    _write(metrics, records, tail='{"step": 2, "completion_len')
    curve = rl_curve(metrics)
    assert [(p["step"], p["pass_at_1"], p["completion_length"]) for p in curve] == [(0, 0.1, 8.0), (1, 0.3, None)]
    assert curve_lines(curve)[-1].split() == ["1", "30.0%", "-"]
    plot_rl_curve(curve, tmp_path / "curve.png", "test")  # a window without rollouts is left out of the plot
    assert (tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")
    assert rl_curve(tmp_path / "missing.jsonl") == []
