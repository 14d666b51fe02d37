"""The trainer: learning, gradient accumulation, sharded equivalence, non-finite guard, crash safety."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs.load import load_config
from configs.schema import MeshConfig
from model.sharding import make_mesh
from train.checkpoint import Checkpoints
from train.data import DataStateError, Pipeline, to_global
from train.optim import learning_rate_schedule
from train.state import init_state, state_layout
from train.step import compile_steps
from train.trainer import TrainingError, train

ROOT = Path(__file__).parents[1]


def _cfg(tmp_path, *overrides):
    return load_config("experiments/tiny", [f"train.run_dir={tmp_path / 'run'}", *overrides])


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_everything_is_written(tmp_path):
    cfg = _cfg(tmp_path, "train.log_every=2")
    result = train(cfg, show_progress=False)
    run_dir = Path(cfg.train.run_dir)
    losses = [m["loss"] for m in _metrics(run_dir) if "loss" in m]
    assert losses[-1] < 0.5 * losses[0], losses
    assert result["stopped"] == "done" and result["step"] == 40
    logged = _metrics(run_dir)[-1]
    for key in ("grad_norm", "learning_rate", "tokens_per_s", "step_time_s", "tflops_per_device", "accuracy"):
        assert any(key in m for m in _metrics(run_dir)), key
    assert "eval_loss" in logged and "eval_accuracy" in logged and logged["eval_loss"] < losses[0]
    assert list((run_dir / "tensorboard").iterdir())
    assert load_config(str(run_dir / "config.yaml")) == cfg
    assert Checkpoints(run_dir / "checkpoints", save_every=20, keep=3).all_steps() == [20, 40]


def _setup(cfg, mesh):
    layout = state_layout(cfg, mesh)
    schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    return layout, schedule


def _batches(cfg, count):
    pipeline = Pipeline(cfg.data, seed=cfg.seed, shard_index=0, num_shards=1)
    return [next(pipeline) for _ in range(count)]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    cfg = _cfg(tmp_path)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    layout, schedule = _setup(cfg, mesh)
    batch = _batches(cfg, 1)[0]
    params = []
    for microbatches in (1, 4):  # one batch of 8, or 4 micro-batches of 2
        step, _, _ = compile_steps(layout, schedule, mesh, cfg.rules(), 8, 128, microbatches)
        state, metrics = step(init_state(cfg, layout, mesh), to_global(batch, mesh, cfg.rules()))
        params.append(jax.device_get(state["params"]))
    for one, accumulated in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1]), strict=True):
        np.testing.assert_allclose(accumulated, one, atol=1e-5)


def _trajectory(cfg, mesh, batches) -> list[float]:
    layout, schedule = _setup(cfg, mesh)
    step, _, _ = compile_steps(layout, schedule, mesh, cfg.rules(), 8, 128, 1)
    state, losses = init_state(cfg, layout, mesh), []
    for batch in batches:
        state, metrics = step(state, to_global(batch, mesh, cfg.rules()))
        losses.append(float(metrics["loss"]))
    return losses


@pytest.fixture(scope="module")
def reference_trajectory(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("ref"))
    batches = _batches(cfg, 6)
    one_device = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    return cfg, batches, _trajectory(cfg, one_device, batches)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_sharded_training_follows_the_single_device_trajectory(shape, reference_trajectory):
    cfg, batches, want = reference_trajectory
    mesh = make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
    got = _trajectory(cfg, mesh, batches)
    np.testing.assert_allclose(got, want, rtol=2e-4)
    assert want[-1] < want[0]


def test_a_nan_gradient_is_skipped_and_counted(tmp_path):
    cfg = _cfg(tmp_path)
    mesh = make_mesh(cfg.mesh)
    layout, schedule = _setup(cfg, mesh)
    step, _, _ = compile_steps(layout, schedule, mesh, cfg.rules(), 8, 128, 1)
    state = init_state(cfg, layout, mesh)
    before = jax.device_get(state)
    poisoned = _batches(cfg, 1)[0]
    poisoned["loss_mask"] = poisoned["loss_mask"] * np.float32("nan")
    state, metrics = step(state, to_global(poisoned, mesh, cfg.rules()))
    assert float(metrics["finite"]) == 0.0 and not np.isfinite(float(metrics["loss"]))
    after = jax.device_get(state)
    assert int(after["step"]) == 1
    for old, new in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"]), strict=True):
        np.testing.assert_array_equal(new, old)
    for old, new in zip(jax.tree.leaves(before["opt_state"]), jax.tree.leaves(after["opt_state"]), strict=True):
        np.testing.assert_array_equal(new, old)


def test_a_diverging_run_stops_with_its_last_good_checkpoint_intact(tmp_path):
    cfg = _cfg(tmp_path, "optimizer.learning_rate=1.0e+30", "optimizer.warmup_steps=0", "optimizer.grad_clip_norm=0",
               "train.checkpoint_every=1", "train.max_nonfinite_steps=3", "train.eval_every=0")
    with pytest.raises(TrainingError, match="3 steps in a row had a non-finite loss"):
        train(cfg, show_progress=False)
    checkpoints = Checkpoints(Path(cfg.train.run_dir) / "checkpoints", save_every=1, keep=3)
    assert checkpoints.latest_step() is not None
    _, state = checkpoints.restore(state_layout(cfg, make_mesh(cfg.mesh)).abstract)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state["params"]))


# -- crash safety, in real subprocesses --


def _launch(run_dir, *overrides) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    args = ["--config", "experiments/tiny", f"train.run_dir={run_dir}", "train.steps=24", "train.checkpoint_every=4",
            "train.log_every=1", "train.eval_every=0", "train.async_checkpoints=false", *overrides]
    return subprocess.Popen([sys.executable, "-m", "tools.cli", "train", "--no-progress", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run_dir, step, process, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = Path(run_dir) / "metrics.jsonl"
        if path.exists() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {timeout}s")


def _final_params(run_dir):
    cfg = load_config(str(Path(run_dir) / "config.yaml"))
    checkpoints = Checkpoints(Path(run_dir) / "checkpoints", save_every=1, keep=10)
    step, state = checkpoints.restore(state_layout(cfg, make_mesh(cfg.mesh)).abstract)
    return step, jax.device_get(state["params"])


def _losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in _metrics(run_dir) if "loss" in m}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    process = _launch(run_dir)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return run_dir


def test_sigkill_then_resume_ends_bitwise_equal(tmp_path, uninterrupted):
    """Bitwise on CPU: the same compiled program, params and batches give the same floats."""
    run_dir = tmp_path / "run"
    process = _launch(run_dir)
    _wait_for_step(run_dir, 10, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = _launch(run_dir)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from step" in out + err

    want_step, want = _final_params(uninterrupted)
    got_step, got = _final_params(run_dir)
    assert got_step == want_step == 24
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    # same data: every step logged after the resume has exactly the uninterrupted loss
    reference, losses = _losses(uninterrupted), _losses(run_dir)
    assert all(losses[s] == reference[s] for s in losses)


def test_sigterm_saves_exits_zero_and_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    process = _launch(run_dir)
    _wait_for_step(run_dir, 6, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "SIGTERM: saved step" in out + err
    saved = Checkpoints(run_dir / "checkpoints", save_every=4, keep=3).latest_step()
    assert 6 <= saved < 24
    resumed = _launch(run_dir)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resumed from step {saved}" in out + err
    assert min(s for s in _losses(run_dir) if s > saved) == saved + 1


def test_a_data_position_of_another_shard_count_stops_the_run_or_restarts_the_stream_when_asked(tmp_path):
    """Saved as 2 data shards, resumed as 1: a DataStateError naming both ways on; data.resume=restart continues."""
    common = ["train.eval_every=0", "train.checkpoint_every=2", "train.log_every=1"]
    train(_cfg(tmp_path, *common, "train.steps=2", "data.shards=2"), show_progress=False)
    with pytest.raises(DataStateError, match=r"saved as 2 data shards but this run reads 1.*data\.shards=2.*"
                                             r"data\.resume=restart"):
        train(_cfg(tmp_path, *common, "train.steps=4", "data.shards=1"), show_progress=False)
    with pytest.warns(UserWarning, match="the data stream starts afresh"):
        result = train(_cfg(tmp_path, *common, "train.steps=4", "data.shards=1", "data.resume=restart"),
                       show_progress=False)
    assert result["step"] == 4
    assert [m["step"] for m in _metrics(tmp_path / "run") if "loss" in m] == [1, 2, 3, 4]
