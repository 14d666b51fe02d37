"""Coverage (Large Language Monkeys, Brown et al. 2024): pass@k of a pool of chains against k, beside the
accuracy each selection rule reaches choosing among k of them: the gap between generating and verifying.

The pools are the demo's best-of-N rows at their largest budget: N chains per problem, each
saved with its answer key, whether it verifies and its score under the row's scorer
(`pool_entries`, written by `search/scaling.py`). No chain is generated again: everything
here runs on the host from those saved entries.

    pass@k      the unbiased estimator of Chen et al. 2021 per problem, 1 - C(n-c, k) / C(n, k)
                (n chains, c right), averaged over problems.
    selected@k  the rule (majority, best, weighted; `search.candidates.choose`) over disjoint groups of k
                chains, in the order they were generated (chains 0..k-1, k..2k-1, ...; the N mod k
                left over are dropped), averaged over the groups and then the problems. At k = N it
                is the row's own accuracy; at k = 1 every rule is pass@1 (one chain: nothing to
                choose). In between it is an estimate from N / k groups, so it can exceed pass@k by
                sampling noise, never at k = 1 or N.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from configs.fileio import atomic_path
from search.candidates import Candidate, choose
from tasks import get_task
from tasks.base import Problem


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` right chains of `n` (Chen et al. 2021); k > n reads as k = n."""
    if c == 0:
        return 0.0
    if n - c < k:  # every k-subset holds a right chain
        return 1.0
    # 1 - C(n-c, k) / C(n, k) as a product, which neither overflows nor loses precision
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pool_entries(problem: Problem, cands: list[Candidate]) -> list[dict]:
    """Per chain, what re-selection needs: its answer key (None: no answer), whether it verifies, its score."""
    task = get_task(problem.task)
    return [{"key": None if c.answer is None else task.answer_key(problem, c.answer),
             "correct": bool(problem.answer) and task.score(problem, c.text)[0] == 1.0,
             "score": c.score} for c in cands]


def selected_at_k(pool: list[dict], select: str, k: int) -> float:
    """The fraction of disjoint groups of k chains (in order) whose chosen chain verifies (one group if k > N)."""
    groups = [pool[start : start + k] for start in range(0, len(pool) - k + 1, k)] or [pool]
    right = 0
    for group in groups:
        cands = [Candidate(i, "", e["key"], e["score"], 0.0, True) for i, e in enumerate(group)]
        pick = choose(cands, select)  # answers are already keys: no task needed to vote
        right += pick is not None and group[pick.node]["correct"]
    return right / len(groups)


def sample_counts(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n, and n itself."""
    ks = [2**i for i in range(int(np.log2(n)) + 1)] if n >= 1 else []
    return ks + [n] * (bool(ks) and ks[-1] != n)


def coverage(pools: dict[str, tuple[str, list[list[dict]]]]) -> dict[int, dict[str, float]]:
    """{k: {"pass_at_k": ..., label: selected@k, ...}} for k = 1, 2, 4, ..., N.

    pools: per label (e.g. "majority"), (its selection rule, per problem the pool's entries).
    Rows of one search share their chains: pass@k is read off the first label's pools.
    """
    if not pools:
        return {}
    first = next(iter(pools.values()))[1]
    n = max((len(pool) for pool in first), default=0)
    table = {}
    for k in sample_counts(n):
        row = {"pass_at_k": float(np.mean([pass_at_k(len(p), sum(e["correct"] for e in p), k) for p in first]))}
        for label, (select, problems) in pools.items():
            row[label] = float(np.mean([selected_at_k(pool, select, k) for pool in problems]))
        table[k] = row
    return table


def coverage_lines(table: dict[int, dict[str, float]]) -> list[str]:
    """The coverage table as text lines (accuracies in %), one per k."""
    if not table:
        return []
    labels = list(next(iter(table.values())))
    lines = [f"{'k':>4} " + " ".join(f"{label:>14}" for label in labels)]
    lines += [f"{k:>4} " + " ".join(f"{100 * row[label]:>13.1f}%" for label in labels) for k, row in table.items()]
    return lines


def plot_coverage(table: dict[int, dict[str, float]], path: Path, title: str,
                  baselines: dict[str, float] | None = None) -> None:
    """pass@k and each rule's selected accuracy against k (log2 x), written to `path` (PNG) whole.

    baselines: horizontal reference lines, e.g. {"greedy": accuracy}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(table)
    fig, ax = plt.subplots(figsize=(9.0, 5.5), dpi=120)
    for label in next(iter(table.values())):
        coverage_line = label == "pass_at_k"
        ax.plot(ks, [100 * table[k][label] for k in ks], marker="o", label="pass@k (coverage)" if coverage_line
                else f"{label} selection", color="black" if coverage_line else None, linewidth=2.5 if coverage_line
                else 1.5)
    for name, accuracy in (baselines or {}).items():
        ax.axhline(100 * accuracy, color="gray", linestyle=":", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("samples per problem k (log scale)")
    ax.set_ylabel("accuracy on held-out problems (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    fig.tight_layout()
    with atomic_path(path, mode=0o644) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
