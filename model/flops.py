"""Model FLOPs: per token for a training step (MFU) and per decoded token for search's compute budgets.

MFU follows MaxText: model matmul FLOPs only (no norms, softmax or recomputation from
remat), 6 per parameter per token for a training step (2 forward, 4 backward), and causal
attention counted half: 12 * layers * seq_len * heads * head_dim / 2 per token. Decoding
counts each token's forward matmuls and its attention over the slots before it, so a
search's budget in FLOPs compares strategies at equal compute. `decode_step_bytes` is the
memory a decode step must read at least, for decode's bandwidth roofline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from configs.schema import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls per token (every weight but norms and the embedding lookup)."""
    e, f, n, k, d = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    per_layer = e * d * (2 * n + 2 * k) + 3 * e * f
    return cfg.num_layers * per_layer + e * cfg.vocab_size  # + the LM head (tied or not)


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 6N (2N forward only) plus causal attention counted half."""
    per_param = 6 if training else 2
    attention = per_param * 2 * cfg.num_layers * seq_len * cfg.num_heads * cfg.resolved_head_dim / 2
    return per_param * matmul_params(cfg) + attention


def decode_flops(model_cfg: ModelConfig, start: jax.Array, num: jax.Array) -> jax.Array:
    """Forward model FLOPs of `num` tokens at slots start..start+num-1 (matmuls + causal attention).

    start, num: [R] int (any shape, broadcast); returns float32 of their shape.
    """
    per_token = 2.0 * matmul_params(model_cfg)
    attention = 4.0 * model_cfg.num_layers * model_cfg.num_heads * model_cfg.resolved_head_dim
    slot_sum = num * start + num * (num + 1) / 2  # each token attends to its slot + 1 keys
    return (per_token * num + attention * slot_sum).astype(jnp.float32)


def decode_step_bytes(cfg: ModelConfig, rows: int, context: float) -> float:
    """The fewest bytes one decode step of `rows` rows reads: every matmul weight once (in `param_dtype`)
    and each row's cached keys and values over `context` slots (in the compute dtype, the pool's)."""
    weight_bytes = matmul_params(cfg) * jnp.dtype(cfg.param_dtype).itemsize
    kv_per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.resolved_head_dim * jnp.dtype(cfg.dtype).itemsize
    return weight_bytes + rows * context * kv_per_slot
