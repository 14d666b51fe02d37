"""The optimizer: AdamW with warmup then decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax
from flax import traverse_util

from configs.schema import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then cosine / linear decay (or constant) until `total_steps`."""
    end = cfg.learning_rate * cfg.end_learning_rate_ratio
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.end_learning_rate_ratio)
    elif cfg.decay == "linear":
        after = optax.linear_schedule(cfg.learning_rate, end, decay_steps)
    else:
        after = optax.constant_schedule(cfg.learning_rate)
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def weight_decay_mask(cfg: OptimizerConfig, params: dict) -> dict:
    """True for parameters that get weight decay: matrices, and norms/embeddings only if asked."""

    def decays(path: tuple[str, ...]) -> bool:
        name = "/".join(str(p) for p in path)
        if name.endswith("scale"):  # RMSNorm scales
            return cfg.decay_norms
        if path[0] == "embed":
            return cfg.decay_embeddings
        return not name.endswith("/b")  # biases (the scalar head's) never decay

    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: decays(path) for path in flat})


def make_optimizer(cfg: OptimizerConfig, total_steps: int, params: dict) -> optax.GradientTransformation:
    """AdamW over a params pytree (nested dict), with clipping first when grad_clip_norm > 0."""
    mask = weight_decay_mask(cfg, params)
    adamw = optax.adamw(
        learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=mask,
    )
    clip = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
    return optax.chain(*clip, adamw)


def global_norm(tree) -> jax.Array:
    """The L2 norm of all leaves together."""
    return optax.tree.norm(tree)
