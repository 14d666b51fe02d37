"""The native CPU decode kernels (paged attention, small matmul): built, equal to XLA, used only where they apply."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from model import cpu_kernels
from model.paged import PagedKVCache, attend_paged, attend_paged_xla


def _case(seed, *, layers=3, pages=32, page_size=4, kv_heads=2, heads=4, head_dim=16, rows=5, table_pages=5):
    """Random pools and a page table whose rows own shuffled pages, row 1 sharing row 0's first two."""
    rng = np.random.default_rng(seed)
    shape = (layers, pages, page_size, kv_heads, head_dim)
    cache = PagedKVCache(jnp.asarray(rng.standard_normal(shape), jnp.float32),
                         jnp.asarray(rng.standard_normal(shape), jnp.float32))
    table = rng.permutation(pages)[: rows * table_pages].reshape(rows, table_pages).astype(np.int32)
    table[1, :2] = table[0, :2]
    q = jnp.asarray(rng.standard_normal((rows, 1, heads, head_dim)), jnp.float32)
    return q, cache, table


def _lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_the_kernel_builds_and_serves_one_token_decode_on_cpu():
    status = cpu_kernels.status()
    assert status.available, f"the CPU kernel did not build or load: {status.detail}"
    q, cache, table = _case(0)
    lengths, one = jnp.full((5,), 7, jnp.int32), jnp.ones((5,), jnp.int32)
    decode = _lowered(lambda q: attend_paged(q, cache, 1, table, lengths, one), q)
    assert cpu_kernels.TARGET in decode
    prefill_q = jnp.repeat(q, 3, axis=1)
    prefill = _lowered(lambda q: attend_paged(q, cache, 1, table, lengths, 3 * one), prefill_q)
    assert cpu_kernels.TARGET not in prefill  # several new tokens per row: XLA's matmuls


