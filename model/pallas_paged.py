"""Which kernel serves a one-token paged decode attention, and the Pallas kernels for TPU and GPU.

`model.paged.attend_paged` asks `decode_branches` for each platform's kernel and runs it
under `platform_dependent` (each branch lowered for its own platform only); `decode_kernel`
names the kernel a config gets, and why not when it falls back to XLA's ops
(`attend_paged_xla`), for `ponder info`. The choice:

- TPU: JAX's stock Pallas `paged_attention` (`ops/tpu/paged_attention`). It reads keys and
  values in bfloat16 whatever the pool's dtype, so "auto" gives it bfloat16 pools only
  (a float32 pool keeps XLA's exact attention); "pallas" gives it float32 pools too.
- CUDA GPU: JAX's stock Pallas Triton `paged_attention` (`ops/gpu/paged_attention`), its
  dots at full float32 precision (not TF32), as XLA's decode attention computes them.
- CPU: ponder's native kernel (`model.cpu_kernels`) for "auto"; for "pallas" the GPU kernel
  in interpret mode, slow, so that a whole decode through it can be tested on CPU.
- ROCm and anything else: XLA (the Triton kernel is untried there).

Both stock kernels take the pool as [kv_heads, total_pages, page_size, head_dim]: ponder's
whole pool by a free reshape (`PagedKVCache.flat_pools`), with the layer's page ids offset
into it (`pool_pages`), so no layer is sliced out. Neither scales q (ponder's is
head_dim**-0.5, applied here), and each sees `limits` slots: the new token's slot and those
before it, as many as `attend_paged_xla` shows a row (none for an empty one: zeros).
A pallas_call has no sharding rule: under a mesh with an axis of more than one device left
to XLA's partitioner the kernels stand down (`model.sharding.split_axes_left_to_xla`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import mlir

from configs.schema import ModelConfig
from model import cpu_kernels
from model.sharding import split_axes_left_to_xla

TPU_BLOCK_SLOTS = 128  # keys per TPU compute block: a short search path wastes at most one block's DMA
GPU_BLOCK_SLOTS = 64  # keys per Triton program step; at least 16, the least a Triton dot takes
GPU_MAX_SPLITS = 16  # the Triton kernel's sequence partitions, run in parallel: few rows, still many programs
GPU_BLOCK_H = 16  # query heads per Triton program (the kernel's least; a kv head's group is padded to it)
NAMES = {"tpu": "pallas-tpu paged_attention", "cuda": "pallas-gpu paged_attention (Triton)",
         "cpu": "native CPU kernel", "interpret": "pallas-gpu paged_attention (Triton), interpreted", "xla": "xla"}
IMPLEMENTATIONS = ("auto", "xla", "pallas")  # `model.decode_attention`
# The custom call the GPU kernel lowers to, whose Triton IR jax.export does not promise stable across jax
# versions: an exported program holding it must run under the jax that exported it (as `search.export` demands).
UNSTABLE_EXPORT_TARGETS = ("__gpu$xla.gpu.triton",)


def decode_kernel(cfg: ModelConfig, platform: str, page_size: int = 16) -> tuple[str, str]:
    """(kernel name, reason) for a one-token decode of `cfg`'s model on `platform`, outside a split mesh.

    platform: "cpu", "tpu", "gpu"/"cuda", "rocm" (`jax.default_backend()`); page_size: the
    search's (`search.page_size`). The name is one of NAMES' values; the reason says why no
    kernel applies when the name is "xla", and is empty otherwise (or a note: the interpreted
    kernel is slow). Asking about "cpu" builds the native kernels when CPU is JAX's default backend.
    """
    from model.paged import PagedKVCache  # model.paged imports this module

    dtype = jnp.dtype(cfg.dtype)
    heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    q = jax.ShapeDtypeStruct((1, 1, heads, head_dim), dtype)
    pool = jax.ShapeDtypeStruct((kv_heads, cfg.num_layers, 1, page_size, head_dim), dtype)
    _, name, reason = _choose(_platform(platform), cfg.decode_attention, q, PagedKVCache(pool, pool))
    return name, reason


def decode_branches(q, cache, implementation: str) -> dict[str, Callable]:
    """The kernel for each lowering platform where one applies: {platform: fn}, fn with `attend_paged`'s
    arguments and result; platforms left out run `attend_paged_xla`."""
    branches = {}
    for platform in ("cpu", "cuda", "tpu"):
        kernel, _, _ = _choose(platform, implementation, q, cache)
        if kernel is not None:
            branches[platform] = kernel
    return branches


def pallas_decode_applies(q, cache, platform: str) -> bool:
    """Whether the Pallas kernel of `platform` ("tpu"; "gpu"/"cuda"; "cpu": the GPU kernel interpreted)
    may serve `attend_paged(q, cache, ...)`: q [B, 1, heads, head_dim], the shapes it takes, no split mesh."""
    return _pallas_unfit(_platform(platform), q, cache) is None


def _platform(platform: str) -> str:
    return "cuda" if platform == "gpu" else platform  # jax.default_backend() says "gpu" on CUDA


def _choose(platform: str, implementation: str, q, cache) -> tuple[Callable | None, str, str]:
    """(kernel or None for attend_paged_xla, its name, why not when None) on one lowering platform."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"model.decode_attention must be one of {IMPLEMENTATIONS}, not {implementation!r}")
    if implementation == "xla":
        return None, NAMES["xla"], "model.decode_attention=xla"
    if platform == "cpu" and implementation == "auto":
        reason = cpu_kernels.decode_attention_unfit(q, cache)
        return (None, NAMES["xla"], reason) if reason else (cpu_kernels.paged_decode_attention, NAMES["cpu"], "")
    if platform not in ("cpu", "cuda", "tpu"):
        return None, NAMES["xla"], f"no decode kernel for {platform}"
    reason = _pallas_unfit(platform, q, cache)
    if reason is None and platform == "tpu" and implementation == "auto" and cache.k.dtype != jnp.bfloat16:
        reason = ("the TPU kernel reads keys and values in bfloat16: a float32 pool keeps XLA's exact attention "
                  "(model.decode_attention=pallas to use the kernel anyway)")
    if reason is not None:
        return None, NAMES["xla"], reason
    if platform == "tpu":
        return tpu_decode_attention, NAMES["tpu"], ""
    if platform == "cuda":
        return gpu_decode_attention, NAMES["cuda"], ""
    return _gpu_interpreted, NAMES["interpret"], "slow: for tests and debugging"


