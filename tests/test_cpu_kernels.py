"""The native CPU decode kernels (paged attention, small matmul): built, equal to XLA, used only where they apply,
and loaded only from a cache no one else can write to."""

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs.schema import ModelConfig
from model import cpu_kernels, create_model, decode, init_cache
from model.paged import PagedKVCache, attend_paged, attend_paged_xla


def _case(seed, *, layers=3, pages=32, page_size=4, kv_heads=2, heads=4, head_dim=16, rows=5, table_pages=5):
    """Random pools and a page table whose rows own shuffled pages, row 1 sharing row 0's first two."""
    rng = np.random.default_rng(seed)
    shape = (kv_heads, layers, pages, page_size, head_dim)
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
    for layer in range(cache.k.shape[1]):
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


def test_a_build_is_cached_per_source_and_machine_in_private_directories(fresh_status, monkeypatch):
    root = fresh_status / "new" / "cache"  # neither exists yet
    monkeypatch.setenv("PONDER_CACHE_DIR", str(root))
    compiler = cpu_kernels._compiler()
    assert compiler, "no C++ compiler on this machine"
    first = cpu_kernels._build(compiler)
    assert first.parent == root / "kernels" and first.stat().st_size > 0
    for directory in (fresh_status / "new", root, root / "kernels"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert stat.S_IMODE(first.stat().st_mode) == 0o755 and first.stat().st_uid == os.getuid()
    built_at = first.stat().st_mtime_ns
    assert cpu_kernels._build(compiler) == first and first.stat().st_mtime_ns == built_at  # not rebuilt
    assert [p.name for p in (root / "kernels").iterdir()] == [first.name]  # no temporary files left


def _plant_library(path, marker, workdir, compiler):
    """Compiles to `path` a library that creates the file `marker` as soon as anything loads it."""
    source = workdir / "planted.cc"
    source.write_text('#include <cstdio>\n__attribute__((constructor)) static void planted() '
                      f'{{ std::FILE* f = std::fopen("{marker}", "w"); if (f) std::fclose(f); }}\n')
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(path)], check=True)


def _status_in_a_new_process() -> tuple[cpu_kernels.KernelStatus, str]:
    """`cpu_kernels.status()` and the warnings it gave, in a fresh process, as a later run would load the cache
    (XLA takes one library per kernel per process, and this one has registered the kernels already)."""
    code = ("import json, warnings; warnings.simplefilter('always'); from model import cpu_kernels; "
            "print(json.dumps(list(cpu_kernels.status().__dict__.values())))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], env=dict(os.environ),
                          capture_output=True, text=True, timeout=600, check=True)
    return cpu_kernels.KernelStatus(*json.loads(done.stdout.splitlines()[-1])), done.stderr


def _as_another_user(path):
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    os.chown(path, os.getuid() + 4242, -1)


@pytest.mark.parametrize("plant, real_compiler", [
    ("writable by everyone", True),  # then rebuilt in its place and loaded
    ("writable by its group", False),  # the rebuild fails too: XLA's ops
    ("another user's", False),
])
def test_a_library_planted_in_the_cache_is_refused_and_never_loaded(fresh_status, monkeypatch, tmp_path, plant,
                                                                    real_compiler):
    """The library's name is a hash anyone can compute: one the current user did not make alone is not loaded."""
    compiler = cpu_kernels._compiler()
    if not real_compiler:
        monkeypatch.setenv("CXX", "false")
    directory = cpu_kernels.cache_dir()
    directory.mkdir(mode=0o700)
    planted, marker = directory / cpu_kernels._library_name(cpu_kernels._compiler()), tmp_path / "LOADED"
    _plant_library(planted, marker, tmp_path, compiler)
    if plant == "another user's":
        _as_another_user(planted)
    else:
        os.chmod(planted, 0o777 if plant == "writable by everyone" else 0o775)
    if real_compiler:  # a fresh build replaces it, and that is what XLA runs
        status, warned = _status_in_a_new_process()
        assert not marker.exists(), "the planted library was loaded"
        assert f"not loading {planted}" in warned
        assert status.available and status.detail == str(planted)
        info = planted.stat()
        assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o755
    else:
        with pytest.warns(UserWarning, match="using XLA's ops"), \
                pytest.warns(UserWarning, match=f"not loading {planted}"):
            status = cpu_kernels.status()
        assert not status.available and "failed" in status.detail
    assert not marker.exists(), "the planted library was loaded"


