"""Causal self-attention for training: one entry point, a kernel per platform.

    out = attention(q, k, v, segment_ids, implementation=cfg.attention, rules=rules)

Every kernel computes the same thing: causal attention where a token sees only earlier
tokens of its own packed segment (segment id 0, padding, is a segment like the others, as
in the dense mask), scale head_dim**-0.5, grouped or multi-query heads.

- xla: `jax.nn.dot_product_attention` with a dense [B, 1, T, T] segment mask.
- splash (TPU): the Pallas splash-attention kernel, vmapped over the batch, with a causal
  `MultiHeadMask` and `SegmentIds`; it has its own backward kernels (custom VJP). A
  pallas_call has no sharding rule, so under a mesh it runs in `jax.shard_map`: batch over
  the batch axes, heads over the heads axes, kv heads too when they split the same way (else
  every shard takes the kv heads its query heads use). On CPU it runs in Pallas interpret
  mode (`interpret=True`, the HLO interpreter): slow, for tests. (The TPU interpreter,
  `pltpu.InterpretParams`, fails under the batch vmap in jax 0.10.2.)
- cudnn (GPU): cuDNN flash attention through `jax.nn.dot_product_attention`. Without
  segments it is the causal mask type and no mask array at all. With segments it passes
  the [B, 1, T, T] mask, which jax turns into an additive bias for the same flash kernel.
  The packed (THD) layout (`q_offsets`/`kv_offsets` in jax's cuDNN module) would avoid
  that array, but it needs a static bound M on segments per row, Hopper, and keeps
  [B*M, heads, T] float32 softmax statistics: ponder packs many short examples per row, so
  a safe M makes those larger than the bias (2 bytes * B * T * T, shared by all heads).
- auto: splash on TPU, cudnn on GPU (bfloat16/float16 compute), xla elsewhere.

Where a kernel's conditions are not met (splash: T a multiple of 128; cudnn: half
precision, head_dim a multiple of 8 up to 256) it falls back to xla, with a warning when
the kernel was asked for by name. `attention_kernel` says which runs and why (`ponder info`).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from configs.schema import ModelConfig
from model.sharding import Rules, logical_to_spec

_SPLASH_BLOCKS = (512, 256, 128)  # largest first: bigger tiles run faster; T must be a multiple of one
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def attention_kernel(cfg: ModelConfig, platform: str, seq_len: int | None = None) -> tuple[str, str]:
    """(kernel, why) for `cfg.attention` on `platform` ("cpu", "gpu"/"cuda", "tpu").

    kernel is "xla", "splash" or "cudnn"; with `seq_len` the length conditions are checked
    too. A kernel that cannot run on the platform at all comes back with its name and a
    reason starting "unavailable:" (`attention` raises that reason).
    """
    kernel, why, error = _choose(cfg.attention, platform, jnp.dtype(cfg.dtype), seq_len, cfg.resolved_head_dim)
    return (kernel, f"unavailable: {error}") if error else (kernel, why)


def _choose(requested: str, platform: str, dtype, seq_len: int | None, head_dim: int) -> tuple[str, str, str | None]:
    """(kernel, why, error): the one place that decides which kernel runs."""
    platform = "gpu" if platform in ("gpu", "cuda") else platform
    if requested == "xla":
        return "xla", "model.attention=xla", None
    if requested == "auto":
        if platform == "tpu":
            return _check_splash(seq_len, "auto on tpu: splash")
        if platform == "gpu":
            return _check_cudnn(dtype, head_dim, "auto on gpu: cuDNN flash attention")
        return "xla", f"auto on {platform}: XLA (fused kernels are for tpu and gpu)", None
    if requested == "splash":
        if platform == "tpu":
            return _check_splash(seq_len, "model.attention=splash")
        if platform == "cpu":
            return _check_splash(seq_len, "model.attention=splash in Pallas interpret mode on cpu (slow: for tests)")
        return "splash", "", (f"model.attention=splash is a TPU kernel; this process runs on {platform} "
                              "(use auto or xla)")
    if requested == "cudnn":
        if platform == "gpu":
            return _check_cudnn(dtype, head_dim, "model.attention=cudnn: cuDNN flash attention")
        return "cudnn", "", (f"model.attention=cudnn needs a CUDA GPU with cuDNN; this process runs on {platform} "
                             "(use auto or xla)")
    raise ValueError(f"model.attention: unknown kernel {requested!r}; expected auto, xla, cudnn or splash")


def _check_splash(seq_len: int | None, why: str) -> tuple[str, str, str | None]:
    if seq_len is None:
        return "splash", f"{why} (sequence lengths that are not a multiple of 128 use xla)", None
    if seq_len % _SPLASH_BLOCKS[-1]:
        return "xla", f"{why} needs a sequence length that is a multiple of 128, got {seq_len}: xla", None
    return "splash", f"{why}, blocks of {_splash_block(seq_len)}", None


def _check_cudnn(dtype, head_dim: int, why: str) -> tuple[str, str, str | None]:
    if jnp.dtype(dtype) not in _HALF:
        return "xla", f"{why} needs bfloat16 or float16 compute, model.dtype is {jnp.dtype(dtype).name}: xla", None
    if head_dim % 8 or head_dim > 256:
        return "xla", f"{why} needs head_dim a multiple of 8 up to 256, got {head_dim}: xla", None
    return "cudnn", why, None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
              implementation: str, rules: Rules) -> jax.Array:
    """Causal attention within packed segments: [B, T, heads, D] out.

    q: [B, T, heads, D]; k, v: [B, T, kv_heads, D] (kv_heads divides heads); segment_ids:
    [B, T] int or None (one sequence per row). implementation: auto, xla, cudnn or splash
    (`model.attention`); rules: the logical axis rules, used under a mesh (`jax.set_mesh`).
    """
    kernel, why, error = _choose(implementation, jax.default_backend(), q.dtype, q.shape[1], q.shape[-1])
    if error:
        raise ValueError(error)
    if kernel == "xla" and implementation not in ("xla", "auto"):
        warnings.warn(why, stacklevel=2)
    if kernel == "splash":
        return _splash(q, k, v, segment_ids, rules)
    if kernel == "cudnn":
        return _cudnn(q, k, v, segment_ids, rules)
    return jax.nn.dot_product_attention(q, k, v, mask=_dense_mask(segment_ids), is_causal=True, implementation="xla")


def _dense_mask(segment_ids: jax.Array | None) -> jax.Array | None:
    """[B, 1, T, T] bool: same segment (the causal part is the kernels' own)."""
    if segment_ids is None:
        return None
    return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


# -- cuDNN --


def _cudnn(q, k, v, segment_ids, rules):
    """cuDNN flash attention; segments as a mask (see the module docstring for why not the packed layout)."""
    mesh = jax.sharding.get_abstract_mesh()
    mask = _dense_mask(segment_ids)
    if not mesh.empty and rules:
        # jax's cuDNN partitioner wants q, k and v split alike and never along T or D.
        q_spec, kv_spec = _head_specs(mesh, rules, q.shape, k.shape)
        spec = q_spec if q_spec == kv_spec else PartitionSpec(q_spec[0], None, None, None)
        q, k, v = (jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec)) for a in (q, k, v))
        if mask is not None:
            mask = jax.lax.with_sharding_constraint(mask, NamedSharding(mesh, PartitionSpec(spec[0], None, None, None)))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def _head_specs(mesh, rules, q_shape, kv_shape) -> tuple[PartitionSpec, PartitionSpec]:
    """[B, T, heads, D] specs for q and for k/v: batch and heads split by the rules, T and D whole.

    k/v keep their heads split only where it is the split of q's heads (else replicated).
    """
    def spec(heads_axis, shape):
        batch, _, heads, _ = logical_to_spec(("batch", "length", heads_axis, "head_dim"), rules, mesh, shape)
        return PartitionSpec(batch, None, heads, None)

    q_spec, kv_spec = spec("heads", q_shape), spec("kv_heads", kv_shape)
    if kv_spec[2] != q_spec[2]:
        kv_spec = PartitionSpec(kv_spec[0], None, None, None)
    return q_spec, kv_spec