def _pallas_unfit(platform: str, q, cache) -> str | None:
    """Why the Pallas kernel of `platform` may not serve this attention, or None (cpu: the GPU kernel interpreted)."""
    if q.shape[1] != 1:
        return "more than one new token per row (a prefill or a step's tokens)"
    head_dim, page_size, dtype = q.shape[-1], cache.page_size, jnp.dtype(q.dtype)
    if cache.k.dtype != dtype:
        return f"the query's dtype ({dtype}) is not the pool's ({cache.k.dtype})"
    if axes := split_axes_left_to_xla():
        return f"mesh axes {', '.join(axes)} are split by XLA's partitioner, and a pallas_call has no sharding rule"
    if platform == "tpu":
        if dtype not in (jnp.float32, jnp.bfloat16):
            return f"the TPU kernel takes float32 or bfloat16, not {dtype}"
        sublanes = 8 * 4 // dtype.itemsize  # a page is DMA'd whole: its slots fill the (8, 128) tiles of 32 bits
        if head_dim % 128 or page_size % sublanes:
            return (f"the TPU kernel needs head_dim a multiple of 128 and page_size of {sublanes} "
                    f"(here {head_dim} and {page_size})")
        return None
    if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"the GPU kernel takes float32, bfloat16 or float16, not {dtype}"
    if not (_power_of_two(head_dim) and head_dim >= 16 and _power_of_two(page_size)):
        return (f"Triton blocks need head_dim a power of two >= 16 and page_size a power of two "
                f"(here {head_dim} and {page_size})")
    return None


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def tpu_decode_attention(q, cache, layer, page_table, lengths, num_new) -> jax.Array:
    """`attend_paged` for q [B, 1, heads, head_dim] by the stock Pallas TPU kernel; same arguments and result.

    Keys and values are read in bfloat16 (the kernel's choice). A compute block is
    `tpu_pages_per_block` pages; the table is padded to a multiple of it.
    """
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    block = tpu_pages_per_block(cache.page_size, page_table.shape[1])
    queries, k_pool, v_pool, limits, pages = _kernel_inputs(q, cache, layer, page_table, lengths, num_new, block)
    out = paged_attention(queries, k_pool, v_pool, limits, pages, pages_per_compute_block=block)
    return out[:, None]


