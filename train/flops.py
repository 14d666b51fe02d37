"""Model FLOPs per token and hardware peaks, for tokens/s -> TFLOP/s -> MFU.

MFU follows MaxText: model matmul FLOPs only (no norms, softmax or recomputation from
remat), 6 per parameter per token for a training step (2 forward, 4 backward), and causal
attention counted half: 12 * layers * seq_len * heads * head_dim / 2 per token.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from configs.schema import ModelConfig

# Dense peak TFLOP/s per device by jax `device_kind` (bf16), from the vendors' data sheets.
KNOWN_PEAKS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
}


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


def peak_tflops(device: jax.Device | None = None) -> float | None:
    """The known bf16 dense peak of a device kind, or None (CPUs: measure instead)."""
    kind = (device or jax.devices()[0]).device_kind
    return next((peak for name, peak in KNOWN_PEAKS.items() if kind.startswith(name)), None)


def measure_matmul_tflops(dtype=jnp.float32, size: int = 1024, repeats: int = 5) -> float:
    """This device's achievable matmul TFLOP/s: the best of `repeats` timed chains of square matmuls."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype) / size**0.5
    chain = 8

    @jax.jit
    def run(x):
        for _ in range(chain):
            x = x @ a
        return x

    run(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return chain * 2 * size**3 / best / 1e12