# -- splash (TPU) --


def _splash_block(seq_len: int) -> int:
    return next(b for b in _SPLASH_BLOCKS if seq_len % b == 0)


def _splash(q, k, v, segment_ids, rules):
    """Splash attention, in a shard_map under a mesh: [B, T, heads, D] in and out."""
    heads, head_dim = q.shape[2], q.shape[3]
    q = (q.astype(jnp.float32) * head_dim**-0.5).astype(q.dtype)  # splash does not scale q
    segmented = segment_ids is not None
    if not segmented:
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)  # a placeholder the shard_map can split; unused
    mesh = jax.sharding.get_abstract_mesh()
    manual = set(getattr(mesh, "manual_axes", ()))
    free = () if mesh.empty else tuple(a for a in mesh.axis_names if a not in manual)
    local = functools.partial(_splash_local, heads=heads, segmented=segmented,
                              interpret=jax.default_backend() == "cpu")
    if not free:
        return local(q, k, v, segment_ids, head_axes=None)
    q_spec, kv_spec = _head_specs(mesh, rules, q.shape, k.shape)
    body = functools.partial(local, head_axes=q_spec[2] if kv_spec[2] is None else None)
    return jax.shard_map(
        body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[0], None)), out_specs=q_spec,
        axis_names=set(free), check_vma=False,
    )(q, k, v, segment_ids)


