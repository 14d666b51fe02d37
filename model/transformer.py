"""The ponder decoder: a Llama-style transformer in Flax NNX.

Read top to bottom: parameters and norms, rotary embeddings, attention (dense and paged),
the SwiGLU MLP, one block, the whole model. Every parameter carries logical axis names;
`model/sharding.py` maps them to the mesh. The layer stack is stored stacked (`layers` is
the leading axis of every block parameter) and run with `lax.scan` or unrolled.

Params are float32 (configurable); compute runs in `cfg.dtype`; logits come out float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.schema import ModelConfig
from model.cpu_kernels import decode_matmul, decode_weight
from model.paged import PagedKVCache, attend_paged, write_pages
from model.sharding import Rules, constrain

BATCH_LENGTH_EMBED = ("batch", "length", "embed")


def _param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str, ...], dtype) -> nnx.Param:
    """A parameter with logical axis names; placement on a mesh is decided by the caller."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


def _fan_in(in_axis, out_axis):
    return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned scale, computed in float32 (as HF Llama does)."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, half-split convention (HF Llama's `rotate_half`).

    x: [B, T, heads, head_dim]; positions: [B, T] int.
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1])
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with rotary embeddings."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, n, k, d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        self.wq = _param(rngs, _fan_in(0, (1, 2)), (e, n, d), ("embed", "heads", "head_dim"), pdt)
        self.wk = _param(rngs, _fan_in(0, (1, 2)), (e, k, d), ("embed", "kv_heads", "head_dim"), pdt)
        self.wv = _param(rngs, _fan_in(0, (1, 2)), (e, k, d), ("embed", "kv_heads", "head_dim"), pdt)
        self.wo = _param(rngs, _fan_in((0, 1), 2), (n, d, e), ("heads", "head_dim", "embed"), pdt)
        self.rope_theta = cfg.rope_theta
        self.implementation = None if cfg.attention == "auto" else cfg.attention

    def fused_qkv(self) -> jax.Array:
        """wq, wk, wv side by side as one [E, (heads + 2 kv_heads) * head_dim] matrix (see `sliced_layers`)."""
        return jnp.concatenate([w[...].reshape(w.shape[0], -1) for w in (self.wq, self.wk, self.wv)], axis=1)

    def _qkv(self, x: jax.Array, positions: jax.Array, fused: jax.Array | None = None):
        dt = x.dtype
        if fused is None:
            q = jnp.einsum("bte,end->btnd", x, self.wq[...].astype(dt))
            k = jnp.einsum("bte,ekd->btkd", x, self.wk[...].astype(dt))
            v = jnp.einsum("bte,ekd->btkd", x, self.wv[...].astype(dt))
        else:  # one matmul instead of three
            (n, d), kv = self.wq.shape[1:], self.wk.shape[1]
            qkv = decode_matmul(x, fused).reshape(*x.shape[:2], n + 2 * kv, d)
            q, k, v = qkv[:, :, :n], qkv[:, :, n : n + kv], qkv[:, :, n + kv :]
        return rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta), v

    def flat_out(self) -> jax.Array:
        """wo as one [heads * head_dim, E] matrix (see `sliced_layers`)."""
        return self.wo[...].reshape(-1, self.wo.shape[-1])

    def _out(self, attended: jax.Array, flat: jax.Array | None = None) -> jax.Array:
        if flat is None:
            return jnp.einsum("btnd,nde->bte", attended, self.wo[...].astype(attended.dtype))
        # heads and head_dim as one contracting axis: XLA need not lay out (or copy) wo anew
        return decode_matmul(attended.reshape(*attended.shape[:2], -1), flat)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """Causal self-attention over a whole sequence; packed segments do not see each other.

        x: [B, T, E]; positions, segment_ids: [B, T].
        """
        q, k, v = self._qkv(x, positions)
        mask = None
        if segment_ids is not None:
            mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [B, 1, T, T]
        attended = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=self.implementation)
        return self._out(attended)

    def paged(self, x, positions, layer, cache: PagedKVCache, page_table, lengths, num_new, fused_qkv=None,
              flat_out=None):
        """Attention for new tokens against a row's pages, writing their keys/values first.

        x: [B, T, E]; positions: [B, T]; page_table: [B, P]; lengths, num_new: [B];
        fused_qkv, flat_out: `fused_qkv()` and `flat_out()` taken from outside a decode loop, or None.
        """
        q, k, v = self._qkv(x, positions, fused_qkv)
        cache = write_pages(cache, layer, k, v, page_table, lengths, num_new)
        return self._out(attend_paged(q, cache, layer, page_table, lengths, num_new), flat_out), cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, f, pdt = cfg.embed_dim, cfg.mlp_dim, jnp.dtype(cfg.param_dtype)
        self.w_gate = _param(rngs, _fan_in(0, 1), (e, f), ("embed", "mlp"), pdt)
        self.w_up = _param(rngs, _fan_in(0, 1), (e, f), ("embed", "mlp"), pdt)
        self.w_down = _param(rngs, _fan_in(0, 1), (f, e), ("mlp", "embed"), pdt)

    def fused_gate_up(self) -> jax.Array:
        """w_gate and w_up side by side as one [E, 2 * mlp] matrix (see `sliced_layers`)."""
        return jnp.concatenate([self.w_gate[...], self.w_up[...]], axis=1)

    def __call__(self, x: jax.Array, fused_gate_up=None, down=None) -> jax.Array:
        """fused_gate_up, down: `fused_gate_up()` and w_down from `sliced_layers` (the decode path), or None."""
        dt = x.dtype
        if fused_gate_up is None:
            gate, up = x @ self.w_gate[...].astype(dt), x @ self.w_up[...].astype(dt)
        else:  # one matmul instead of two; the decode path (see `sliced_layers`)
            gate, up = jnp.split(decode_matmul(x, fused_gate_up), 2, axis=-1)
            return decode_matmul(jax.nn.silu(gate) * up, self.w_down[...] if down is None else down)
        return (jax.nn.silu(gate) * up) @ self.w_down[...].astype(dt)


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, segment_ids):
        x = x + self.attn(self.attn_norm(x), positions, segment_ids)
        return x + self.mlp(self.mlp_norm(x))

    def paged(self, x, positions, layer, cache, page_table, lengths, num_new, fused=None):
        """fused: {"qkv", "out", "gate_up", "down"} weights from `Transformer.sliced_layers`, or None."""
        fused = fused or {}
        attended, cache = self.attn.paged(self.attn_norm(x), positions, layer, cache, page_table, lengths, num_new,
                                          fused.get("qkv"), fused.get("out"))
        x = x + attended
        return x + self.mlp(self.mlp_norm(x), fused.get("gate_up"), fused.get("down")), cache


