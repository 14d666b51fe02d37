"""Outcome (ORM) and process (PRM) reward models: build data, train, score, evaluate.

    policy = load_policy("runs/small")                                     # train.policy
    build_reward_data(policy, plan_problems(policy.cfg.data.mixture, 400, start=100_000), "prm.jsonl",
                      LabelSettings(samples=8))
    result = train_reward_model("prm.jsonl", "runs/small-prm", policy="runs/small", kind="prm")
    metrics = evaluate_reward_model("runs/small-prm", "prm-test.jsonl")      # AUC, best-of-N vs majority
    # search with it: search.scorer=reward search.reward_checkpoint=runs/small-prm

A reward model is a ponder transformer with `model.value_head: true`, initialised from the
policy's checkpoint (its value head fresh) or from scratch, trained by the ordinary trainer
(`data.objective: reward`: train/reward_data.py's `RewardData` stream, the value head's
binary cross-entropy in train/step.py), so it has the same sharding, checkpoints, resume and
metrics as any run. Its score of a chain's step is sigmoid(value) at the step's last token:
the newline, or the answer line's EOS (`search.scorers.RewardModelScorer` reads the same
positions incrementally from the search tree's pages).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from configs.fileio import run_path, write_atomic
from configs.load import load_config
from configs.schema import Config
from model.distributed import host_values
from train.checkpoint import find_run_config
from train.reward_data import RewardRecord, held_out, read_reward_records, record_tokens
from train.reward_labels import LabelSettings, build_reward_data

AGGREGATES = ("min", "last", "product")
EVAL_FILE = "reward_eval.json"

__all__ = ["AGGREGATES", "LabelSettings", "RewardModel", "auc", "build_reward_data", "evaluate",
           "evaluate_reward_model", "load_reward_model", "reward_config",
           "score_records", "train_reward_model", "within_problem_auc"]


def _quoted(value: Any) -> str:
    return json.dumps(str(value))  # a YAML-safe scalar for a key=value override, whatever the path holds


def reward_config(data: str | Path, run_dir: str | Path, *, policy: str | Path | None = None,
                  config: str | Path | None = None, kind: str = "prm", overrides: tuple[str, ...] = ()) -> Config:
    """The config of a reward-model run on `data`: `config` (default: the policy run's config.yaml)
    with the value head on, `data.objective: reward`, and params from `policy` (None: from scratch).

    `overrides` (dotted key=value) come last, e.g. ("train.steps=200", "optimizer.learning_rate=1e-3").
    """
    if config is None:
        if policy is None:
            raise ValueError("give a config, or a policy run whose config.yaml to start from")
        config = find_run_config(run_path(policy))
        if config is None:
            raise FileNotFoundError(f"no config.yaml in {policy} or the run directory above it")
    settings = ["data.objective=reward", "model.value_head=true", f"reward.data={_quoted(Path(data).absolute())}",
                f"reward.kind={kind}", f"train.run_dir={_quoted(run_dir)}",
                f"train.init_from={_quoted(policy) if policy is not None else 'null'}"]
    return load_config(config, [*settings, *overrides])


def train_reward_model(data: str | Path, run_dir: str | Path, *, policy: str | Path | None = None,
                       config: str | Path | None = None, kind: str = "prm", overrides: tuple[str, ...] = (),
                       show_progress: bool = True) -> dict[str, Any]:
    """Trains (or resumes) a PRM/ORM on `data` into `run_dir`, then evaluates it on the held-out problems.

    Returns {"train": the trainer's last metrics, "eval": `evaluate` on the records held out
    by reward.eval_fraction (also written to run_dir/reward_eval.json; {} if none are), "run_dir"}.
    `run_dir` is what `search.reward_checkpoint` takes.
    """
    from train.trainer import train

    cfg = reward_config(data, run_dir, policy=policy, config=config, kind=kind, overrides=overrides)
    result = train(cfg, show_progress=show_progress)
    records = [r for r in read_reward_records(data) if held_out(r.problem.id, cfg.reward.eval_fraction)]
    metrics = evaluate_reward_model(run_dir, records) if records else {}
    if metrics and jax.process_index() == 0:
        write_atomic(run_path(run_dir) / EVAL_FILE, json.dumps(metrics, indent=1) + "\n")
    return {"train": result, "eval": metrics, "run_dir": str(run_dir)}


# -- scoring --


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A loaded reward-model run: config, model structure, params on `mesh`, vocabulary."""

    cfg: Config
    graphdef: Any
    params: Any
    mesh: Any
    vocab: Any


def load_reward_model(checkpoint: str | Path, mesh=None) -> RewardModel:
    """The newest readable params of a reward-model run (dir, checkpoints/ or step dir) and its config.

    The params are laid out on `mesh` (default: the mesh the run's own config describes).
    """
    from model.sharding import make_mesh
    from train.checkpoint import load_params
    from train.data import get_vocabulary
    from train.state import state_layout

    checkpoint = run_path(checkpoint)
    config = find_run_config(checkpoint) if checkpoint.is_dir() else None
    if config is None:
        raise FileNotFoundError(f"{checkpoint}: not a run directory with config.yaml (or its checkpoints)")
    cfg = load_config(config)
    if not cfg.model.value_head:
        raise ValueError(f"{checkpoint}: its model has no value head (model.value_head): not a reward model")
    mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    layout = state_layout(cfg, mesh)
    params = load_params(checkpoint, layout.abstract["params"])
    return RewardModel(cfg, layout.graphdef, params, mesh, get_vocabulary(cfg.data.vocab))


def search_scorer(cfg: Config, vocab, mesh) -> tuple[Any, Any]:
    """(scorer, its params) of `cfg.search.scorer` for a search with `cfg`'s policy on `mesh`.

    `reward` loads the reward model of search.reward_checkpoint, which must share the policy's
    vocabulary and fit search.max_len (ValueError otherwise); the other scorers have no params.
    """
    from search.scorers import make_scorer

    if cfg.search.scorer != "reward":
        return make_scorer(cfg.search.scorer, vocab=vocab), None
    path = run_path(cfg.search.reward_checkpoint)
    try:
        reward = load_reward_model(path, mesh)
    except FileNotFoundError as err:
        raise ValueError(f"search.reward_checkpoint: {err}") from None
    if reward.cfg.data.vocab != cfg.data.vocab or reward.cfg.model.max_seq_len < cfg.search.max_len:
        raise ValueError(f"search.reward_checkpoint {path}: needs the policy's vocabulary ({cfg.data.vocab}) and "
                         f"model.max_seq_len >= search.max_len ({cfg.search.max_len})")
    return make_scorer("reward", reward_graphdef=reward.graphdef, reward_cfg=reward.cfg.model), reward.params


@dataclasses.dataclass(frozen=True)
class RecordScores:
    """A record's reward-model scores: at each step's newline, at the answer's EOS, at the last token."""

    steps: np.ndarray  # [num_steps] float
    answer: float | None
    final: float | None  # None: no completion token to score


@functools.partial(jax.jit, static_argnums=0)
def _token_scores(graphdef, params, tokens):
    """sigmoid(value) at every position of tokens [R, T] (right padding cannot reach earlier positions)."""
    model = nnx.merge(graphdef, params)
    return jax.nn.sigmoid(model.value(model.hidden(tokens)))


def score_records(model: RewardModel, records: list[RewardRecord], *, rows: int = 32,
                  multiple: int = 64) -> list[RecordScores]:
    """Scores every record with a dense forward pass, `rows` at a time at one padded width."""
    encoded = [record_tokens(r, model.vocab) for r in records]
    width = -(-max(len(ids) for ids, _, _ in encoded) // multiple) * multiple
    out = []
    for start in range(0, len(encoded), rows):
        chunk = encoded[start : start + rows]
        tokens = np.zeros((rows, width), np.int32)
        for row, (ids, _, _) in enumerate(chunk):
            tokens[row, : len(ids)] = ids
        with jax.set_mesh(model.mesh):
            values = host_values(_token_scores(model.graphdef, model.params, tokens))
        for row, (ids, step_ends, answer_end) in enumerate(chunk):
            answer = float(values[row, answer_end[0]]) if answer_end else None
            has_completion = bool(step_ends or answer_end)
            out.append(RecordScores(values[row, step_ends].astype(np.float64), answer,
                                    float(values[row, len(ids) - 1]) if has_completion else None))
    return out


class ChainScorer:
    """A reward model scoring whole chains of text, a dense forward pass each (for rescoring search candidates).

    A chain's score is the model's at its answer line's EOS, else at its last token (0: empty).
    The first call at each padded width compiles: its seconds are reported apart.
    """

    def __init__(self, model: RewardModel, rows: int = 64, multiple: int = 64):
        self.model, self.rows, self.multiple = model, rows, multiple
        self.widths: set[int] = set()  # padded widths (in multiples) the forward was compiled for

    def __call__(self, chains: list[tuple[Any, str]]) -> tuple[list[float], float, float]:
        """(score of each (problem, completion), seconds scoring, seconds compiling)."""
        from tasks.base import completion_steps, final_answer

        records = [RewardRecord(problem, i, text, tuple(completion_steps(text)), final_answer(text), (), 0.0, "none")
                   for i, (problem, text) in enumerate(chains)]
        compile_seconds = 0.0
        if records:
            lengths = [len(record_tokens(r, self.model.vocab)[0]) for r in records]
            longest = int(np.argmax(lengths))
            width = -(-lengths[longest] // self.multiple)
            if width not in self.widths:  # the first call at a width compiles: time it apart
                start = time.perf_counter()
                score_records(self.model, [records[longest]], rows=self.rows, multiple=self.multiple)
                compile_seconds = time.perf_counter() - start
                self.widths.add(width)
        start = time.perf_counter()
        scores = score_records(self.model, records, rows=self.rows, multiple=self.multiple) if records else []
        seconds = time.perf_counter() - start
        return [s.answer if s.answer is not None else (s.final or 0.0) for s in scores], seconds, compile_seconds


# -- evaluation --


def auc(scores, labels) -> float:
    """Area under the ROC curve (ties count half); NaN when one class is absent."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if not positives or not negatives:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, averaged over ties
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def chain_score(scores: RecordScores, aggregate: str) -> float:
    """A chain's score from its step scores (the answer's included), as the search aggregates a path."""
    values = list(scores.steps) + ([scores.answer] if scores.answer is not None else [])
    if not values:
        return 0.0
    return {"min": min, "last": lambda v: v[-1], "product": lambda v: float(np.prod(v))}[aggregate](values)


def evaluate(records: list[RewardRecord], scores: list[RecordScores]) -> dict[str, Any]:
    """Step-label AUC / accuracy, outcome AUC, best-of-N selection accuracy against majority vote,
    and the within-problem AUC of the chain scores (`within_problem_auc`).

    Records of one problem are its N candidates. `single` is the mean accuracy of one sample;
    `majority` the vote over answers; `best_<agg>` the candidate with the best chain score and
    `weighted_<agg>` the score-weighted vote (agg: min, last, product of the step scores, the
    answer line's included); `pass_at_n` any correct candidate (the ceiling). Step labels count
    as right when >= 0.5. Votes count answers by the task's `answer_key`, as `ponder search` does.
    """
    from search.candidates import Candidate, choose

    step_scores = np.concatenate([s.steps for s in scores]) if scores else np.zeros(0)
    step_truth = np.array([label >= 0.5 for r in records for label in r.labels], bool)
    finals = [(s.final, r.outcome) for r, s in zip(records, scores, strict=True) if s.final is not None]
    metrics: dict[str, Any] = {
        "records": len(records),
        "steps": int(step_truth.size),
        "step_positive_rate": float(step_truth.mean()) if step_truth.size else float("nan"),
        "step_auc": auc(step_scores, step_truth),
        "step_accuracy": float(np.mean((step_scores > 0.5) == step_truth)) if step_truth.size else float("nan"),
        "outcome_auc": auc([f for f, _ in finals], [o == 1.0 for _, o in finals]),
        "outcome_accuracy": float(np.mean([(f > 0.5) == (o == 1.0) for f, o in finals])) if finals else float("nan"),
    }
    by_problem: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_problem[record.problem.id].append(i)
    picks: dict[str, list[float]] = defaultdict(list)
    for indices in by_problem.values():
        problem = records[indices[0]].problem
        picks["single"].append(float(np.mean([records[i].outcome for i in indices])))
        picks["pass_at_n"].append(max(records[i].outcome for i in indices))
        for rule, aggregate in [("majority", "last"), *((r, a) for r in ("best", "weighted") for a in AGGREGATES)]:
            cands = [Candidate(i, records[i].completion, records[i].answer, chain_score(scores[i], aggregate), 0.0,
                               True) for i in indices]
            pick = choose(cands, rule, problem)
            name = rule if rule == "majority" else f"{rule}_{aggregate}"
            picks[name].append(records[pick.node].outcome if pick is not None and pick.answer is not None else 0.0)
    metrics["problems"] = len(by_problem)
    metrics["samples_per_problem"] = float(np.mean([len(v) for v in by_problem.values()])) if by_problem else 0.0
    metrics |= {name: float(np.mean(values)) for name, values in picks.items()}
    metrics |= within_problem_auc(records, scores, by_problem)
    return metrics


def within_problem_auc(records: list[RewardRecord], scores: list[RecordScores],
                       by_problem: dict[str, list[int]]) -> dict[str, Any]:
    """How often the chain score ranks a right candidate above a wrong one *of the same problem* (ties half).

    What search needs: the pooled step AUC also rewards telling easy problems from hard ones,
    which picks nothing among one problem's candidates. `within_pairs` counts the (right, wrong)
    pairs; `within_auc_<agg>` is NaN when no problem has both.
    """
    chains = {aggregate: [chain_score(s, aggregate) for s in scores] for aggregate in AGGREGATES}
    wins = {aggregate: 0.0 for aggregate in AGGREGATES}
    pairs = 0
    for indices in by_problem.values():
        right = [records[i].outcome == 1.0 for i in indices]
        problem_pairs = sum(right) * (len(right) - sum(right))
        if not problem_pairs:
            continue
        pairs += problem_pairs
        for aggregate, chain in chains.items():  # one problem's AUC is its share of (right, wrong) pairs won
            wins[aggregate] += auc([chain[i] for i in indices], right) * problem_pairs
    return {"within_pairs": pairs} | {f"within_auc_{aggregate}": wins[aggregate] / pairs if pairs else float("nan")
                                      for aggregate in AGGREGATES}


def evaluate_reward_model(checkpoint: str | Path, data: str | Path | list[RewardRecord], *,
                          rows: int = 32) -> dict[str, Any]:
    """`evaluate` of the reward model at `checkpoint` on a reward data file (or records)."""
    records = read_reward_records(data) if isinstance(data, (str, Path)) else list(data)
    model = load_reward_model(checkpoint)
    metrics = evaluate(records, score_records(model, records, rows=rows))
    return {"kind": model.cfg.reward.kind} | metrics