def _splash_local(q, k, v, segment_ids, *, heads: int, segmented: bool, head_axes, interpret: bool):
    """Splash on one shard. q: [b, T, h, D]; k, v: [b, T, kv, D]; segment_ids: [b, T].

    head_axes: the mesh axes q's heads are split over when k/v's are not; each shard then
    takes the kv heads its own query heads use.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    local_heads, seq_len = q.shape[2], q.shape[1]
    if head_axes is not None:
        k, v = (_kv_for_local_heads(a, jax.lax.axis_index(head_axes) * local_heads, local_heads, heads)
                for a in (k, v))
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [b, heads, T, D]: the kernel's layout
    is_mqa = k.shape[1] == 1
    kernel = _splash_kernel(local_heads, seq_len, is_mqa, interpret)
    if is_mqa:
        k, v = k[:, 0], v[:, 0]

    def one_row(q, k, v, ids):
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids) if segmented else None)

    return jnp.swapaxes(jax.vmap(one_row)(q, k, v, segment_ids), 1, 2)


def _kv_for_local_heads(kv: jax.Array, first_head, local_heads: int, heads: int) -> jax.Array:
    """The kv heads [b, T, n, D] used by query heads first_head..first_head+local_heads-1 of `heads`.

    kv: [b, T, kv_heads, D], all heads. Query head h uses kv head h // (heads // kv_heads).
    """
    group = heads // kv.shape[2]
    if local_heads % group == 0 or group % local_heads == 0:  # whole groups, or one group: a slice keeps GQA
        return jax.lax.dynamic_slice_in_dim(kv, first_head // group, max(1, local_heads // group), axis=2)
    return jnp.take(kv, (first_head + jnp.arange(local_heads)) // group, axis=2)  # groups cut across shards


def _splash_kernel(num_heads: int, seq_len: int, is_mqa: bool, interpret: bool):
    """A causal splash kernel for [num_heads, seq_len, D] queries, square blocks sized to seq_len."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    mask = masks.MultiHeadMask([masks.CausalMask((seq_len, seq_len)) for _ in range(num_heads)])
    b = _splash_block(seq_len)
    blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                               block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    make = splash.make_splash_mqa if is_mqa else splash.make_splash_mha
    # One shard's heads and the whole sequence: shard_map has already split them.
    return make(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)