class ScalarHead(nnx.Module):
    """A linear map from hidden states to one float32 score per token (value / reward)."""

    def __init__(self, dim: int, *, param_dtype, rngs: nnx.Rngs):
        self.w = _param(rngs, nnx.initializers.normal(dim**-0.5), (dim,), ("embed",), param_dtype)
        self.b = _param(rngs, nnx.initializers.zeros, (), (), param_dtype)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """hidden: [B, T, E] -> [B, T] float32."""
        return jnp.einsum("bte,e->bt", hidden.astype(jnp.float32), self.w[...].astype(jnp.float32)) + self.b[...]


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """Decoder-only Llama: embed, N blocks, final norm, LM head (and an optional scalar head)."""

    def __init__(self, cfg: ModelConfig, *, rules: Rules = (), rngs: nnx.Rngs):
        self.cfg = cfg
        self.rules = rules
        pdt = jnp.dtype(cfg.param_dtype)
        e, v = cfg.embed_dim, cfg.vocab_size
        self.embed = _param(rngs, nnx.initializers.normal(e**-0.5), (v, e), ("vocab", "embed"), pdt)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.blocks = stacked_blocks(rngs)
        self.final_norm = RMSNorm(e, cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else _param(rngs, _fan_in(0, 1), (e, v), ("embed", "vocab"), pdt)
        self.value_head = ScalarHead(e, param_dtype=pdt, rngs=rngs) if cfg.value_head else None

    # -- pieces shared by the full forward and paged decode --

    def _embed(self, tokens: jax.Array) -> jax.Array:
        # Gather from a whole table (FSDP gathers every weight before use anyway): from a split
        # table XLA cannot move the gathered rows to the batch sharding without replicating them.
        table = constrain(self.embed[...].astype(jnp.dtype(self.cfg.dtype)), (None, None), self.rules)
        x = jnp.take(table, tokens, axis=0)
        return constrain(x, BATCH_LENGTH_EMBED, self.rules)

    def sliced_layers(self, rows: int | None = None) -> tuple:
        """Each layer's parameters as its own arrays (a copy of the blocks' weights), with fused matrices.

        Returns per layer (state, {"qkv": [E, (heads + 2 kv_heads) * head_dim], "out": [heads * head_dim, E],
        "gate_up": [E, 2 * mlp], "down": [mlp, E]}); `rows`, the decode batch's rows (on one
        device), lets `cpu_kernels.decode_weight` lay these out for the native matmul kernel.
        A decode loop that takes them from outside its `lax.while_loop` (`decode(..., layers=)`)
        reads each layer's weights in place; slicing the stacked weights inside the loop copies
        them on every token on CPU, a fifth of a small model's decode step. The fused matrices
        make a token's q/k/v one matmul and its gate/up one more: a decode step's matmuls are
        small, and on CPU each costs about as much to launch as to run. The flat output
        projection spares a copy of wo per token: XLA:CPU transposed the [heads, head_dim, E]
        weight on every step to contract both axes. With these matrices a step of at most 8
        rows runs its matmuls by `cpu_kernels.decode_matmul` (one pass over each weight, in the
        layout `decode_weight` makes here, once per decode loop).
        """
        def weight(w):
            return w if rows is None else decode_weight(w, rows, self.cfg.dtype)

        graphdef, stacked = nnx.split(self.blocks)
        layers = []
        for i in range(self.cfg.num_layers):
            state = jax.tree.map(lambda a, i=i: a[i], stacked)
            block = nnx.merge(graphdef, state)
            fused = {"qkv": block.attn.fused_qkv(), "out": block.attn.flat_out(), "gate_up": block.mlp.fused_gate_up(),
                     "down": block.mlp.w_down[...]}
            layers.append((state, {name: weight(w) for name, w in fused.items()}))
        return tuple(layers)

    def _run_layers(self, step, x, carry, unroll: int = 1, layers: tuple | None = None):
        """Applies `step(block, layer_index, x, carry, fused) -> (x, carry)` for each layer (`unroll` per scan trip).

        `layers` (from `sliced_layers`) runs the layers from those arrays, unrolled, with their
        fused matrices; otherwise `fused` is None.
        """
        graphdef, stacked = nnx.split(self.blocks)
        if layers is not None:
            for i, (layer_state, fused) in enumerate(layers):
                x, carry = step(nnx.merge(graphdef, layer_state), i, x, carry, fused)
                x = constrain(x, BATCH_LENGTH_EMBED, self.rules)
            return x, carry

        def body(state, layer_state_and_index):
            x, carry = state
            layer_state, layer = layer_state_and_index
            x, carry = step(nnx.merge(graphdef, layer_state), layer, x, carry, None)
            return (constrain(x, BATCH_LENGTH_EMBED, self.rules), carry), None

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        layers = jnp.arange(self.cfg.num_layers)
        if self.cfg.scan_layers:
            (x, carry), _ = jax.lax.scan(body, (x, carry), (stacked, layers), unroll=unroll)
        else:
            for i in range(self.cfg.num_layers):
                (x, carry), _ = body((x, carry), jax.tree.map(lambda a, i=i: a[i], (stacked, layers)))
        return x, carry

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM logits, float32. hidden: [B, T, E] (after the final norm) -> [B, T, V]."""
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        out = jnp.einsum("bte,ev->btv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
        return constrain(out, ("batch", "length", "vocab"), self.rules)

    def value(self, hidden: jax.Array) -> jax.Array:
        """The scalar head (reward / value), float32. hidden: [B, T, E] -> [B, T]."""
        if self.value_head is None:
            raise ValueError("this model has no value head: set model.value_head=true")
        return self.value_head(hidden)

    # -- full-sequence forward (training, scoring) --

    def hidden(self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None):
        """Final-normed hidden states [B, T, E] for tokens [B, T]."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

        def step(block, layer, x, carry, fused):
            return block(x, positions, segment_ids), carry

        x, _ = self._run_layers(step, self._embed(tokens), ())
        return self.final_norm(x)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None):
        """Logits [B, T, V] float32 for tokens [B, T] (positions, segment_ids: [B, T])."""
        return self.logits(self.hidden(tokens, positions, segment_ids))

    # -- paged KV cache decode --

    def decode_hidden(self, tokens, positions, page_table, lengths, cache: PagedKVCache, num_new=None, layers=None):
        """Like `decode` but returns final-normed hidden states [B, T, E] instead of logits."""
        if num_new is None:
            num_new = jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32)

        def step(block, layer, x, cache, fused):
            return block.paged(x, positions, layer, cache, page_table, lengths, num_new, fused)

        # Unrolled (up to 8 layers per loop trip): a decode step is small, and a loop trip per
        # layer costs as much as the layer on CPU.
        x, cache = self._run_layers(step, self._embed(tokens), cache, unroll=min(self.cfg.num_layers, 8), layers=layers)
        return self.final_norm(x), cache

    def decode(self, tokens, positions, page_table, lengths, cache: PagedKVCache, num_new=None, layers=None):
        """Runs new tokens against each row's cached pages and appends their keys/values.

        tokens, positions: [B, T]; page_table: [B, P] page ids (row's logical slot s lives at
        page page_table[s // page_size], offset s % page_size); lengths: [B] tokens already
        cached; num_new: [B] how many of the T tokens are real (default T; the rest are
        padding and are not written). Returns (logits [B, T, V] float32, cache). The row's
        new length is lengths + num_new. `layers`: `sliced_layers()`, taken from outside a decode loop.
        """
        hidden, cache = self.decode_hidden(tokens, positions, page_table, lengths, cache, num_new, layers)
        return self.logits(hidden), cache

    def prefill(self, tokens, page_table, cache: PagedKVCache, prompt_lengths=None):
        """Writes prompts into empty rows: `decode` from length 0 at positions 0..T-1.

        tokens: [B, T] right-padded; prompt_lengths: [B] (default T). Returns (logits, cache).
        """
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        lengths = jnp.zeros(tokens.shape[:1], jnp.int32)
        return self.decode(tokens, positions, page_table, lengths, cache, prompt_lengths)


def create_model(cfg: ModelConfig, rules: Rules = (), *, seed: int = 0, mesh: jax.sharding.Mesh | None = None):
    """Initializes a Transformer; with a mesh, each parameter is created directly in its shard.

    Abstract shapes come first (`nnx.eval_shape`), so no device ever holds a full copy of a
    parameter that the rules split.
    """
    if mesh is None:
        return Transformer(cfg, rules=rules, rngs=nnx.Rngs(seed))
    from model.sharding import state_shardings

    abstract = nnx.eval_shape(lambda: Transformer(cfg, rules=rules, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def init():
        return nnx.split(Transformer(cfg, rules=rules, rngs=nnx.Rngs(seed)))[1]

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
