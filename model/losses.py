"""The LM loss computed in blocks over the vocabulary, so no [B, T, V] float32 logits exist at once.

    nll, correct = chunked_token_loss(hidden, head, targets, chunk=8192)

For a 128K vocabulary the float32 logits of a training batch (and their gradient) dominate
memory. Here the vocabulary is scanned in `chunk`-wide blocks carrying a running max,
log-sum-exp, target logit and argmax; each block's body is rematerialised in the backward
pass, so only the carries and one block's logits live at a time. Same values as the dense
`log_softmax` loss (float32 accumulation) and the same first-maximum argmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_token_loss(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                       chunk: int) -> tuple[jax.Array, jax.Array]:
    """(negative log-likelihood [B, T] float32, argmax == target [B, T] bool).

    hidden: [B, T, E] (final-normed, compute dtype); head: [E, V] with V a multiple of
    `chunk`; targets: [B, T] int.
    """
    vocab = head.shape[-1]
    if vocab % chunk:
        raise ValueError(f"model.loss_vocab_chunk ({chunk}) must divide the vocabulary ({vocab})")
    blocks = head.astype(hidden.dtype).reshape(head.shape[0], vocab // chunk, chunk).transpose(1, 0, 2)
    batch = targets.shape

    @jax.checkpoint
    def step(carry, block_and_index):
        running_max, sum_exp, target_logit, best, best_index = carry
        block, index = block_and_index
        logits = jnp.einsum("bte,ev->btv", hidden, block, preferred_element_type=jnp.float32)
        block_max = logits.max(-1)
        new_max = jnp.maximum(running_max, block_max)
        sum_exp = sum_exp * jnp.exp(running_max - new_max) + jnp.exp(logits - new_max[..., None]).sum(-1)
        local = targets - index * chunk
        inside = (local >= 0) & (local < chunk)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[..., None], axis=-1)[..., 0]
        target_logit = jnp.where(inside, picked, target_logit)
        better = block_max > best  # strictly: the first maximum wins, as jnp.argmax
        best_index = jnp.where(better, index * chunk + jnp.argmax(logits, -1), best_index)
        return (new_max, sum_exp, target_logit, jnp.maximum(best, block_max), best_index), None

    init = (jnp.full(batch, -jnp.inf, jnp.float32), jnp.zeros(batch, jnp.float32), jnp.zeros(batch, jnp.float32),
            jnp.full(batch, -jnp.inf, jnp.float32), jnp.zeros(batch, jnp.int32))
    (running_max, sum_exp, target_logit, _, best_index), _ = jax.lax.scan(
        step, init, (blocks, jnp.arange(vocab // chunk)))
    nll = running_max + jnp.log(sum_exp) - target_logit
    return nll, best_index == targets
