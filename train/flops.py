"""Hardware peaks: for tokens/s -> TFLOP/s -> MFU a device's known bf16 peak, or a measured matmul peak;
for decode's roofline a device's known memory bandwidth, or a measured one.

The model's FLOPs per token (the numerator) are counted in `model/flops.py`, below search and train.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

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


# HBM bandwidth in GB/s (10^9 bytes) per device by jax `device_kind`, from the vendors' data sheets.
KNOWN_BANDWIDTH_GBPS = {
    "TPU v4": 1228.0,
    "TPU v5 lite": 819.0,
    "TPU v5e": 819.0,
    "TPU v5p": 2765.0,
    "TPU v6 lite": 1640.0,
    "TPU v6e": 1640.0,
    "NVIDIA H100 80GB HBM3": 3350.0,
    "NVIDIA H100": 3350.0,
    "NVIDIA H200": 4800.0,
    "NVIDIA A100-SXM4-80GB": 2039.0,
    "NVIDIA A100-SXM4-40GB": 1555.0,
}


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

    return chain * 2 * size**3 / _best_seconds(lambda: run(a).block_until_ready(), repeats) / 1e12


def known_bandwidth_gbps(device: jax.Device | None = None) -> float | None:
    """The data-sheet memory bandwidth (GB/s) of a device kind, or None (CPUs: measure instead)."""
    kind = (device or jax.devices()[0]).device_kind
    return next((gbps for name, gbps in KNOWN_BANDWIDTH_GBPS.items() if kind.startswith(name)), None)


def measure_bandwidth_gbps(megabytes: int = 512, repeats: int = 5) -> float:
    """This device's achievable read bandwidth (GB/s): the best of `repeats` timed sums over a float32 array."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return x.nbytes / _best_seconds(lambda: total(x).block_until_ready(), repeats) / 1e9


def _best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn`, after one untimed call (which compiles)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