@pytest.mark.parametrize("plant, real_compiler", [("writable by everyone", True), ("another user's", False)])
def test_a_cache_directory_others_can_write_to_is_refused(fresh_status, monkeypatch, tmp_path, plant, real_compiler):
    """Whoever can write to the directory could swap the library: build in a fresh private directory instead."""
    compiler = cpu_kernels._compiler()
    directory = cpu_kernels.cache_dir()
    directory.mkdir(mode=0o700)
    planted, marker = directory / cpu_kernels._library_name(compiler), tmp_path / "LOADED"
    _plant_library(planted, marker, tmp_path, compiler)
    os.chmod(planted, 0o755)  # a library that passes on its own: the directory is what gives it away
    if plant == "another user's":
        _as_another_user(directory)
    else:
        os.chmod(directory, 0o777)
    if real_compiler:
        status, warned = _status_in_a_new_process()
        assert not marker.exists(), "the planted library was loaded"
        assert f"not using the kernel cache {directory}" in warned
        built = Path(status.detail)
        assert status.available and built.parent != directory
        assert built.parent.name.startswith("ponder-kernels-") and built.parent.name != f"ponder-kernels-{os.getuid()}"
        assert not built.parent.exists()  # removed when that process ended
    else:
        monkeypatch.setenv("CXX", "false")
        with pytest.warns(UserWarning, match="using XLA's ops"), \
                pytest.warns(UserWarning, match=f"not using the kernel cache {directory}"):
            status = cpu_kernels.status()
        assert not status.available and str(directory) not in status.detail and "ponder-kernels-" in status.detail
        private = Path(status.detail.split(" -o ")[1].split()[0]).parent  # where the failed build was to go
        info = private.stat()
        assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700
    assert not marker.exists(), "the planted library was loaded"
    assert sorted(directory.iterdir()) == [planted]  # nothing built into the refused directory


def _packed_matmul(x, w):
    """decode_matmul with the weight laid out for x's rows, as `decode.decode_layers` does outside a decode loop."""
    return decode.decode_matmul(x, decode.decode_weight(w, math.prod(x.shape[:-1]), x.dtype))


@pytest.mark.parametrize("rows, k, n", [(8, 256, 1536), (3, 7, 16), (1, 64, 48)])
def test_the_small_matmul_kernel_equals_a_float64_matmul(rows, k, n):
    rng = np.random.default_rng(rows + k + n)
    x = rng.standard_normal((rows, 1, k)).astype(np.float32)  # [B, T=1, K] as in a decode step
    w = rng.standard_normal((k, n)).astype(np.float32)
    packed = jax.jit(lambda w: decode.decode_weight(w, rows, jnp.float32))(w)
    assert isinstance(packed, decode.DecodeWeight) and packed.shape == (k, n)
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
    assert decode.decode_weight(w, rows, jnp.float32) is w
    fn = jax.jit(_packed_matmul)
    assert cpu_kernels.MATMUL_TARGET not in fn.lower(x, w).as_text()
    np.testing.assert_allclose(np.asarray(fn(x, w)), x @ w, rtol=1e-5, atol=1e-5)
    # a weight packed for fewer rows, then met with more (or with bfloat16 x): XLA's dot of the unpacked weight
    packed = decode.decode_weight(w[:, :16], 8, jnp.float32)
    assert isinstance(packed, decode.DecodeWeight)
    for rows_x, dtype in ((9, jnp.float32), (8, jnp.bfloat16)):
        wide = jnp.asarray(x[:1].repeat(rows_x, axis=0), dtype)
        lowered = jax.jit(decode.decode_matmul).lower(wide, packed).as_text()
        assert cpu_kernels.MATMUL_TARGET not in lowered
        np.testing.assert_allclose(np.asarray(decode.decode_matmul(wide, packed), np.float32),
                                   np.asarray(wide, np.float32) @ w[:, :16], rtol=2e-2, atol=2e-2)
    assert not isinstance(decode.decode_weight(w[:, :16], 8, jnp.bfloat16), decode.DecodeWeight)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):  # a mesh axis left to XLA's partitioner: XLA's dot, as for attention
        assert not isinstance(decode.decode_weight(w[:, :16], 8, jnp.float32), decode.DecodeWeight)
        assert cpu_kernels.MATMUL_TARGET not in fn.lower(x[:8, :], w[:, :16]).as_text()


def test_the_cpu_decode_step_runs_every_matmul_and_attention_by_the_kernels():
    """`decode.decoder` on CPU, at most 8 rows: per layer one attention and four matmul custom calls (q/k/v, the
    output projection, gate/up, down). Wider batches keep XLA's dots; `Transformer.decode` uses no matmul kernel."""
    cfg = ModelConfig(vocab_size=384, num_layers=3, embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128)
    graphdef, params = nnx.split(create_model(cfg, seed=0))

    def custom_calls(rows, choose):
        cache, table = init_cache(cfg, rows, 4), jnp.arange(rows, dtype=jnp.int32)[:, None]
        tokens, lengths = jnp.ones((rows, 1), jnp.int32), jnp.zeros((rows,), jnp.int32)

        def step(params):
            model = nnx.merge(graphdef, params)
            return choose(model, rows)(tokens, lengths[:, None], table, lengths, cache, jnp.ones_like(lengths))[0]

        text = jax.jit(step).lower(params).compile().as_text()
        return text.count(f'custom_call_target="{cpu_kernels.MATMUL_TARGET}"'), \
            text.count(f'custom_call_target="{cpu_kernels.TARGET}"')

    assert custom_calls(8, decode.decoder) == (4 * cfg.num_layers, cfg.num_layers)
    assert custom_calls(9, decode.decoder) == (0, cfg.num_layers)
    assert custom_calls(8, lambda model, rows: model.decode) == (0, cfg.num_layers)
