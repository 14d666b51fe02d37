"""From a step's scored rollouts to what the learner trains on: chosen rows, then `TrainExamples`.

    rows = choose_rows(rollouts, cfg.rl)                 # advantages / weights, the groups kept
    rows = rows.with_chains(chains, found)               # expert iteration's search chains, if any
    examples = build_examples(rows, vocab, learner, params, reference) if rows.trainable(cfg.rl) else None

`choose_rows` is the algorithm's view of the rewards: GRPO gives each sample its advantage
within its group, expert iteration weights the verified ones; with rl.oversample > 1 only
rl.prompts_per_step groups are kept, those with a signal first. `TrainExamples` is the one
record a learner update reads (Tunix's `TrainExample`): token rows, loss mask, advantages,
weights and the old-policy and reference log-probs, all host arrays of one width.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from configs.schema import RLConfig
from model.distributed import host_values
from tasks.base import Problem
from train.rl_loss import group_advantages
from train.rl_rollout import GroupRollouts, sequences

if TYPE_CHECKING:
    from train.rl_learner import Learner, ReferenceModel


def kept_groups(informative: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` groups to train on, in stream order: informative groups first.

    With rl.oversample = 1 that is every group. With more, the first `count` groups that carry
    a signal (GRPO: rewards not all equal; expert iteration: a verified completion), topped up
    with uniform ones when too few do, so the learner's batch keeps its shape (DAPO's dynamic
    sampling, without re-sampling).
    """
    order = np.argsort(~informative, kind="stable")[:count]
    return np.sort(order)


@dataclasses.dataclass(frozen=True)
class ChosenRows:
    """The rows a step trains on, before tokenizing: the kept groups' samples, then any search chains.

    advantages, weights: [R] float32; sampler_logprobs: [S, N], the sampler's log-probs of the
    first S = `sampled` rows (the samples); informative: [G] bool over every sampled group;
    items: the kept groups' (stream index, problem), in stream order.
    """

    prompts: list[str]
    completions: list[np.ndarray]
    advantages: np.ndarray
    weights: np.ndarray
    sampler_logprobs: np.ndarray
    informative: np.ndarray
    kept: np.ndarray
    items: list[tuple[int, Problem]]

    @property
    def sampled(self) -> int:
        """How many of the rows are samples (the rest are search chains)."""
        return len(self.sampler_logprobs)

    def with_chains(self, chains: list[np.ndarray], found: np.ndarray) -> ChosenRows:
        """These rows plus one search chain per kept group (advantage 0, weight 1 where it verified)."""
        return dataclasses.replace(
            self, prompts=self.prompts + [p.prompt for _, p in self.items], completions=self.completions + chains,
            advantages=np.concatenate([self.advantages, np.zeros(len(self.items), np.float32)]),
            weights=np.concatenate([self.weights, found.astype(np.float32)]))

    def trainable(self, rl: RLConfig) -> bool:
        """Whether an update can learn anything (EI: a verified row; GRPO: a non-zero advantage or a KL term).

        Without, no optimizer step runs, so Adam's momentum does not move the params on a zero gradient.
        """
        if rl.algorithm != "grpo":
            return bool(self.weights.sum() > 0)
        return bool(np.any(self.advantages != 0) or rl.kl_coef > 0)


def choose_rows(rollouts: GroupRollouts, rl: RLConfig) -> ChosenRows:
    """Advantages (GRPO) or weights (expert iteration) of the samples, and the rl.prompts_per_step groups kept."""
    groups, scored, out = rollouts.group_size, rollouts.scored, rollouts.rollouts
    if rl.algorithm == "grpo":
        advantages = np.asarray(group_advantages(scored.reward.reshape(-1, groups), std_normalize=rl.std_normalize))
        advantages, weights = advantages.reshape(-1), np.ones(len(rollouts.problems), np.float32)
        informative = (advantages.reshape(-1, groups) != 0).any(axis=1)
    else:
        advantages = np.zeros(len(rollouts.problems), np.float32)
        weights = (scored.correct & out.finished).astype(np.float32)
        informative = weights.reshape(-1, groups).any(axis=1)
    kept = kept_groups(informative, rl.prompts_per_step)
    rows = (kept[:, None] * groups + np.arange(groups)[None, :]).reshape(-1)
    return ChosenRows(prompts=[rollouts.problems[r].prompt for r in rows],
                      completions=[out.tokens[r, : out.num[r]] for r in rows],
                      advantages=advantages[rows], weights=weights[rows], sampler_logprobs=out.logprobs[rows],
                      informative=informative, kept=kept, items=[rollouts.items[g] for g in kept])


@dataclasses.dataclass(frozen=True)
class TrainExamples:
    """What one learner update trains on (host arrays, R rows of width W).

    tokens, targets: [R, W] int32; loss_mask: [R, W] float32 (the completion's positions);
    advantages, weights: [R] float32; old_logprobs, ref_logprobs: [R, W] float32, log p(target)
    under the policy that sampled (before this update) and under the frozen reference.
    """

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    advantages: np.ndarray
    weights: np.ndarray
    old_logprobs: np.ndarray
    ref_logprobs: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.tokens)

    def features(self) -> dict[str, np.ndarray]:
        """The learner's batch: one array per feature name."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


def build_examples(rows: ChosenRows, vocab, learner: Learner, params: Any, reference: ReferenceModel) -> TrainExamples:
    """Tokenizes `rows` at the narrowest learner width that holds them and adds old and reference log-probs.

    Columns run up to the last with a loss, in the learner's width buckets: the positions cut
    hold padding or a row's last token, whose prediction nothing trains, and attention is
    causal, so what the kept positions see is unchanged. `params`: the policy in the training layout.
    """
    batch = sequences(vocab, rows.prompts, rows.completions, learner.width)
    used = np.flatnonzero(batch["loss_mask"].any(axis=0))
    width = learner.batch_width(int(used[-1]) + 1 if used.size else 1)
    batch = {name: column[:, :width] for name, column in batch.items()}
    device_batch = learner.put({k: batch[k] for k in ("tokens", "targets")})
    old, ref = host_values((learner.logprobs(params, device_batch), reference.logprobs(device_batch)))
    return TrainExamples(**batch, advantages=rows.advantages.astype(np.float32), weights=rows.weights,
                         old_logprobs=old, ref_logprobs=ref)


def rollout_logprob_gap(examples: TrainExamples, rows: ChosenRows) -> float:
    """Mean |trainer - sampler| log-prob over the sampled rows' completion tokens (the two should agree)."""
    sampled = examples.loss_mask[: rows.sampled]
    placed = np.zeros(sampled.shape, np.float32)  # the sampler's [S, N] log-probs where the loss mask puts them
    for r in range(len(sampled)):
        positions = np.flatnonzero(sampled[r])
        placed[r, positions] = rows.sampler_logprobs[r, : len(positions)]
    return float(np.abs((examples.old_logprobs[: rows.sampled] - placed) * sampled).sum() / max(sampled.sum(), 1.0))
