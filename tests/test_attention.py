"""Training attention kernels (model/attention.py): splash in Pallas interpret mode against XLA.

Splash runs here through the HLO interpreter, so shapes are tiny: T = 128 or 256, head_dim 16.
Measured on CPU (jax 0.10.2): float32 forward and gradients agree with XLA to ~1e-6; in
bfloat16 both kernels are ~0.01 from the float32 reference (0.008 forward, 0.013 gradients
of size ~4 for splash; 0.010 and 0.013 for bf16 XLA), so BF16_TOLERANCE is 0.02.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.schema import Config, MeshConfig, ModelConfig
from model import create_model
from model.attention import attention, attention_kernel
from model.sharding import batch_sharding, make_mesh

RULES = Config().rules()
F32_TOLERANCE = 1e-5
BF16_TOLERANCE = 2e-2


def _packed_segments(rows: int, length: int) -> np.ndarray:
    """[rows, length] int32: several documents per row at uneven cuts; the last row ends in padding (0)."""
    segments = np.zeros((rows, length), np.int32)
    for row in range(rows):
        cuts = sorted({0, *(int(c) for c in np.random.default_rng(row).integers(1, length, 3)), length})
        for doc, (start, stop) in enumerate(zip(cuts, cuts[1:], strict=False)):
            segments[row, start:stop] = doc + 1
    segments[-1, -37:] = 0  # padding, as train/data writes it
    return segments


def _inputs(rows, length, heads, kv_heads, head_dim=16, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(rows, length, heads, head_dim)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(rows, length, kv_heads, head_dim)), dtype) for _ in range(2))
    return q, k, v, jnp.asarray(_packed_segments(rows, length))


def _loss_and_grads(implementation):
    """A jitted (output, d loss / d (q, k, v)) for a fixed weighting of the output."""

    def loss(q, k, v, segments):
        out = attention(q, k, v, segments, implementation=implementation, rules=RULES)
        weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return (out.astype(jnp.float32) * weights).sum(), out

    @jax.jit
    def run(q, k, v, segments):
        (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, segments)
        return out, grads

    return run


def _max_diff(a, b) -> float:
    return float(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)).max())


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "one_sequence"])
def test_splash_matches_xla_float32(kv_heads, packed):
    q, k, v, segments = _inputs(2, 256, 4, kv_heads)
    segments = segments if packed else None
    want_out, want_grads = _loss_and_grads("xla")(q, k, v, segments)
    out, grads = _loss_and_grads("splash")(q, k, v, segments)
    assert _max_diff(out, want_out) <= F32_TOLERANCE
    for name, got, want in zip("qkv", grads, want_grads, strict=True):
        assert _max_diff(got, want) <= F32_TOLERANCE, f"d/d{name}"


def test_splash_bfloat16_within_stated_tolerance():
    q, k, v, segments = _inputs(2, 256, 4, 2, dtype=jnp.bfloat16)
    reference_out, reference_grads = _loss_and_grads("xla")(*(a.astype(jnp.float32) for a in (q, k, v)), segments)
    for implementation in ("splash", "xla"):  # the bf16 XLA path is as far from float32 as splash is
        out, grads = _loss_and_grads(implementation)(q, k, v, segments)
        assert out.dtype == jnp.bfloat16
        assert _max_diff(out, reference_out) <= BF16_TOLERANCE, implementation
        for name, got, want in zip("qkv", grads, reference_grads, strict=True):
            assert _max_diff(got, want) <= BF16_TOLERANCE, f"{implementation} d/d{name}"


@pytest.mark.parametrize(("fsdp", "tensor", "heads", "kv_heads"), [
    (4, 2, 4, 2),  # heads and kv heads split over tensor alike
    (2, 4, 4, 1),  # MQA: kv replicated, each shard one query head
    (4, 2, 12, 3),  # kv replicated, a shard's 6 query heads cut across groups of 4: kv heads gathered
])
def test_splash_under_mesh_runs_in_shard_map(fsdp, tensor, heads, kv_heads):
    mesh = make_mesh(MeshConfig(data=1, fsdp=fsdp, tensor=tensor))
    q, k, v, segments = _inputs(8, 128, heads, kv_heads, seed=fsdp)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda *a: attention(*a, implementation="splash", rules=RULES))(q, k, v, segments)
        assert "shard_map" in str(jaxpr)
        want_out, want_grads = _loss_and_grads("xla")(q, k, v, segments)
        out, grads = _loss_and_grads("splash")(q, k, v, segments)
    assert _max_diff(out, want_out) <= F32_TOLERANCE
    for name, got, want in zip("qkv", grads, want_grads, strict=True):
        assert _max_diff(got, want) <= F32_TOLERANCE, f"d/d{name}"


@pytest.mark.filterwarnings("error:model.attention:UserWarning")  # a fallback to xla would prove nothing
def test_model_with_splash_matches_xla_on_a_sharded_mesh():
    """A toy Transformer on 8 devices (fsdp 4, tensor 2): same loss and parameter gradients."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    base = dict(vocab_size=256, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128, max_seq_len=128)
    rows, length = 4, 128
    segments = _packed_segments(rows, length)
    starts = np.concatenate([np.ones((rows, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    positions = np.stack([np.arange(length) - np.maximum.accumulate(np.where(s, np.arange(length), 0)) for s in starts])
    tokens = np.random.default_rng(0).integers(0, 256, (rows, length))

    def loss_fn(model, tokens, positions, segments):
        logits = model(tokens[:, :-1], positions[:, :-1], segments[:, :-1])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.mean(nll * (segments[:, 1:] > 0))

    results = {}
    for implementation in ("xla", "splash"):
        model = create_model(ModelConfig(**base, attention=implementation), RULES, seed=0, mesh=mesh)
        with jax.set_mesh(mesh):
            batch = [jax.device_put(jnp.asarray(a, jnp.int32), batch_sharding(mesh, RULES, a.shape))
                     for a in (np.pad(tokens, ((0, 0), (0, 1))), np.pad(positions, ((0, 0), (0, 1))),
                               np.pad(segments, ((0, 0), (0, 1))))]
            loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model, *batch)
        results[implementation] = (float(loss), nnx.to_pure_dict(grads))
    (loss_xla, grads_xla), (loss_splash, grads_splash) = results["xla"], results["splash"]
    assert abs(loss_xla - loss_splash) <= F32_TOLERANCE
    diffs = jax.tree.map(_max_diff, grads_splash, grads_xla)
    assert max(jax.tree.leaves(diffs)) <= F32_TOLERANCE, diffs


def test_splash_falls_back_to_xla_with_a_reason():
    q, k, v, segments = _inputs(1, 96, 4, 2)
    with pytest.warns(UserWarning, match="multiple of 128"):
        out = attention(q, k, v, segments, implementation="splash", rules=())
    want = attention(q, k, v, segments, implementation="xla", rules=())
    assert _max_diff(out, want) == 0.0


def test_cudnn_on_cpu_is_a_clear_error():
    q, k, v, segments = _inputs(1, 128, 4, 2, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="model.attention=cudnn needs a CUDA GPU"):
        attention(q, k, v, segments, implementation="cudnn", rules=())


def test_attention_kernel_per_platform():
    bf16 = ModelConfig(dtype="bfloat16")
    assert attention_kernel(bf16, "tpu", 512) == ("splash", "auto on tpu: splash, blocks of 512")
    assert attention_kernel(bf16, "tpu", 384)[0] == "splash"  # blocks of 128
    assert attention_kernel(bf16, "tpu", 100)[0] == "xla"
    assert attention_kernel(bf16, "gpu") == ("cudnn", "auto on gpu: cuDNN flash attention")
    assert attention_kernel(bf16, "cuda")[0] == "cudnn"
    assert attention_kernel(ModelConfig(), "gpu")[0] == "xla"  # float32 compute: cuDNN flash needs half precision
    assert attention_kernel(ModelConfig(dtype="bfloat16", embed_dim=80, num_heads=4), "gpu")[0] == "xla"  # head_dim 20
    assert attention_kernel(bf16, "cpu")[0] == "xla"
    assert attention_kernel(ModelConfig(attention="xla"), "tpu") == ("xla", "model.attention=xla")
    assert "interpret" in attention_kernel(ModelConfig(attention="splash"), "cpu", 256)[1]
    kernel, why = attention_kernel(ModelConfig(attention="cudnn"), "cpu")
    assert kernel == "cudnn" and why.startswith("unavailable: model.attention=cudnn needs a CUDA GPU")
    assert attention_kernel(ModelConfig(attention="splash"), "gpu")[1].startswith("unavailable:")


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "one_sequence"])
def test_cudnn_path_lowers_to_the_flash_kernel_for_cuda(monkeypatch, packed):
    """Exported for cuda from this CPU machine: the flash custom calls, a bias only with segments.

    jax asks the installed cuDNN for its version while tracing; there is none here, so that
    query is stubbed, and the custom calls (no stability guarantee) are allowed explicitly.
    """
    import re

    from jax import export
    from jax._src.cudnn import fused_attention_stablehlo

    from model.attention import _cudnn

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    q, k, v, segments = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in _inputs(2, 128, 4, 2, 64, jnp.bfloat16))

    def grads(q, k, v, segments):
        def loss(q, k, v):
            return _cudnn(q, k, v, segments if packed else None, RULES).astype(jnp.float32).sum()

        return jax.grad(loss, (0, 1, 2))(q, k, v)

    calls = [f"__cudnn$fmha{bias}Softmax{bwd}" for bias in ("", "ScaleBias") for bwd in ("", "Backward")]
    exported = export.export(jax.jit(grads), platforms=("cuda",),
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(c) for c in calls])
    module = exported(q, k, v, segments).mlir_module()
    names = sorted(set(re.findall(r"custom_call @([\w$]+)", module)))
    assert names == (calls[2:] if packed else calls[:2])
    assert "is_flash_attention\\22: true" in module and "mask_type\\22: \\22CAUSAL\\22" in module
