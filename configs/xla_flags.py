"""XLA_FLAGS that `ponder` (and the test session) sets for XLA's CPU backend, before jax is imported.

XLA's CPU backend (jaxlib 0.10) hands matmuls to YNNPACK by default; at decode sizes (a few
rows against a weight matrix) its Eigen path is faster, and as fast for training (figures in
README.md). The flag that turns YNNPACK off is CPU-only and known to jaxlib 0.10.x alone, and
XLA aborts on flags it does not know, so it is added only on a CPU host. This module
imports no jax, and nothing of ours: it runs before the first `import jax`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
TPU_ENV_VARS = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES")


def tune_cpu_backend(environ: MutableMapping[str, str] = os.environ, dev: str | os.PathLike = "/dev") -> None:
    """Applies `cpu_backend_flags` to environ's XLA_FLAGS unless this is an accelerator host or jax is imported."""
    if "jax" in sys.modules or accelerator_host(environ, dev):
        return
    try:
        jaxlib = version("jaxlib")
    except PackageNotFoundError:
        return
    environ["XLA_FLAGS"] = cpu_backend_flags(environ.get("XLA_FLAGS", ""), jaxlib)


def cpu_backend_flags(flags: str, jaxlib_version: str) -> str:
    """XLA_FLAGS with YNNPACK matmuls turned off, unless the user set that flag or jaxlib may not know it."""
    if YNN_FLAG in flags or not jaxlib_version.startswith("0.10."):
        return flags
    return f"{flags} {YNN_FLAG}=".strip()


def accelerator_host(environ: Mapping[str, str] = os.environ, dev: str | os.PathLike = "/dev") -> bool:
    """Whether jax will run on an accelerator here, decided without importing jax.

    JAX_PLATFORMS decides when set (any platform but cpu). Otherwise: TPU environment
    variables, or a TPU (`dev`/accel*, VFIO groups in `dev`/vfio), NVIDIA GPU (`dev`/nvidia<N>,
    unless CUDA_VISIBLE_DEVICES hides them all) or AMD GPU (`dev`/kfd) device.
    """
    platforms = [p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return any(p != "cpu" for p in platforms)
    if any(environ.get(name) for name in TPU_ENV_VARS):
        return True
    dev = Path(dev)
    names = _listdir(dev)
    if any(re.fullmatch(r"accel\d+", n) for n in names) or any(n.isdigit() for n in _listdir(dev / "vfio")):
        return True
    cuda = environ.get("CUDA_VISIBLE_DEVICES")
    if cuda is None:
        gpus = any(re.fullmatch(r"nvidia\d+", n) for n in names)
    else:
        gpus = cuda.strip() not in ("", "-1")
    return gpus or "kfd" in names


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
