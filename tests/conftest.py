"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained_tiny_policy(tmp_path_factory):
    """(config, run dir) of the tiny model SFT-trained on 2-operation arithmetic: one run per test session.

    A few hundred steps (~40 s on 2 cores) give a policy that solves some but not all held-out
    problems when sampling, which is what search and RL tests need.
    """
    from configs.load import load_config
    from train.trainer import train

    run_dir = tmp_path_factory.mktemp("trained_tiny_policy")
    cfg = load_config(
        "configs/experiments/tiny.yaml",
        [
            "data.mixture={arithmetic_d2_direct: 1.0}",
            "data.batch_size=16",
            "train.steps=400",
            "mesh.data=-1",
            "mesh.fsdp=1",
            "optimizer.warmup_steps=20",
            "train.eval_every=0",
            "train.checkpoint_every=400",
            "train.log_every=100",
            f"train.run_dir={run_dir}",
        ],
    )
    train(cfg, show_progress=False)
    return cfg, run_dir
