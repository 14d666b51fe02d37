"""The Pallas decode-attention kernels over ponder's paged pool (model/pallas_paged.py), run in interpret
mode on CPU, against `attend_paged_xla`; and a whole decode with model.decode_attention=pallas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from configs.schema import ModelConfig
from model import cpu_kernels, create_model, init_cache, pallas_paged
from model.decode import decoder
from model.paged import PagedKVCache, attend_paged, attend_paged_xla
from search.sampler import Sampling, generate

LAYERS, LAYER = 3, 2  # the pool's layers; the one attended (> 0: its pages are offset into the pool)
# bfloat16 queries and pools, kernel against XLA, as |got - want| / max(|want|, 1): the GPU kernel rounds
# its partial outputs to bfloat16 before combining them, XLA only its result. Measured (8 seeds of these
# cases): GPU at most 0.0082, about one bfloat16 step; TPU 1.5e-5. The bound is two steps.
BF16_TOLERANCE = 2**-6


def _case(seed, *, kv_heads, heads, head_dim, page_size, dtype=jnp.float32, table_pages=4, pages=40):
    """(q [6, 1, heads, head_dim], cache, table [6, table_pages], lengths [6], num_new [6]) over every kind of row.

    Rows: 0 empty and writing nothing; 1 ends mid-page on pages shared with row 4; 2 holds 3 slots, its
    later pages -1; 3 ends exactly at a page boundary; 4 fills its table; 5 writes nothing at 5 slots.
    """
    rng = np.random.default_rng(seed)
    shape = (kv_heads, LAYERS, pages, page_size, head_dim)
    cache = PagedKVCache(*(jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2)))
    table = rng.permutation(pages)[: 6 * table_pages].reshape(6, table_pages).astype(np.int32)
    table[1, :2] = table[4, :2]
    table[2, 1:] = -1
    capacity = table_pages * page_size
    lengths = np.array([0, page_size + page_size // 2, 2, 2 * page_size - 1, capacity - 1, 5], np.int32)
    num_new = np.array([0, 1, 1, 1, 1, 0], np.int32)
    q = jnp.asarray(rng.standard_normal((6, 1, heads, head_dim)), dtype)
    return q, cache, jnp.asarray(table), jnp.asarray(lengths), jnp.asarray(num_new)


def _diff(kernel, case) -> float:
    """max |kernel - attend_paged_xla| over the case's rows, scaled by max(|attend_paged_xla|, 1) in bfloat16."""
    q, cache, table, lengths, num_new = case
    got = jax.jit(kernel, static_argnums=2)(q, cache, LAYER, table, lengths, num_new)
    want = jax.jit(attend_paged_xla, static_argnums=2)(q, cache, LAYER, table, lengths, num_new)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.all(np.asarray(got[0], np.float32) == 0)  # the empty row sees no slot: zeros, as XLA's
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = np.maximum(np.abs(want), 1) if q.dtype == jnp.bfloat16 else 1
    return float((np.abs(got - want) / scale).max())


def _gpu_interpreted(*args):
    return pallas_paged.gpu_decode_attention(*args, interpret=True)


def _tpu_interpreted(*args):
    with pltpu.force_tpu_interpret_mode():
        return pallas_paged.tpu_decode_attention(*args)


GPU_SHAPES = {
    "gqa": dict(kv_heads=2, heads=4, head_dim=16, page_size=4),
    "mqa": dict(kv_heads=1, heads=4, head_dim=32, page_size=8, table_pages=3),
}


