"""On the host, after a search: the candidate chains read off the tree, and the answer chosen among them.

`candidates` decodes each problem's finished chains (every finished node for strategies that
keep them, e.g. beam; the chosen leaves otherwise) with their path score and log-prob;
`choose` picks the answer by majority vote, the best score, or a score-weighted vote, counting
votes by the task's `answer_key`, as every vote over answers in ponder does; `pick_answer`
also verifies the pick.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from search.sampler import decode_text
from search.spec import STRATEGIES, SearchSpec
from search.state import SearchState, path_score
from search.tree import path_nodes, path_tokens
from tasks import get_task
from tasks.base import Problem, final_answer


@dataclasses.dataclass
class Candidate:
    """One chain of a problem's search: its end node, text and answer (None: no answer line)."""

    node: int
    text: str
    answer: str | None
    score: float  # path score under the spec's aggregation
    logprob: float  # sum of the path's step log-probs
    finished: bool


def candidates(spec: SearchSpec, state: SearchState, chosen: jax.Array, vocab) -> list[list[Candidate]]:
    """Per problem, its finished chains (every terminal node for beam/dvts; the chosen leaves [B, C] otherwise)."""
    tree = jax.tree.map(np.asarray, state.tree)
    scores = np.asarray(path_score(spec, state.tree))
    out = []
    for b in range(tree.parent.shape[0]):
        if STRATEGIES[spec.strategy].keeps_finished:
            count = int(tree.node_count[b])
            nodes = [n for n in range(1, count) if tree.terminal[b, n]]
            nodes += [int(n) for n in np.asarray(chosen[b]) if n >= 0 and not tree.terminal[b, n]]
        else:
            nodes = [int(n) for n in np.asarray(chosen[b]) if n >= 0]
        row = []
        for n in nodes:
            text = decode_text(vocab, path_tokens(tree, b, n))
            logprob = float(sum(tree.prior[b, m] for m in path_nodes(tree, b, n)))
            row.append(Candidate(n, text, final_answer(text), float(scores[b, n]), logprob, bool(tree.terminal[b, n])))
        out.append(row)
    return out


def choose(cands: list[Candidate], rule: str, problem: Problem | None = None) -> Candidate | None:
    """The answer: `majority` (self-consistency), `best` (highest score) or `weighted` (score-weighted vote).

    Candidates without an answer never win a vote; ties go to the higher total score. Votes
    count answers by `problem`'s task's `answer_key` (e.g. countdown's `3 + 4` and `4 + 3` are
    one answer); without a problem, by their text.
    """
    canonical = (lambda answer: answer) if problem is None else functools.partial(
        get_task(problem.task).answer_key, problem)
    answered = [c for c in cands if c.answer is not None]
    if not answered:
        return cands[0] if cands else None
    if rule == "best":
        return max(answered, key=lambda c: c.score)
    weights: dict[str, float] = {}
    totals: dict[str, float] = {}
    for c in answered:
        key = canonical(c.answer)
        weights[key] = weights.get(key, 0.0) + (1.0 if rule == "majority" else c.score)
        totals[key] = totals.get(key, 0.0) + c.score
    if rule not in ("majority", "weighted"):
        raise ValueError(f"unknown selection rule {rule!r}; expected majority, best or weighted")
    winner = max(weights, key=lambda key: (weights[key], totals[key]))
    return max((c for c in answered if canonical(c.answer) == winner), key=lambda c: c.score)


def pick_answer(problem: Problem, cands: list[Candidate], select: str) -> tuple[Candidate | None, bool | None]:
    """The candidate `choose` picks by rule `select`, and whether the verifier accepts it (None: no reference)."""
    pick = choose(cands, select, problem)
    correct = get_task(problem.task).score(problem, pick.text if pick else "")[0] == 1.0 if problem.answer else None
    return pick, correct
