"""Native CPU kernels behind XLA custom calls (`jax.ffi`), compiled on first use.

Two kernels serve a decode step (`kernels/`, see each file's header):
- `paged_attention.cc`: one-token paged attention, one call per layer, in place of the
  many small ops XLA:CPU makes of it.
- `small_matmul.cc`: x @ w for at most 8 rows, reading each weight once from a copy packed
  strip by strip (`model/decode.py` makes it once per decode loop); XLA's Eigen GEMM packs
  the weight anew on every call.
They are used only where they apply (`decode_attention_unfit`, `kernels_may_run`):
lowering for CPU, float32, and every device computing on its own rows. Everywhere else on
CPU XLA's ops run (`model/paged.py: attend_paged_xla`, a plain dot), the kernels' references
in the tests; TPU and GPU have their own decode kernels (`model/pallas_paged.py`).

The sources are compiled into one library with the machine's C++ compiler (`$CXX`, else
`c++`, `g++`) against the XLA FFI headers that ship with jaxlib, into
`$PONDER_CACHE_DIR/kernels` (default `~/.cache/ponder/kernels`), once per source, compiler
flags, jaxlib and CPU; a later process loads the cached library. Since anyone can compute
its name, the cache is trusted only if the directory and the library are the current
user's and writable by no one else (new directories are made 0700); otherwise ponder warns
and builds a private copy. When there is no compiler or the build fails, ponder warns once
and keeps XLA's ops. `PONDER_CPU_KERNELS=0` turns the kernels off."""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from configs.fileio import atomic_path
from model.sharding import split_axes_left_to_xla

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


def _library_name(compiler: str) -> str:
    """The cached library's file name: a hash of SOURCES, FLAGS, jaxlib, the compiler and the CPU."""
    import jaxlib

    sources = [path.read_bytes() for path in SOURCES]
    key = hashlib.sha256(b"\0".join([*sources, " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
                                     compiler.encode(), _cpu_identity().encode()])).hexdigest()[:16]
    return f"ponder_cpu_kernels-{key}.so"


def _build(compiler: str) -> Path:
    """The library of SOURCES for these flags, jaxlib and CPU: the cached one if it can be trusted, else built."""
    directory = _trusted_cache_dir()
    if directory is None:  # build where no one else can write: a fresh private directory, removed at exit
        directory = Path(tempfile.mkdtemp(prefix="ponder-kernels-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    target = directory / _library_name(compiler)
    if os.path.lexists(target):
        problem = _untrusted(target, directory=False)
        if problem is None:
            return target
        warnings.warn(f"ponder: not loading {target}: {problem}; building a new one in its place", stacklevel=3)
    # Built under a temporary name and renamed: processes building at once each get a whole file.
    with atomic_path(target, mode=0o755) as tmp:
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", str(tmp)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{result.stderr[-2000:]}")
    return target


def _trusted_cache_dir() -> Path | None:
    """`cache_dir()`, made 0700 where missing, if it can be trusted; None (with a warning if it exists
    but cannot be trusted) when the kernels must be built privately instead."""
    directory = cache_dir()
    try:
        missing = [path for path in (directory, *directory.parents) if not os.path.lexists(path)]
        for path in reversed(missing):
            path.mkdir(mode=0o700, exist_ok=True)
        problem = _untrusted(directory, directory=True)
    except OSError:  # an unwritable home, say
        return None
    if problem is not None:
        warnings.warn(f"ponder: not using the kernel cache {directory}: {problem}; building a private copy "
                      f"(make it yours and `chmod go-w` it to cache the kernels again)", stacklevel=4)
        return None
    return directory


def _untrusted(path: Path, *, directory: bool) -> str | None:
    """Why `path` may hold a library someone else planted, or None: it must be the current user's,
    a directory (followed through links) or a regular file (not a link), and writable by no one else."""
    info = os.stat(path) if directory else os.lstat(path)
    if not (stat.S_ISDIR if directory else stat.S_ISREG)(info.st_mode):
        return "not a directory" if directory else "not a regular file"
    if info.st_uid != os.getuid():
        return f"owned by uid {info.st_uid}, not by this user ({os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


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


def decode_attention_unfit(q, cache) -> str | None:
    """Why `paged_decode_attention` may not serve this attention when lowered for CPU; None if it may.

    It serves one new token per row, float32 queries and pools, where `kernels_unavailable` is None.
    """
    if q.shape[1] != 1:
        return "more than one new token per row"
    if q.dtype != jnp.float32 or cache.k.dtype != jnp.float32:
        return "the native CPU kernel serves float32 only"
    return kernels_unavailable()


def kernels_may_run() -> bool:
    """CPU is JAX's default backend, every mesh axis of more than one device is manual, and the kernels built."""
    return kernels_unavailable() is None


def kernels_unavailable() -> str | None:
    """Why the kernels may not run here, or None: CPU must be JAX's default backend (an accelerator
    host lowers for its accelerator: build nothing there), no mesh axis of more than one device may
    be left to XLA's partitioner (`split_axes_left_to_xla`: a custom call has no sharding rule), and
    the kernels must have built."""
    if jax.default_backend() != "cpu":
        return f"JAX's default backend is {jax.default_backend()}, not CPU"
    if axes := split_axes_left_to_xla():
        return f"mesh axes {', '.join(axes)} are split by XLA's partitioner, and a custom call has no sharding rule"
    kernels = status()
    return None if kernels.available else kernels.detail


def paged_decode_attention(q, cache, layer, page_table, lengths, num_new) -> jax.Array:
    """`attend_paged` for one new token per row, by the native kernel; same arguments and result.

    q: [B, 1, heads, head_dim] float32; the pools [kv_heads, layers, pages, page_size, head_dim]
    are read in place. Lower for CPU only (see `model.paged.attend_paged`).
    """
    head_dim = q.shape[-1]
    # The query at slot `lengths` sees slots 0..lengths; a row writing nothing sees 0..lengths - 1, as in XLA's.
    limits = jnp.minimum(lengths + 1, lengths + num_new).astype(jnp.int32)
    queries = q[:, 0]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(queries.shape, jnp.float32), vmap_method="sequential")
    out = call(queries, cache.k, cache.v, jnp.asarray(layer, jnp.int32), page_table.astype(jnp.int32), limits,
               scale=np.float32(head_dim**-0.5))
    return out[:, None]


def small_matmul(x: jax.Array, packed: jax.Array) -> jax.Array:
    """x [rows <= 8, K] float32 @ a weight packed [N / 16, K, 16] (`model.decode.DecodeWeight`) -> [rows, N].

    Lower for CPU only, where `kernels_may_run` (see `model.decode.decode_matmul`).
    """
    strips, _, strip = packed.shape
    call = jax.ffi.ffi_call(MATMUL_TARGET, jax.ShapeDtypeStruct((x.shape[0], strips * strip), jnp.float32),
                            vmap_method="sequential")
    return call(x, packed)
