"""Native CPU kernels behind XLA custom calls (`jax.ffi`), compiled on first use.

Two kernels serve a decode step (`kernels/`, see each file's header):
- `paged_attention.cc`: one-token paged attention, one call per layer. XLA:CPU runs it as
  some fifty small ops per layer, a third of a decode step of the `small` model though it
  does a tenth of the step's arithmetic.
- `small_matmul.cc`: x @ w for at most 8 rows, reading each weight once, from a copy laid
  out strip by strip that a decode loop makes once (`decode_weight`). XLA's Eigen GEMM packs
  the weight matrix on every call, and a decode step of a small model is mostly a pass over
  its weights.
They are used only where they apply (`decode_attention_kernel_applies`, `decode_matmul`):
lowering for CPU, float32, and every device computing on its own rows. Everywhere else,
TPU and GPU included, XLA's ops run (`model/paged.py: attend_paged_xla`, a plain dot),
the kernels' references in the tests.

The sources are compiled into one library with the machine's C++ compiler (`$CXX`, else
`c++`, `g++`) against the XLA FFI headers that ship with jaxlib, into
`$PONDER_CACHE_DIR/kernels` (default `~/.cache/ponder/kernels`), once per source, compiler
flags, jaxlib and CPU; a later process loads the cached library. When there is no compiler
or the build fails, ponder warns once and keeps XLA's ops. `PONDER_CPU_KERNELS=0` turns the
kernels off."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from configs.fileio import atomic_path

KERNELS = Path(__file__).with_name("kernels")
SOURCES = (KERNELS / "paged_attention.cc", KERNELS / "small_matmul.cc")
TARGET = "ponder_paged_decode_attention"
MATMUL_TARGET = "ponder_small_matmul"
MATMUL_MAX_ROWS, MATMUL_COLUMN_MULTIPLE = 8, 16
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class KernelStatus:
    """Whether the CPU kernels are registered with XLA, and where they came from or why not."""

    available: bool
    detail: str  # the library's path, or the reason they are off


def cache_dir() -> Path:
    """Where compiled kernels are kept: $PONDER_CACHE_DIR/kernels, else ~/.cache/ponder/kernels."""
    root = os.environ.get("PONDER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ponder")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags (Linux), else the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    lines = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(lines))


def _build(compiler: str) -> Path:
    """The library of SOURCES for these flags, jaxlib and CPU, built if the cache lacks it."""
    import jaxlib

    sources = [path.read_bytes() for path in SOURCES]
    key = hashlib.sha256(b"\0".join([*sources, " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
                                     compiler.encode(), _cpu_identity().encode()])).hexdigest()[:16]
    target = cache_dir() / f"ponder_cpu_kernels-{key}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable home: build into the temporary directory instead
        target = Path(tempfile.gettempdir()) / f"ponder-kernels-{os.getuid()}" / target.name
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once each get a whole file.
    with atomic_path(target, mode=0o755) as tmp:
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", str(tmp)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{result.stderr[-2000:]}")
    return target


_registered: Path | None = None  # the library whose handler XLA holds (a target registers once per process)


@functools.cache
def status() -> KernelStatus:
    """Builds (or loads from the cache) and registers the kernels once per process; never raises."""
    global _registered
    if os.environ.get("PONDER_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return KernelStatus(False, "turned off by PONDER_CPU_KERNELS")
    if _registered is not None:
        return KernelStatus(True, str(_registered))
    compiler = _compiler()
    if compiler is None:
        return _unavailable("no C++ compiler found (set CXX, or install g++)")
    try:
        path = _build(compiler)
        library = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.PagedDecodeAttention), platform="cpu")
        jax.ffi.register_ffi_target(MATMUL_TARGET, jax.ffi.pycapsule(library.SmallMatmul), platform="cpu")
    except Exception as err:  # a failed build must never stop a run: the XLA implementation remains
        return _unavailable(f"{type(err).__name__}: {err}")
    _registered = path
    return KernelStatus(True, str(path))


def _unavailable(reason: str) -> KernelStatus:
    warnings.warn(f"ponder's CPU decode kernels are unavailable, using XLA's ops instead ({reason})", stacklevel=3)
    return KernelStatus(False, reason)


def decode_attention_kernel_applies(q, cache) -> bool:
    """Whether `paged_decode_attention` may serve this attention when lowered for CPU.

    One new token per row, float32 queries and pools, CPU as JAX's default backend, and no
    mesh axis of more than one device left to XLA's partitioner (outside a mesh, or inside
    a `shard_map` that makes every such axis manual): a custom call has no sharding rule,
    so XLA would gather the whole page pool onto every device for it.
    """
    if q.shape[1] != 1 or q.dtype != jnp.float32 or cache.k.dtype != jnp.float32:
        return False
    return _may_run_here()


def _may_run_here() -> bool:
    """CPU is JAX's default backend, every mesh axis of more than one device is manual, and the kernels built."""
    if jax.default_backend() != "cpu":  # an accelerator host lowers for its accelerator: build nothing there
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and any(size > 1 and name not in mesh.manual_axes for name, size in mesh.shape.items()):
        return False
    return status().available


