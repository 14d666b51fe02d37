"""The fused kernels compiled for a real GPU or TPU against XLA's ops on the same device.

Skipped on CPU, where tests/test_attention.py and tests/test_paged_kernels.py run the same
kernels in Pallas interpret mode. `tools/accelerator_check.sh` runs this file on a device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.schema import ModelConfig
from model.attention import attention, attention_kernel
from model.paged import attend_paged, attend_paged_xla, init_cache, write_pages

PLATFORM = jax.default_backend()
pytestmark = pytest.mark.skipif(PLATFORM not in ("gpu", "tpu"), reason="needs a GPU or TPU (kernels compiled)")


def _packed_segments(batch: int, seq_len: int, rng) -> np.ndarray:
    """Rows of 1-4 documents then padding (segment 0), as the packer makes them."""
    ids = np.zeros((batch, seq_len), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(16, seq_len - 16), rng.integers(0, 4), replace=False))
        edges = [0, *cuts.tolist(), seq_len - int(rng.integers(0, 32))]
        for segment, (start, stop) in enumerate(zip(edges[:-1], edges[1:], strict=True), start=1):
            ids[row, start:stop] = segment
    return ids


@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (8, 1)])
def test_training_attention_kernel_equals_xla_in_bfloat16(heads, kv_heads):
    cfg = ModelConfig(dtype="bfloat16", num_heads=heads, num_kv_heads=kv_heads, head_dim=128, embed_dim=1024)
    kernel, why = attention_kernel(cfg, PLATFORM, 512)
    assert kernel in ("cudnn", "splash"), why
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((4, 512, n, 128)), jnp.bfloat16) for n in (heads, kv_heads, kv_heads))
    segments = jnp.asarray(_packed_segments(4, 512, rng))

    def loss(q, k, v, implementation):
        out = attention(q, k, v, segments, implementation=implementation, rules=())
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    (_, want), want_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, "xla")
    (_, got), got_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, "auto")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=0.03)
    for g, w in zip(got_grads, want_grads, strict=True):
        scale = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(w, np.float32) / scale, atol=0.03)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_paged_decode_kernel_equals_xla(dtype):
    """Rows of ragged lengths (empty, mid-page, on a page boundary, full) over shuffled, shared pages."""
    cfg = ModelConfig(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=128, embed_dim=1024, dtype=dtype)
    rows, page_size, table_pages = 6, 16, 8
    rng = np.random.default_rng(1)
    table = rng.permutation(rows * table_pages).reshape(rows, table_pages).astype(np.int32)
    table[1, :3] = table[0, :3]
    table = jnp.asarray(table)
    cache = init_cache(cfg, rows * table_pages, page_size)
    capacity = table_pages * page_size
    filled = jnp.full((rows,), capacity - 1, jnp.int32)
    for layer in range(cfg.num_layers):
        kv = [jnp.asarray(rng.standard_normal((rows, capacity - 1, 2, 128)), dtype) for _ in range(2)]
        cache = write_pages(cache, layer, *kv, table, jnp.zeros((rows,), jnp.int32), filled)
    lengths = jnp.asarray([0, 5, 16, 47, 64, capacity - 1], jnp.int32)
    num_new = jnp.asarray([1, 1, 1, 1, 0, 1], jnp.int32)
    q = jnp.asarray(rng.standard_normal((rows, 1, 8, 128)), dtype)
    want = jax.jit(attend_paged_xla)(q, cache, 1, table, lengths, num_new)
    # "auto" keeps float32 pools on XLA on TPU (its kernel reads keys and values in bfloat16): force the kernel.
    implementation = "pallas" if PLATFORM == "tpu" else "auto"
    got = jax.jit(lambda *a: attend_paged(*a, implementation=implementation))(q, cache, 1, table, lengths, num_new)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if dtype == "float32":  # TPU: bfloat16 reads of float32 keys (up to 0.0076 in interpret mode); GPU: float32 dots
        np.testing.assert_allclose(got, want, atol=1e-2 if PLATFORM == "tpu" else 1e-5)
    else:  # about two bfloat16 steps of the output's magnitude
        assert np.max(np.abs(got - want) / np.maximum(np.abs(want), 1.0)) <= 2**-6
