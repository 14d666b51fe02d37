"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from configs.xla_flags import tune_cpu_backend  # noqa: E402  (no jax import): the CPU flags `ponder` runs with

tune_cpu_backend()  # after JAX_PLATFORMS: the tests run on CPU even on an accelerator host
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from configs.fileio import use_object_storage_defaults  # noqa: E402

use_object_storage_defaults()  # as `ponder` does: etils.epath and fsspec read these once per process

# One persistent compilation cache per test session, inherited by the subprocesses tests start:
# many tests (CLI runs, killed-and-resumed training, fresh models of the same shapes) compile
# programs another test already compiled, which in-memory caches cannot see.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache_dir = tempfile.mkdtemp(prefix="ponder-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def trained_tiny_policy(tmp_path_factory):
    """(config, run dir) of the tiny model SFT-trained on 1- and 2-operation arithmetic: one run per test session.

    A few hundred steps give a policy that solves some but not all held-out problems when
    sampling, which is what search, reward-model and RL tests need. It trains in a
    subprocess on one CPU device (`ponder train`, no simulated devices): on a 2-core machine
    that is about twice as fast as 8 simulated devices. Its checkpoint restores onto any mesh.
    Under pytest-xdist (`make test`) the first worker to need it trains it and the others
    wait for it and read the same run.
    """
    import shutil

    from filelock import FileLock

    from configs.load import load_config

    run_dir = shared_tmp_dir(tmp_path_factory) / "trained_tiny_policy"
    trained = run_dir / "TRAINED"  # written last: a run without it is a failed attempt's leftovers
    with FileLock(f"{run_dir}.lock"):
        if not trained.exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            _train_tiny_policy(run_dir)
            trained.touch()
    return load_config(str(run_dir / "config.yaml")), run_dir


def shared_tmp_dir(tmp_path_factory):
    """This test session's temporary directory, the same for every pytest-xdist worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _train_tiny_policy(run_dir) -> None:
    """`ponder train` of the tiny policy into run_dir (see `trained_tiny_policy`)."""
    import subprocess
    import sys

    overrides = [
        "data.mixture={arithmetic_d1_direct: 1.0, arithmetic_d2_direct: 1.0}",
        "data.batch_size=16",
        "train.steps=400",
        "mesh.data=-1",
        "mesh.fsdp=1",
        "optimizer.warmup_steps=20",
        "train.eval_every=0",
        "train.checkpoint_every=400",
        "train.log_every=100",
        f"train.run_dir={run_dir}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    process = subprocess.run(
        [sys.executable, "-m", "tools.cli", "train", "--no-progress", "--config", "configs/experiments/tiny.yaml",
         *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert process.returncode == 0, process.stderr[-3000:]


@pytest.fixture(scope="session")
def gcs_emulator():
    """A local GCS server (tests/gcs_emulator.py, in memory) with one bucket; its `env` points gcsfs
    (through etils.epath) and tensorstore (under orbax) at it. The test process itself uses it too."""
    import socket
    import subprocess
    import sys
    import time
    import types

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bucket = "ponder-test"
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "gcs_emulator.py"), f"--port={port}",
                               f"--bucket={bucket}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "the GCS emulator did not start"
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    env = {"EPATH_USE_TF": "false", "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # the emulator has no storage-layout API to ask
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield types.SimpleNamespace(bucket=bucket, env=env, url=url)
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.terminate()
    server.wait(timeout=10)
