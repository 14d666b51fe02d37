"""The jitted train and eval steps: masked next-token loss (or a reward head's BCE), gradient accumulation,
non-finite guard.

Both are pure functions of (state, batch) and are compiled ahead of time with explicit
in/out shardings on the mesh; the train step donates the state it replaces.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.losses import chunked_token_loss
from model.sharding import Rules, batch_sharding, constrain
from train.optim import apply_gradients, zero_gradients
from train.state import StateLayout, TrainState

BATCH_FEATURES = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
# data.objective: reward (train/reward.py): float `labels` in [0, 1] where `label_mask` is 1.
REWARD_FEATURES = ("tokens", "labels", "label_mask", "segment_ids", "positions")
FLOAT_FEATURES = ("loss_mask", "labels", "label_mask")


def token_losses(graphdef: nnx.GraphDef, params: dict, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of masked token losses, sum of the mask, masked count of correct argmax predictions)."""
    model = nnx.merge(graphdef, params)
    mask = batch["loss_mask"]
    if model.cfg.loss_vocab_chunk:  # blocks over the vocabulary: no [B, T, V] float32 logits at once
        hidden = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"])
        nll, correct = chunked_token_loss(hidden, model.output_head(), batch["targets"], model.cfg.loss_vocab_chunk)
        return jnp.sum(nll * mask), jnp.sum(mask), jnp.sum(correct.astype(jnp.float32) * mask)
    logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_log_probs = jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return -jnp.sum(target_log_probs * mask), jnp.sum(mask), jnp.sum(correct * mask)


def reward_losses(graphdef: nnx.GraphDef, params: dict, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Binary cross-entropy of the value head at label positions (soft labels allowed).

    (sum of masked BCE, sum of `label_mask`, masked count of sigmoid(value) > 0.5 agreeing
    with label > 0.5). The LM head is never run.
    """
    model = nnx.merge(graphdef, params)
    values = model.value(model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"]))  # [B, T] float32
    labels, mask = batch["labels"], batch["label_mask"]
    bce = jax.nn.softplus(values) - labels * values  # -[y log sigmoid(v) + (1 - y) log(1 - sigmoid(v))]
    correct = ((values > 0) == (labels > 0.5)).astype(jnp.float32)
    return jnp.sum(bce * mask), jnp.sum(mask), jnp.sum(correct * mask)


LOSSES = {"lm": (token_losses, BATCH_FEATURES), "reward": (reward_losses, REWARD_FEATURES)}


def loss_kind(objective: str) -> str:
    """The loss a `data.objective` trains with: `reward` for reward models, else the LM loss."""
    return "reward" if objective == "reward" else "lm"


def make_train_step(layout: StateLayout, schedule: optax.Schedule, microbatches: int, rules: Rules,
                    loss: str = "lm"):
    """The train step: grads summed over `microbatches` slices (lax.scan), normalised by all loss tokens.

    `loss` is `lm` (masked next-token loss) or `reward` (value-head BCE at label positions).
    A step whose loss or gradient norm is not finite leaves params and optimizer state
    unchanged (the step counter still advances with the data) and reports `finite = 0`.
    """
    losses = LOSSES[loss][0]

    def loss_sums(params, batch):
        loss_sum, count, correct = losses(layout.graphdef, params, batch)
        return loss_sum, (count, correct)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        params = state["params"]

        def split(x):  # [B, ...] -> [M, B/M, ...]; microbatch m takes rows m, m+M, ... so each is spread over devices
            x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
            return constrain(x, (None, "batch", "length")[: x.ndim], rules)

        def accumulate(carry, micro):
            grads, loss_sum, count, correct = carry
            (m_loss, (m_count, m_correct)), m_grads = jax.value_and_grad(loss_sums, has_aux=True)(params, micro)
            grads = jax.tree.map(lambda g, m: g + m.astype(g.dtype), grads, m_grads)
            return (grads, loss_sum + m_loss, count + m_count, correct + m_correct), None

        carry = (zero_gradients(params, state["opt_state"]), jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
        (grads, loss_sum, count, correct), _ = jax.lax.scan(accumulate, carry, jax.tree.map(split, batch))
        denominator = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        loss, grad_norm = loss_sum / denominator, optax.tree.norm(grads)

        new_params, opt_state = apply_gradients(layout.optimizer, grads, state["opt_state"], params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = {
            "params": jax.tree.map(keep, new_params, params),
            "opt_state": jax.tree.map(keep, opt_state, state["opt_state"]),
            "step": state["step"] + 1,
        }
        metrics = {
            "loss": loss,
            "accuracy": correct / denominator,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
            "loss_tokens": count,
            "finite": finite.astype(jnp.float32),
        }
        return new_state, metrics

    return train_step


def make_eval_step(layout: StateLayout, loss: str = "lm"):
    """Sums of loss, mask and correct predictions over one batch (the caller divides)."""
    losses = LOSSES[loss][0]

    def eval_step(params: dict, batch: dict) -> dict:
        loss_sum, count, correct = losses(layout.graphdef, params, batch)
        return {"loss_sum": loss_sum, "count": count, "correct": correct}

    return eval_step


def abstract_batch(mesh: Mesh, rules: Rules, batch_size: int, seq_len: int, loss: str = "lm") -> dict:
    """ShapeDtypeStructs of a global batch (the features `loss` reads), sharded over the batch axes."""
    sharding = batch_sharding(mesh, rules, (batch_size, seq_len))
    dtypes = {name: jnp.float32 if name in FLOAT_FEATURES else jnp.int32 for name in LOSSES[loss][1]}
    shape = (batch_size, seq_len)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for name, dtype in dtypes.items()}


def compile_steps(layout: StateLayout, schedule, mesh: Mesh, rules: Rules, batch_size: int, seq_len: int,
                  microbatches: int, loss: str = "lm"):
    """Lowers and compiles (ahead of time) the train and eval steps; returns them and the seconds taken."""
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = abstract_batch(mesh, rules, batch_size, seq_len, loss)
    batch_shardings = {name: spec.sharding for name, spec in batch.items()}
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        train = jax.jit(
            make_train_step(layout, schedule, microbatches, rules, loss),
            in_shardings=(layout.shardings, batch_shardings),
            out_shardings=(layout.shardings, replicated),
            donate_argnums=(0,),
        ).lower(layout.abstract, batch).compile()
        evaluate = jax.jit(
            make_eval_step(layout, loss),
            in_shardings=(layout.shardings["params"], batch_shardings),
            out_shardings=replicated,
        ).lower(layout.abstract["params"], batch).compile()
    return train, evaluate, time.perf_counter() - start