@pytest.mark.parametrize("shape", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_the_gpu_kernel_equals_xla(shape):
    assert _diff(_gpu_interpreted, _case(0, **shape)) <= 1e-5
    assert _diff(_gpu_interpreted, _case(1, **shape, dtype=jnp.bfloat16)) <= BF16_TOLERANCE


TPU_SHAPES = {  # the kernel's lane width: head_dim 128
    "gqa": dict(kv_heads=2, heads=4, head_dim=128, page_size=16),
    "mqa": dict(kv_heads=1, heads=2, head_dim=128, page_size=16, table_pages=3),
}


@pytest.mark.parametrize("shape", TPU_SHAPES.values(), ids=TPU_SHAPES.keys())
def test_the_tpu_kernel_equals_xla(shape):
    """The stock TPU kernel reads keys and values in bfloat16: on a pool of bfloat16 values held in
    float32 it equals XLA's float32 attention; on any float32 pool it is a bfloat16 kernel."""
    q, cache, *rest = _case(2, **shape)
    rounded = PagedKVCache(*(a.astype(jnp.bfloat16).astype(jnp.float32) for a in (cache.k, cache.v)))
    assert _diff(_tpu_interpreted, (q, rounded, *rest)) <= 1e-5
    assert _diff(_tpu_interpreted, _case(3, **shape, dtype=jnp.bfloat16)) <= BF16_TOLERANCE


def test_which_kernel_applies_where():
    cfg = ModelConfig(vocab_size=256, num_layers=2, embed_dim=512, num_heads=4, num_kv_heads=2, mlp_dim=64)
    bf16 = cfg.model_copy(update={"dtype": "bfloat16"})
    assert pallas_paged.decode_kernel(bf16, "tpu") == ("pallas-tpu paged_attention", "")
    name, reason = pallas_paged.decode_kernel(cfg, "tpu")  # float32: the kernel would round keys to bfloat16
    assert name == "xla" and "bfloat16" in reason
    assert pallas_paged.decode_kernel(cfg.model_copy(update={"decode_attention": "pallas"}), "tpu")[0] != "xla"
    assert pallas_paged.decode_kernel(cfg, "gpu") == ("pallas-gpu paged_attention (Triton)", "")
    assert pallas_paged.decode_kernel(cfg, "cpu") == ("native CPU kernel", "")
    assert pallas_paged.decode_kernel(bf16, "cpu")[0] == "xla"
    assert pallas_paged.decode_kernel(cfg, "rocm")[0] == "xla"
    assert pallas_paged.decode_kernel(cfg.model_copy(update={"decode_attention": "xla"}), "gpu")[0] == "xla"
    narrow = cfg.model_copy(update={"embed_dim": 256})  # head_dim 64: not the TPU kernel's 128 lanes
    assert pallas_paged.decode_kernel(narrow.model_copy(update={"dtype": "bfloat16"}), "tpu")[0] == "xla"
    assert pallas_paged.decode_kernel(narrow, "gpu", page_size=12)[0] == "xla"  # Triton blocks: powers of two
    q, cache, *_ = _case(4, **GPU_SHAPES["gqa"])
    assert pallas_paged.pallas_decode_applies(q, cache, "cpu")
    assert not pallas_paged.pallas_decode_applies(jnp.repeat(q, 2, axis=1), cache, "cpu")  # a prefill
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):  # a pallas_call has no sharding rule
        assert not pallas_paged.pallas_decode_applies(q, cache, "gpu")


def test_one_lowering_for_cpu_cuda_and_tpu_holds_each_platform_s_kernel():
    """What `ponder export search` needs: every platform's branch lowers here, each for its own
    platform only (a Pallas kernel lowers for no other), and the CPU runs its own."""
    platforms = ("cpu", "cuda", "tpu")
    triton, = pallas_paged.UNSTABLE_EXPORT_TARGETS
    for dtype, targets in ((jnp.float32, (cpu_kernels.TARGET, triton)), (jnp.bfloat16, (triton, "tpu_custom_call"))):
        q, cache, table, lengths, num_new = _case(5, **TPU_SHAPES["gqa"], dtype=dtype)
        attend = jax.jit(attend_paged, static_argnums=2)
        exported = jax.export.export(attend, platforms=platforms, disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call(target) for target in targets])(
            q, cache, LAYER, table, lengths, num_new)
        text = exported.mlir_module()
        assert all(target in text for target in targets), dtype
        got = exported.call(q, cache, table, lengths, num_new)  # on this CPU
        want = attend_paged_xla(q, cache, LAYER, table, lengths, num_new)
        assert np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).max() <= 1e-5


CFG = ModelConfig(vocab_size=64, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=96,
                  max_seq_len=64, decode_attention="pallas")


def test_a_decode_with_pallas_attention_equals_xla_attention():
    """`Transformer.decode` and the CPU decoder, one token after a prefill, with the GPU kernel
    interpreted in every layer; and a sampler's greedy tokens."""
    graphdef, params = nnx.split(create_model(CFG, seed=0))
    xla_cfg = CFG.model_copy(update={"decode_attention": "xla"})
    xla_graphdef, _ = nnx.split(create_model(xla_cfg, seed=0))
    rng = np.random.default_rng(6)
    rows, page_size = 3, 4
    prompts, lengths = jnp.asarray(rng.integers(0, 64, (rows, 7))), jnp.asarray([7, 4, 1], jnp.int32)
    table = jnp.arange(rows * 4, dtype=jnp.int32).reshape(rows, 4)
    tokens, num_new = jnp.asarray(rng.integers(0, 64, (rows, 1))), jnp.asarray([1, 1, 0], jnp.int32)

    @jax.jit
    def decode(graphdef, params):
        model = nnx.merge(graphdef, params)
        _, cache = model.prefill(prompts, table, init_cache(CFG, rows * 4, page_size), lengths)
        args = (tokens, lengths[:, None], table, lengths, cache, num_new)
        return model.decode(*args)[0], decoder(model, rows)(*args)[0]

    got, want = decode(graphdef, params), decode(xla_graphdef, params)
    for g, w in zip(got, want, strict=True):
        assert np.abs(np.asarray(g) - np.asarray(w)).max() <= 1e-5

    def sample(cfg, graphdef):
        keys = jax.random.split(jax.random.key(0), rows)
        out = jax.jit(generate, static_argnums=(0, 2), static_argnames=("max_new_tokens", "sampling", "page_size"))(
            graphdef, params, cfg, prompts, lengths, keys, max_new_tokens=6, sampling=Sampling(temperature=0.0),
            page_size=page_size)
        return np.asarray(out.tokens)

    np.testing.assert_array_equal(sample(CFG, graphdef), sample(xla_cfg, xla_graphdef))