@pytest.mark.parametrize("shape", [
    {},  # grouped queries: 4 heads over 2 kv heads
    {"kv_heads": 2, "heads": 2, "head_dim": 64, "page_size": 16, "pages": 12, "table_pages": 2},
    {"kv_heads": 1, "heads": 3, "head_dim": 8, "page_size": 2, "pages": 64, "table_pages": 12},
])
def test_the_kernel_equals_xla_attention(shape):
    """Rows at every fill: empty, mid-table on shared pages, 3 slots then -1 pages, a full table."""
    q, cache, table = _case(1, **shape)
    rows, capacity = table.shape[0], table.shape[1] * cache.page_size
    lengths = np.array([0, capacity // 2, 3, capacity - 1, capacity - 2], np.int32)[:rows]
    num_new = np.array([0, 1, 0, 1, 1], np.int32)[:rows]
    table[2, 1:] = -1  # row 2 holds 3 slots: its later pages are unassigned
    for layer in range(cache.k.shape[0]):
        args = (q, cache, layer, jnp.asarray(table), jnp.asarray(lengths), jnp.asarray(num_new))
        got = np.asarray(jax.jit(attend_paged, static_argnums=2)(*args))
        want = np.asarray(jax.jit(attend_paged_xla, static_argnums=2)(*args))
        assert np.abs(got - want).max() <= 1e-5, (layer, np.abs(got - want).max(axis=(1, 2, 3)))
    assert np.all(got[0] == 0)  # an empty row that writes nothing sees no slot
    assert np.abs(got[1:]).max() > 0


def test_meshes_with_axes_left_to_xla_keep_the_xla_attention():
    """A custom call has no sharding rule: under auto axes XLA would gather the pool to every device."""
    q, cache, table = _case(2, rows=8, pages=48)
    lengths, one = jnp.full((8,), 9, jnp.int32), jnp.ones((8,), jnp.int32)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    def attend(q, table, lengths, one):
        return attend_paged(q, cache, 0, table, lengths, one)

    with jax.set_mesh(mesh):
        auto = _lowered(attend, q, table, lengths, one)
        per_row = jax.shard_map(attend, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False)
        manual = _lowered(per_row, q, table, lengths, one)
        got = np.asarray(jax.jit(per_row)(q, table, lengths, one))
    assert cpu_kernels.TARGET not in auto
    assert cpu_kernels.TARGET in manual  # each device on its own rows
    want = np.asarray(jax.jit(attend_paged_xla, static_argnums=2)(q, cache, 0, table, lengths, one))
    assert np.abs(got - want).max() <= 1e-5


@pytest.fixture
def fresh_status(monkeypatch, tmp_path):
    """`status()` as in a new process, building into an empty cache; restored afterwards."""
    monkeypatch.setenv("PONDER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_registered", None)
    cpu_kernels.status.cache_clear()
    yield tmp_path
    cpu_kernels.status.cache_clear()


def test_a_failed_build_warns_and_leaves_the_xla_attention(fresh_status, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with pytest.warns(UserWarning, match="using XLA's ops instead"):
        status = cpu_kernels.status()
    assert not status.available and "failed" in status.detail
    assert not list(fresh_status.rglob("*.so"))  # no half-written library is left to be loaded later
    q, cache, table = _case(3)
    lowered = _lowered(lambda q: attend_paged(q, cache, 0, table, jnp.full((5,), 4), jnp.ones((5,), jnp.int32)), q)
    assert cpu_kernels.TARGET not in lowered


def test_the_kernels_can_be_turned_off(fresh_status, monkeypatch):
    monkeypatch.setenv("PONDER_CPU_KERNELS", "0")
    status = cpu_kernels.status()
    assert not status.available and "PONDER_CPU_KERNELS" in status.detail


def test_a_build_is_cached_per_source_and_machine(fresh_status):
    compiler = cpu_kernels._compiler()
    assert compiler, "no C++ compiler on this machine"
    first = cpu_kernels._build(compiler)
    assert first.parent == fresh_status / "kernels" and first.stat().st_size > 0
    built_at = first.stat().st_mtime_ns
    assert cpu_kernels._build(compiler) == first and first.stat().st_mtime_ns == built_at  # not rebuilt
    assert [p.name for p in (fresh_status / "kernels").iterdir()] == [first.name]  # no temporary files left


def _packed_matmul(x, w):
    """decode_matmul with the weight laid out for x's rows, as `sliced_layers` does outside a decode loop."""
    return cpu_kernels.decode_matmul(x, cpu_kernels.decode_weight(w, math.prod(x.shape[:-1]), x.dtype))


@pytest.mark.parametrize("rows, k, n", [(8, 256, 1536), (3, 7, 16), (1, 64, 48)])
def test_the_small_matmul_kernel_equals_a_float64_matmul(rows, k, n):
    rng = np.random.default_rng(rows + k + n)
    x = rng.standard_normal((rows, 1, k)).astype(np.float32)  # [B, T=1, K] as in a decode step
    w = rng.standard_normal((k, n)).astype(np.float32)
    packed = jax.jit(lambda w: cpu_kernels.decode_weight(w, rows, jnp.float32))(w)
    assert isinstance(packed, cpu_kernels.DecodeWeight) and packed.shape == (k, n)
    assert packed.packed.shape == (n // 16, k, 16)
    np.testing.assert_array_equal(np.asarray(packed.unpacked()), w)
    fn = jax.jit(_packed_matmul)
    assert cpu_kernels.MATMUL_TARGET in fn.lower(x, w).as_text()
    got = np.asarray(fn(x, w))
    want = (x.astype(np.float64) @ w.astype(np.float64))
    assert got.shape == (rows, 1, n)
    assert np.abs(got - want).max() <= 2e-6 * k ** 0.5 * np.abs(want).max(), np.abs(got - want).max()


@pytest.mark.parametrize("rows, n", [(9, 16), (8, 20)])
def test_matmuls_the_kernel_does_not_cover_stay_with_xla(rows, n):
    """More than 8 rows (prefill, a wide search batch) or a width not a multiple of 16: no packed copy."""
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((rows, 32)).astype(np.float32), rng.standard_normal((32, n)).astype(np.float32)
    assert cpu_kernels.decode_weight(w, rows, jnp.float32) is w
    fn = jax.jit(_packed_matmul)
    assert cpu_kernels.MATMUL_TARGET not in fn.lower(x, w).as_text()
    np.testing.assert_allclose(np.asarray(fn(x, w)), x @ w, rtol=1e-5, atol=1e-5)
    # a weight packed for fewer rows, then met with more (or with bfloat16 x): XLA's dot of the unpacked weight
    packed = cpu_kernels.decode_weight(w[:, :16], 8, jnp.float32)
    assert isinstance(packed, cpu_kernels.DecodeWeight)
    for rows_x, dtype in ((9, jnp.float32), (8, jnp.bfloat16)):
        wide = jnp.asarray(x[:1].repeat(rows_x, axis=0), dtype)
        lowered = jax.jit(cpu_kernels.decode_matmul).lower(wide, packed).as_text()
        assert cpu_kernels.MATMUL_TARGET not in lowered
        np.testing.assert_allclose(np.asarray(cpu_kernels.decode_matmul(wide, packed), np.float32),
                                   np.asarray(wide, np.float32) @ w[:, :16], rtol=2e-2, atol=2e-2)
    assert not isinstance(cpu_kernels.decode_weight(w[:, :16], 8, jnp.bfloat16), cpu_kernels.DecodeWeight)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):  # a mesh axis left to XLA's partitioner: XLA's dot, as for attention
        assert not isinstance(cpu_kernels.decode_weight(w[:, :16], 8, jnp.float32), cpu_kernels.DecodeWeight)
        assert cpu_kernels.MATMUL_TARGET not in fn.lower(x[:8, :], w[:, :16]).as_text()