def paged_decode_attention(q, cache, layer, page_table, lengths, num_new) -> jax.Array:
    """`attend_paged` for one new token per row, by the native kernel; same arguments and result.

    q: [B, 1, heads, head_dim] float32. Lower for CPU only (see `model.paged.attend_paged`).
    """
    head_dim = q.shape[-1]
    # The query at slot `lengths` sees slots 0..lengths, and none when the row writes nothing.
    limits = jnp.minimum(lengths + 1, lengths + num_new).astype(jnp.int32)
    queries = q[:, 0]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(queries.shape, jnp.float32), vmap_method="sequential")
    out = call(queries, cache.k, cache.v, jnp.asarray(layer, jnp.int32), page_table.astype(jnp.int32), limits,
               scale=np.float32(head_dim**-0.5))
    return out[:, None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeWeight:
    """A weight [K, N] in the small-matmul kernel's layout: packed [N / 16, K, 16], each strip of 16
    output columns one contiguous run (`decode_weight` makes it once, outside a decode loop)."""

    packed: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        strips, k, strip = self.packed.shape
        return k, strips * strip

    def unpacked(self) -> jax.Array:
        """The [K, N] weight again (for XLA's dot where the kernel does not apply)."""
        return unpack(self.packed)


def unpack(packed: jax.Array) -> jax.Array:
    """[N / 16, K, 16] -> [K, N]: `decode_weight`'s packing undone."""
    strips, k, strip = packed.shape
    return packed.transpose(1, 0, 2).reshape(k, strips * strip)


def decode_weight(w: jax.Array, rows: int, dtype) -> jax.Array | DecodeWeight:
    """`w` [K, N] as `decode_matmul` reads it fastest for `rows` rows computed in `dtype`.

    Where the kernel applies (at most 8 rows, float32 weight and compute, N a multiple of 16,
    the conditions of `decode_attention_kernel_applies`): a `DecodeWeight`, a packed copy made
    here, once, and read by the kernel on every token. Anywhere else `w` itself.
    """
    if (rows > MATMUL_MAX_ROWS or w.ndim != 2 or w.shape[1] % MATMUL_COLUMN_MULTIPLE or w.dtype != jnp.float32
            or jnp.dtype(dtype) != jnp.float32 or not _may_run_here()):
        return w
    k, n = w.shape
    return DecodeWeight(w.reshape(k, n // MATMUL_COLUMN_MULTIPLE, MATMUL_COLUMN_MULTIPLE).transpose(1, 0, 2))


def decode_matmul(x, w: jax.Array | DecodeWeight) -> jax.Array:
    """x @ w for a decode step (computed in x's dtype), by the native small-batch kernel where it applies.

    x: [..., K]. The kernel serves a `DecodeWeight` (from `decode_weight`) with at most 8 rows of
    float32 x, under the conditions of `decode_attention_kernel_applies`; anything else is
    XLA's dot. Not differentiable: for the decode path (`Block.paged` with `sliced_layers`) only.
    """
    if not isinstance(w, DecodeWeight):
        return x @ w.astype(x.dtype)
    rows = math.prod(x.shape[:-1])
    if rows > MATMUL_MAX_ROWS or x.dtype != jnp.float32 or not _may_run_here():
        return x @ w.unpacked().astype(x.dtype)
    flat = x.reshape(rows, x.shape[-1])
    out = jax.lax.platform_dependent(flat, w.packed, cpu=_small_matmul, default=lambda x, p: x @ unpack(p))
    return out.reshape(*x.shape[:-1], w.shape[1])


def _small_matmul(x, packed):
    strips, _, strip = packed.shape
    call = jax.ffi.ffi_call(MATMUL_TARGET, jax.ShapeDtypeStruct((x.shape[0], strips * strip), jnp.float32),
                            vmap_method="sequential")
    return call(x, packed)
