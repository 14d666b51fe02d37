"""The decode step a sampler's loop runs, and on CPU the weight layout it runs from.

`decoder(model, rows)` is the one place that chooses. Anywhere but CPU it is
`Transformer.decode`, which reads each layer out of the stacked weights in place. On CPU
it is `decode_step` over per-layer weights that `decode_layers` slices, fuses and packs
once, outside the loop (chosen by `lax.platform_dependent`: a program a CPU host lowers for
accelerators too, `ponder export search`, reads the stacked weights there). Slicing the
stacked weights inside a `lax.while_loop` copies them on every token there; q/k/v as one
matmul and gate/up as another make fewer of the small matmuls whose launch costs as much
as their work; a flat [heads * head_dim, E] output weight spares XLA:CPU a transpose of wo
per token; and packed weights (`DecodeWeight`) let the native small-matmul kernel
(`model/cpu_kernels.py`) read each weight once.
`decode_step` computes what `Transformer.decode` does, op for op but in this layout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from model import cpu_kernels
from model.paged import PagedKVCache, attend_paged, write_pages
from model.sharding import constrain
from model.transformer import BATCH_LENGTH_EMBED, Transformer, rms_norm, rope


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeWeight:
    """A weight [K, N] in the small-matmul kernel's layout: packed [N / 16, K, 16], each strip of 16
    output columns one contiguous run (`decode_weight` makes it once, outside a decode loop)."""

    packed: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        strips, k, strip = self.packed.shape
        return k, strips * strip

    def unpacked(self) -> jax.Array:
        """The [K, N] weight again (for XLA's dot where the kernel does not apply)."""
        return unpack(self.packed)


def unpack(packed: jax.Array) -> jax.Array:
    """[N / 16, K, 16] -> [K, N]: `decode_weight`'s packing undone."""
    strips, k, strip = packed.shape
    return packed.transpose(1, 0, 2).reshape(k, strips * strip)


def decode_weight(w: jax.Array, rows: int, dtype) -> jax.Array | DecodeWeight:
    """`w` [K, N] as `decode_matmul` reads it fastest for `rows` rows computed in `dtype`.

    Where the kernel applies (at most 8 rows, float32 weight and compute, N a multiple of 16,
    `cpu_kernels.kernels_may_run`): a `DecodeWeight`, a packed copy made here, once, and read
    by the kernel on every token. Anywhere else `w` itself.
    """
    if (rows > cpu_kernels.MATMUL_MAX_ROWS or w.ndim != 2 or w.shape[1] % cpu_kernels.MATMUL_COLUMN_MULTIPLE
            or w.dtype != jnp.float32 or jnp.dtype(dtype) != jnp.float32 or not cpu_kernels.kernels_may_run()):
        return w
    k, n = w.shape
    strip = cpu_kernels.MATMUL_COLUMN_MULTIPLE
    return DecodeWeight(w.reshape(k, n // strip, strip).transpose(1, 0, 2))


def decode_matmul(x: jax.Array, w: jax.Array | DecodeWeight) -> jax.Array:
    """x @ w for a decode step (computed in x's dtype), by the native small-batch kernel where it applies.

    x: [..., K]. The kernel serves a `DecodeWeight` with at most 8 rows of float32 x where
    `cpu_kernels.kernels_may_run`; anything else is XLA's dot. Not differentiable.
    """
    if not isinstance(w, DecodeWeight):
        return x @ w.astype(x.dtype)
    rows = math.prod(x.shape[:-1])
    if rows > cpu_kernels.MATMUL_MAX_ROWS or x.dtype != jnp.float32 or not cpu_kernels.kernels_may_run():
        return x @ w.unpacked().astype(x.dtype)
    flat = x.reshape(rows, x.shape[-1])
    out = jax.lax.platform_dependent(flat, w.packed, cpu=cpu_kernels.small_matmul, default=lambda x, p: x @ unpack(p))
    return out.reshape(*x.shape[:-1], w.shape[1])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeLayer:
    """One layer's weights for `decode_step`: its own arrays, not slices of the stacked blocks.

    attn_norm, mlp_norm: [E]; qkv: [E, (heads + 2 kv_heads) * head_dim]; out: [heads * head_dim, E];
    gate_up: [E, 2 * mlp]; down: [mlp, E]. Matrices are packed (`DecodeWeight`) where the kernel applies.
    """

    attn_norm: jax.Array
    qkv: jax.Array | DecodeWeight
    out: jax.Array | DecodeWeight
    mlp_norm: jax.Array
    gate_up: jax.Array | DecodeWeight
    down: jax.Array | DecodeWeight


def decode_layers(model: Transformer, rows: int) -> tuple[DecodeLayer, ...]:
    """Each layer's weights sliced, fused and laid out for a decode loop of `rows` rows (on one device)."""
    blocks, dtype = model.blocks, model.cfg.dtype
    attn, mlp = blocks.attn, blocks.mlp

    def weight(w):
        return decode_weight(w, rows, dtype)

    layers = []
    for i in range(model.cfg.num_layers):
        qkv = jnp.concatenate([w[...][i].reshape(w.shape[1], -1) for w in (attn.wq, attn.wk, attn.wv)], axis=1)
        layers.append(DecodeLayer(
            attn_norm=blocks.attn_norm.scale[...][i],
            qkv=weight(qkv),
            out=weight(attn.wo[...][i].reshape(-1, attn.wo.shape[-1])),
            mlp_norm=blocks.mlp_norm.scale[...][i],
            gate_up=weight(jnp.concatenate([mlp.w_gate[...][i], mlp.w_up[...][i]], axis=1)),
            down=weight(mlp.w_down[...][i]),
        ))
    return tuple(layers)


def decode_step(model: Transformer, layers: tuple[DecodeLayer, ...], tokens, positions, page_table, lengths,
                cache: PagedKVCache, num_new=None):
    """`Transformer.decode` computed from `decode_layers`' weights: same arguments and result.

    tokens, positions: [B, T]; page_table: [B, P]; lengths, num_new: [B]. Returns (logits [B, T, V], cache).
    """
    cfg = model.cfg
    heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    if num_new is None:
        num_new = jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32)
    x = model.embed_tokens(tokens)
    for i, layer in enumerate(layers):
        h = rms_norm(x, layer.attn_norm, cfg.norm_eps)
        qkv = decode_matmul(h, layer.qkv).reshape(*h.shape[:2], heads + 2 * kv_heads, head_dim)
        q, k, v = qkv[:, :, :heads], qkv[:, :, heads : heads + kv_heads], qkv[:, :, heads + kv_heads :]
        q, k = (rope(a, positions, cfg.rope_theta, cfg.rope_scaling) for a in (q, k))
        cache = write_pages(cache, i, k, v, page_table, lengths, num_new)
        attended = attend_paged(q, cache, i, page_table, lengths, num_new, implementation=cfg.decode_attention)
        x = x + decode_matmul(attended.reshape(*attended.shape[:2], -1), layer.out)
        gate, up = jnp.split(decode_matmul(rms_norm(x, layer.mlp_norm, cfg.norm_eps), layer.gate_up), 2, axis=-1)
        x = x + decode_matmul(jax.nn.silu(gate) * up, layer.down)
        x = constrain(x, BATCH_LENGTH_EMBED, model.rules)
    return model.logits(model.final_norm(x)), cache


def decoder(model: Transformer, rows: int) -> Callable:
    """The decode step for a loop of `rows` rows: `(tokens, positions, page_table, lengths, cache, num_new)
    -> (logits, cache)`, as `Transformer.decode`. Call it outside the loop, under the loop's jit."""
    if jax.default_backend() != "cpu":  # accelerators read the stacked weights in place: one copy of them
        return model.decode
    cpu_step = functools.partial(decode_step, model, decode_layers(model, rows))

    def decode(tokens, positions, page_table, lengths, cache, num_new=None):
        # A program lowered here for accelerators as well (`ponder export search`) runs the stacked
        # layout there; lowering for CPU alone keeps only `cpu_step` (the layout above is then unused
        # elsewhere, and XLA drops it).
        return jax.lax.platform_dependent(tokens, positions, page_table, lengths, cache, num_new,
                                          cpu=cpu_step, default=model.decode)

    return decode
