"""An RL run's learning curve: pass@1 on its validation problems and the mean completion length, by step.

`ponder rl` writes one metrics line per step (the rollouts' `completion_length` among them) and,
every rl.eval_every steps, a line with `pass_at_1` (rl.eval_samples samples of each of
rl.eval_problems validation problems). `rl_curve` pairs each evaluation at step s with the mean
completion length of the rollouts sampled by the policies since the previous evaluation: step k's
rollouts come from the params after k - 1 updates, so evaluation s (of the params after s updates)
takes the lengths of steps s - eval_every + 2 .. s + 1 that exist (step 1 alone for s = 0).
"""

from __future__ import annotations

import json
from pathlib import Path

from configs.fileio import atomic_path


def rl_curve(metrics_path: Path) -> list[dict]:
    """[{"step", "pass_at_1", "completion_length"}] per evaluation of an RL run, in step order ([] if none).

    A resumed run may log a step twice: its last line counts. completion_length is None where no
    rollout of that window was logged.
    """
    evals: dict[int, float] = {}
    lengths: dict[int, float] = {}
    if not metrics_path.exists():
        return []
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
        if "pass_at_1" in record:
            evals[int(record["step"])] = float(record["pass_at_1"])
        if "completion_length" in record:
            lengths[int(record["step"])] = float(record["completion_length"])
    curve, previous = [], None
    for step in sorted(evals):
        first = 1 if previous is None else previous + 2
        window = [lengths[k] for k in range(first, step + 2) if k in lengths]
        curve.append({"step": step, "pass_at_1": evals[step],
                      "completion_length": sum(window) / len(window) if window else None})
        previous = step
    return curve


def curve_lines(curve: list[dict]) -> list[str]:
    """The curve as a small table: step, pass@1 (%) and mean completion length (tokens)."""
    lines = [f"{'step':>6} {'pass@1':>8} {'length':>8}"]
    for point in curve:
        length = "-" if point["completion_length"] is None else f"{point['completion_length']:.1f}"
        lines.append(f"{point['step']:>6} {100 * point['pass_at_1']:>7.1f}% {length:>8}")
    return lines


def plot_rl_curve(curve: list[dict], path: Path, title: str) -> None:
    """pass@1 and mean completion length against RL steps, side by side; written to `path` (PNG) whole."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in curve]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=120)
    left.plot(steps, [100 * p["pass_at_1"] for p in curve], marker="o", color="tab:blue")
    left.set_ylabel("pass@1 on validation problems (%)")
    measured = [p for p in curve if p["completion_length"] is not None]
    right.plot([p["step"] for p in measured], [p["completion_length"] for p in measured], marker="o",
               color="tab:orange")
    right.set_ylabel("mean completion length (tokens)")
    for ax in (left, right):
        ax.set_xlabel("RL step")
        ax.set_ylim(bottom=0)  # from zero: a flat length reads flat
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, mode=0o644) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
