"""The optimizer: AdamW with warmup then decay, global-norm clipping and a weight-decay mask.

With `optimizer.master_weights` (for `model.param_dtype=bfloat16`) the optimizer keeps a
float32 master copy of the params and float32 moments; the bfloat16 params the model reads
are that master rounded after every step (`apply_gradients`), so small updates accumulate in
the master instead of vanishing in bfloat16 rounding.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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
    chain = optax.chain(*clip, adamw)
    return float32_master(chain) if cfg.master_weights else chain


class MasterState(NamedTuple):
    """Optimizer state with float32 master params: `master` mirrors the params tree, `inner` is the wrapped state."""

    master: Any
    inner: Any


def float32_master(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs `inner` on float32 copies of the params and gradients, whatever the params' storage dtype.

    Its updates are meant for `apply_gradients`, which reads the new params from the master
    copy; `optax.apply_updates` would round each update into the low-precision params instead.
    """

    def to_f32(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32), tree)

    def init(params):
        master = to_f32(params)
        return MasterState(master, inner.init(master))

    def update(grads, state, params=None):
        del params  # the master copy is what moves
        updates, inner_state = inner.update(to_f32(grads), state.inner, state.master)
        return updates, MasterState(optax.apply_updates(state.master, updates), inner_state)

    return optax.GradientTransformation(init, update)


def has_master(opt_state) -> bool:
    """Whether an optimizer state keeps float32 master params (`optimizer.master_weights`)."""
    return isinstance(opt_state, MasterState)


def zero_gradients(params: dict, opt_state) -> dict:
    """Zeros to accumulate gradients in: float32 when the optimizer keeps a master copy, else each param's dtype."""
    if has_master(opt_state):
        return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return jax.tree.map(jnp.zeros_like, params)


def apply_gradients(optimizer: optax.GradientTransformation, grads: dict, opt_state, params: dict):
    """One optimizer step: (new params, new optimizer state).

    With a master copy the new params are the updated master cast to each param's dtype;
    otherwise `params + updates` as optax applies them.
    """
    if not has_master(opt_state):
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    if has_master(opt_state):
        return jax.tree.map(lambda m, p: m.astype(p.dtype), opt_state.master, params), opt_state
    return optax.apply_updates(params, updates), opt_state


def global_norm(tree) -> jax.Array:
    """The L2 norm of all leaves together."""
    return optax.tree.norm(tree)
