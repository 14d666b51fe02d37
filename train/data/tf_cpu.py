"""TensorFlow for the input pipeline only: imported once here, with every accelerator hidden.

JAX owns the GPUs/TPUs; tf.data runs on host CPUs. Import `tf` from this module, never
`tensorflow` directly, so no pipeline can grab an accelerator by importing TF first; the
`train.data` package imports this module before anything that imports seqio.

TensorFlow's C++ side logs while it loads (no CUDA driver found, a failed cuInit on a
machine without a GPU) and, since TF 2.19, ignores TF_CPP_MIN_LOG_LEVEL for it. None of it
concerns ponder, which never runs TF on an accelerator, so the process's stderr points at
/dev/null while TF and seqio load and TF's devices are chosen; a Python error raised there
is still reported, after stderr is back.
"""

import contextlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextlib.contextmanager
def _native_stderr_silenced():
    """Sends file descriptor 2 (where C++ code logs) to /dev/null for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


with _native_stderr_silenced():
    import seqio  # noqa: F401  (loads tensorflow, tensorflow_text and their native libraries)
    import tensorflow as tf

    for _kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], _kind)
        except (RuntimeError, ValueError):  # no such device type, or TF already initialised
            pass

__all__ = ["tf"]
