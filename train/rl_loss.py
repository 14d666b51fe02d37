"""The RL objectives as pure functions: group-relative advantages, KL estimators, the clipped policy loss.

    advantages = group_advantages(rewards, std_normalize=True)          # [P, G] -> [P, G]
    sums = policy_loss_sums(logp, old_logp, ref_logp, adv, mask, settings)   # per-token arrays [B, T]

Losses come back as (sum, denominator) pairs so that microbatches accumulate exactly: the
step divides the summed gradient by the summed denominator, whatever the split.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """Static settings of the policy loss (hashable: closed over by the jitted step)."""

    objective: str = "grpo"  # grpo: clipped ratio x advantage; sft: weighted NLL (expert iteration)
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # None: clip_eps
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    aggregation: str = "token"

    def __post_init__(self):
        if self.objective not in ("grpo", "sft"):
            raise ValueError(f"objective must be grpo or sft, got {self.objective!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")


def group_advantages(rewards: jax.Array, *, std_normalize: bool = True, eps: float = 1e-6) -> jax.Array:
    """(r - mean of its group) [/ (population std of the group + eps)]. rewards: [P, G] -> [P, G] float32.

    A group whose rewards are all equal gets zero advantages (it carries no signal).
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    centred = rewards - rewards.mean(axis=-1, keepdims=True)
    if not std_normalize:
        return centred
    return centred / (rewards.std(axis=-1, keepdims=True) + eps)


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy.

    With log_ratio = ref_logp - logp (Schulman, "Approximating KL divergence"): k1 = -log_ratio
    (unbiased, can be negative), k2 = log_ratio^2 / 2, k3 = exp(log_ratio) - 1 - log_ratio
    (unbiased and never negative: what GRPO uses).
    """
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * jnp.square(log_ratio)
    if estimator == "k3":
        return jnp.exp(log_ratio) - 1.0 - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def aggregate(per_token: jax.Array, mask: jax.Array, aggregation: str) -> tuple[jax.Array, jax.Array]:
    """(sum, denominator) of a masked per-token quantity [B, T]: the loss is sum / denominator.

    token: over every masked token of the batch (sum of the mask); sequence: each row's mean
    over its tokens, summed over rows that have any (the number of such rows).
    """
    if aggregation == "token":
        return jnp.sum(per_token * mask), jnp.sum(mask)
    lengths = jnp.sum(mask, axis=-1)
    row_means = jnp.sum(per_token * mask, axis=-1) / jnp.maximum(lengths, 1.0)
    return jnp.sum(row_means), jnp.sum((lengths > 0).astype(jnp.float32))


def clipped_surrogate(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, clip_low: float,
                      clip_high: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PPO's per-token loss -min(ratio * A, clip(ratio, 1 - low, 1 + high) * A), and where the clip binds.

    logp, old_logp: [B, T]; advantages: [B] (one per completion, shared by its tokens).
    Returns (loss [B, T], clipped [B, T] float: the clipped term is the smaller one and
    differs, so the token gives no gradient, ratio [B, T]).
    """
    ratio = jnp.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = clipped_ratio * adv
    binds = ((adv > 0) & (ratio > 1.0 + clip_high)) | ((adv < 0) & (ratio < 1.0 - clip_low))
    return -jnp.minimum(unclipped, clipped), binds.astype(jnp.float32), ratio


def policy_loss_sums(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array, advantages: jax.Array,
                     weights: jax.Array, mask: jax.Array, settings: LossSettings) -> dict[str, jax.Array]:
    """Sums for one (micro)batch: `loss` and its `denominator`, and metric sums over the masked tokens.

    logp (differentiable), old_logp, ref_logp, mask: [B, T] (mask: completion tokens, float);
    advantages, weights: [B]. grpo: clipped surrogate + kl_coef * KL; a row of weight 0 is left
    out. sft (expert iteration): NLL of the rows of weight > 0, weighted, + kl_coef * KL.
    Metric sums (divide by `tokens`): kl, clipped, ratio.
    """
    mask = mask * (weights[:, None] > 0)
    kl = kl_penalty(logp, ref_logp, settings.kl_estimator)
    if settings.objective == "grpo":
        high = settings.clip_eps if settings.clip_eps_high is None else settings.clip_eps_high
        surrogate, clipped, ratio = clipped_surrogate(logp, old_logp, advantages, settings.clip_eps, high)
    else:
        surrogate = -logp * weights[:, None]
        clipped, ratio = jnp.zeros_like(logp), jnp.exp(logp - old_logp)
    per_token = surrogate + settings.kl_coef * kl if settings.kl_coef else surrogate
    loss, denominator = aggregate(per_token, mask, settings.aggregation)
    stop = jax.lax.stop_gradient
    return {
        "loss": loss,
        "denominator": denominator,
        "tokens": jnp.sum(mask),
        "kl": jnp.sum(stop(kl) * mask),
        "clipped": jnp.sum(clipped * mask),
        "ratio": jnp.sum(stop(ratio) * mask),
    }


def token_logprobs_and_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(target) [B, T] and the entropy of each position's distribution [B, T] from logits [B, T, V]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target_logp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return target_logp, entropy
