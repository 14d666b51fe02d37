"""The ponder decoder: a Llama-style transformer in Flax NNX.

Read top to bottom: parameters and norms, rotary embeddings, attention (dense and paged),
the SwiGLU MLP, one block, the whole model. Every parameter carries logical axis names;
`model/sharding.py` maps them to the mesh. The layer stack is stored stacked (`layers` is
the leading axis of every block parameter) and run with `lax.scan` or unrolled.

Params are float32 (configurable); compute runs in `cfg.dtype`; logits come out float32.
On CPU the sampler's decode loop computes `decode` from its own weight layout (`model/decode.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from configs.schema import ModelConfig, RopeScaling
from model.attention import attention
from model.paged import PagedKVCache, attend_paged, write_pages
from model.sharding import Rules, constrain

BATCH_LENGTH_EMBED = ("batch", "length", "embed")


def _param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str, ...], dtype) -> nnx.Param:
    """A parameter with logical axis names; placement on a mesh is decided by the caller."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


def _fan_in(in_axis, out_axis):
    return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x: [..., E] normed over its last axis in float32, times scale [E], in x's dtype."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned scale, computed in float32 (as HF Llama does)."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Rotary inverse frequencies [head_dim // 2] float32, with Llama 3's scaling when given (as HF computes them)."""
    inv_freq = (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)).astype(np.float32)
    if scaling is None:
        return inv_freq
    old_context = scaling.original_max_position_embeddings
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old_context / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= old_context / scaling.high_freq_factor) & (wavelen <= old_context / scaling.low_freq_factor)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """Rotary position embedding, half-split convention (HF Llama's `rotate_half`).

    x: [B, T, heads, head_dim]; positions: [B, T] int.
    """
    half = x.shape[-1] // 2
    inv_freq = jnp.asarray(rope_frequencies(x.shape[-1], theta, scaling))
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with rotary embeddings."""

    def __init__(self, cfg: ModelConfig, *, rules: Rules = (), rngs: nnx.Rngs):
        e, n, k, d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        self.wq = _param(rngs, _fan_in(0, (1, 2)), (e, n, d), ("embed", "heads", "head_dim"), pdt)
        self.wk = _param(rngs, _fan_in(0, (1, 2)), (e, k, d), ("embed", "kv_heads", "head_dim"), pdt)
        self.wv = _param(rngs, _fan_in(0, (1, 2)), (e, k, d), ("embed", "kv_heads", "head_dim"), pdt)
        self.wo = _param(rngs, _fan_in((0, 1), 2), (n, d, e), ("heads", "head_dim", "embed"), pdt)
        self.rope_theta, self.rope_scaling = cfg.rope_theta, cfg.rope_scaling
        self.implementation, self.rules = cfg.attention, rules  # the kernel is chosen per call (model/attention.py)
        self.decode_attention = cfg.decode_attention  # the paged decode kernel: model/paged.py attend_paged

    def _qkv(self, x: jax.Array, positions: jax.Array):
        dt = x.dtype
        q = jnp.einsum("bte,end->btnd", x, self.wq[...].astype(dt))
        k = jnp.einsum("bte,ekd->btkd", x, self.wk[...].astype(dt))
        v = jnp.einsum("bte,ekd->btkd", x, self.wv[...].astype(dt))
        q, k = (rope(a, positions, self.rope_theta, self.rope_scaling) for a in (q, k))
        # Names the remat policies `save_qkv_proj` / `save_qkv_attention` keep (no effect otherwise).
        return checkpoint_name(q, "query_proj"), checkpoint_name(k, "key_proj"), checkpoint_name(v, "value_proj")

    def _out(self, attended: jax.Array) -> jax.Array:
        attended = checkpoint_name(attended, "attention_out")
        return jnp.einsum("btnd,nde->bte", attended, self.wo[...].astype(attended.dtype))

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """Causal self-attention over a whole sequence; packed segments do not see each other.

        x: [B, T, E]; positions, segment_ids: [B, T].
        """
        q, k, v = self._qkv(x, positions)
        return self._out(attention(q, k, v, segment_ids, implementation=self.implementation, rules=self.rules))

    def paged(self, x, positions, layer, cache: PagedKVCache, page_table, lengths, num_new):
        """Attention for new tokens against a row's pages, writing their keys/values first.

        x: [B, T, E]; positions: [B, T]; page_table: [B, P]; lengths, num_new: [B].
        """
        q, k, v = self._qkv(x, positions)
        cache = write_pages(cache, layer, k, v, page_table, lengths, num_new)
        attended = attend_paged(q, cache, layer, page_table, lengths, num_new, implementation=self.decode_attention)
        return self._out(attended), cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, f, pdt = cfg.embed_dim, cfg.mlp_dim, jnp.dtype(cfg.param_dtype)
        self.w_gate = _param(rngs, _fan_in(0, 1), (e, f), ("embed", "mlp"), pdt)
        self.w_up = _param(rngs, _fan_in(0, 1), (e, f), ("embed", "mlp"), pdt)
        self.w_down = _param(rngs, _fan_in(0, 1), (f, e), ("mlp", "embed"), pdt)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        gate, up = x @ self.w_gate[...].astype(dt), x @ self.w_up[...].astype(dt)
        return (jax.nn.silu(gate) * up) @ self.w_down[...].astype(dt)


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rules: Rules = (), rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.attn = Attention(cfg, rules=rules, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, segment_ids):
        x = x + self.attn(self.attn_norm(x), positions, segment_ids)
        return x + self.mlp(self.mlp_norm(x))

    def paged(self, x, positions, layer, cache, page_table, lengths, num_new):
        """The block for new tokens against the paged cache (see `Attention.paged`); returns (x, cache)."""
        attended, cache = self.attn.paged(self.attn_norm(x), positions, layer, cache, page_table, lengths, num_new)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), cache


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
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # every weight matmul's output
    # the rotated q, k and v: the backward pass recomputes attention and the MLP, not the projections
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
    # and attention's output too: the backward pass recomputes only the MLP (and the out projection)
    "save_qkv_attention": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "attention_out"),
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
            return Block(cfg, rules=rules, rngs=rngs)

        self.blocks = stacked_blocks(rngs)
        self.final_norm = RMSNorm(e, cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else _param(rngs, _fan_in(0, 1), (e, v), ("embed", "vocab"), pdt)
        self.value_head = ScalarHead(e, param_dtype=pdt, rngs=rngs) if cfg.value_head else None

    # -- pieces shared by the full forward and paged decode --

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Input embeddings [B, T, E] in the compute dtype for tokens [B, T]."""
        # Gather from a whole table (FSDP gathers every weight before use anyway): from a split
        # table XLA cannot move the gathered rows to the batch sharding without replicating them.
        table = constrain(self.embed[...].astype(jnp.dtype(self.cfg.dtype)), (None, None), self.rules)
        x = jnp.take(table, tokens, axis=0)
        return constrain(x, BATCH_LENGTH_EMBED, self.rules)

    def _run_layers(self, step, x, carry, unroll: int = 1):
        """Applies `step(block, layer_index, x, carry) -> (x, carry)` for each layer (`unroll` per scan trip)."""
        graphdef, stacked = nnx.split(self.blocks)

        def body(state, layer_state_and_index):
            x, carry = state
            layer_state, layer = layer_state_and_index
            x, carry = step(nnx.merge(graphdef, layer_state), layer, x, carry)
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

    def output_head(self) -> jax.Array:
        """The LM head [E, V]: lm_head, or the transposed embedding when tied."""
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM logits, float32. hidden: [B, T, E] (after the final norm) -> [B, T, V]."""
        head = self.output_head()
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

        def step(block, layer, x, carry):
            return block(x, positions, segment_ids), carry

        x, _ = self._run_layers(step, self.embed_tokens(tokens), ())
        return self.final_norm(x)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None):
        """Logits [B, T, V] float32 for tokens [B, T] (positions, segment_ids: [B, T])."""
        return self.logits(self.hidden(tokens, positions, segment_ids))

    # -- paged KV cache decode --

    def decode_hidden(self, tokens, positions, page_table, lengths, cache: PagedKVCache, num_new=None):
        """Like `decode` but returns final-normed hidden states [B, T, E] instead of logits."""
        if num_new is None:
            num_new = jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32)

        def step(block, layer, x, cache):
            return block.paged(x, positions, layer, cache, page_table, lengths, num_new)

        # Unrolled (up to 8 layers per loop trip): a decode step is small, and a loop trip per
        # layer costs as much as the layer on CPU.
        x, cache = self._run_layers(step, self.embed_tokens(tokens), cache, unroll=min(self.cfg.num_layers, 8))
        return self.final_norm(x), cache

    def decode(self, tokens, positions, page_table, lengths, cache: PagedKVCache, num_new=None):
        """Runs new tokens against each row's cached pages and appends their keys/values.

        tokens, positions: [B, T]; page_table: [B, P] page ids (row's logical slot s lives at
        page page_table[s // page_size], offset s % page_size); lengths: [B] tokens already
        cached; num_new: [B] how many of the T tokens are real (default T; the rest are
        padding and are not written). Returns (logits [B, T, V] float32, cache). The row's
        new length is lengths + num_new. (The sampler's loop on CPU runs `model/decode.py` instead.)
        """
        hidden, cache = self.decode_hidden(tokens, positions, page_table, lengths, cache, num_new)
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
