"""TensorFlow for the input pipeline only: imported once here, with every accelerator hidden.

JAX owns the GPUs/TPUs; tf.data runs on host CPUs. Import `tf` from this module, never
`tensorflow` directly, so no pipeline can grab an accelerator by importing TF first.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

for _kind in ("GPU", "TPU"):
    try:
        tf.config.set_visible_devices([], _kind)
    except (RuntimeError, ValueError):  # no such device type, or TF already initialised
        pass

__all__ = ["tf"]
