"""Deterministic problem lists planned from a data mixture: what reward data, RL evaluation and the demo sample.

    problems = plan_problems(cfg.data.mixture, 200, split="validation", seed=cfg.seed)

A mixture's task components (`TASK_dN_STYLE`, parsed by `train.data.sources.Component`) share
the list by rate; each task generates its problems from (seed, index, difficulty, split), so
the same arguments always give the same problems.
"""

from __future__ import annotations

from tasks import get_task
from tasks.base import Problem
from train.data.sources import Component


def plan_problems(mixture: dict[str, float], num: int, *, split: str = "train", seed: int = 0,
                  start: int = 0) -> list[Problem]:
    """`num` problems of `split` shared out over the mixture's task components by rate (largest remainder).

    Component c contributes its problems start, start + 1, ... (generation is deterministic).
    """
    components = [(Component.parse(name), rate) for name, rate in mixture.items() if name != "text"]
    if not components:
        raise ValueError("the mixture has no reasoning-task component to sample problems from")
    total = sum(rate for _, rate in components)
    shares = [num * rate / total for _, rate in components]
    counts = [int(share) for share in shares]
    for i in sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])[: num - sum(counts)]:
        counts[i] += 1
    problems = []
    for (component, _), count in zip(components, counts, strict=True):
        task = get_task(component.task)
        problems += [task.generate(seed, start + i, component.difficulty, split) for i in range(count)]
    return problems