def tpu_pages_per_block(page_size: int, table_pages: int) -> int:
    """Pages per TPU compute block: TPU_BLOCK_SLOTS keys' worth, at most the table's width.

    A row's last block is read whole (the pages past its length are masked), so smaller
    blocks waste less on short rows; larger ones make fewer, longer DMAs.
    """
    return max(min(TPU_BLOCK_SLOTS // page_size, table_pages), 1)


def gpu_decode_attention(q, cache, layer, page_table, lengths, num_new, *, interpret: bool = False) -> jax.Array:
    """`attend_paged` for q [B, 1, heads, head_dim] by the stock Pallas Triton kernel; same arguments and result.

    interpret: run the kernel's Python on any backend (slow; for tests). The table is padded
    to `gpu_blocks`' pages per block times partitions; partitions past a row's length return
    at once.
    """
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    block, splits = gpu_blocks(cache.page_size, page_table.shape[1])
    queries, k_pool, v_pool, limits, pages = _kernel_inputs(q, cache, layer, page_table, lengths, num_new,
                                                            block * splits)
    # The kernel's dots take the default precision, which Triton runs as TF32 for float32.
    with jax.default_matmul_precision("highest"):
        out = paged_attention(queries, k_pool, v_pool, pages, limits, block_h=GPU_BLOCK_H,
                              pages_per_compute_block=block, k_splits=splits, interpret=interpret)
    return out[:, None]


def gpu_blocks(page_size: int, table_pages: int) -> tuple[int, int]:
    """(pages per compute block, sequence partitions) for the Triton kernel: GPU_BLOCK_SLOTS keys a
    block, and as many partitions (up to GPU_MAX_SPLITS) as the table has blocks."""
    block = max(GPU_BLOCK_SLOTS // page_size, 1)
    return block, min(GPU_MAX_SPLITS, -(-table_pages // block))


_gpu_interpreted = functools.partial(gpu_decode_attention, interpret=True)  # one object: lowerings are cached by it


def _kernel_inputs(q, cache, layer, page_table, lengths, num_new, width_multiple: int):
    """What both stock kernels take: (queries [B, heads, D] scaled, k and v pools [K, pages, S, D],
    limits [B] int32, pages [B, W] int32 with W the table's width padded to `width_multiple`)."""
    queries = q[:, 0] * q.shape[-1] ** -0.5  # as attend_paged_xla scales: in q's dtype
    capacity = page_table.shape[1] * cache.page_size
    # The query at slot `lengths` sees slots 0..lengths, a row writing nothing 0..lengths - 1 (attend_paged_xla's).
    limits = jnp.clip(jnp.minimum(lengths + 1, lengths + num_new), 0, capacity).astype(jnp.int32)
    pages = cache.pool_pages(layer, page_table)
    pages = jnp.pad(pages, ((0, 0), (0, -pages.shape[1] % width_multiple)))  # past every limit: never attended
    return queries, *cache.flat_pools(), limits, pages


def platform_dependent(*args, default: Callable, **branches: Callable):
    """`jax.lax.platform_dependent(*args, default=default, **branches)`, each branch lowered for its own platform only.

    `lax.platform_dependent` lowers every branch for every platform of a multi-platform
    lowering (`jax.export` for cpu, cuda and tpu), and a Pallas kernel lowers only for its own
    platform. Here the branches are the per-platform lowering rules of one primitive, which
    JAX lowers platform by platform. args: a pytree of arrays (and ints); not vmappable or
    differentiable.
    """
    flat, in_tree = jax.tree.flatten(args)
    flat = [jnp.asarray(leaf) for leaf in flat]
    out_shape = jax.eval_shape(default, *args)
    out_avals = tuple(jax.core.ShapedArray(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(out_shape))
    out = _platform_p.bind(*flat, in_tree=in_tree, branches=tuple(sorted(branches.items())), default=default,
                           out_avals=out_avals)
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)


_platform_p = Primitive("ponder_platform_dependent")
_platform_p.multiple_results = True
_platform_p.def_abstract_eval(lambda *_, out_avals, **__: out_avals)
_platform_p.def_impl(lambda *flat, **params: jax.jit(lambda *a: _platform_p.bind(*a, **params))(*flat))


def _platform_rule(platform: str | None):
    """The lowering of `_platform_p` on `platform` (None: any other): its branch, else the default."""

    def rule(ctx, *flat, in_tree, branches, default, out_avals):
        fn = dict(branches).get(platform, default)

        def flat_fn(*flat):
            return jax.tree.leaves(fn(*jax.tree.unflatten(in_tree, flat)))

        return mlir.lower_fun(flat_fn, multiple_results=True)(ctx, *flat)

    return rule


mlir.register_lowering(_platform_p, _platform_rule(None))
for _platform_name in ("cpu", "cuda", "rocm", "tpu"):
    mlir.register_lowering(_platform_p, _platform_rule(_platform_name), platform=_platform_name)
