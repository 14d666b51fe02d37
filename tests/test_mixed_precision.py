"""Mixed precision: bfloat16 param storage with float32 master weights and moments (optimizer.master_weights)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.load import load_config
from configs.schema import MeshConfig, OptimizerConfig
from model.sharding import make_mesh
from train.checkpoint import Checkpoints
from train.data import Pipeline, to_global
from train.optim import MasterState, apply_gradients, make_optimizer
from train.state import init_state, state_layout
from train.step import compile_steps
from train.trainer import train


def _steps(master: bool, steps: int = 200):
    """Adam at lr 1e-4 on one bfloat16 weight at 1.0 with a constant gradient: each update is ~1e-4."""
    cfg = OptimizerConfig(learning_rate=1e-4, warmup_steps=0, decay="constant", weight_decay=0.0,
                          grad_clip_norm=0.0, master_weights=master)
    params = {"w": jnp.ones((4,), jnp.bfloat16)}
    optimizer = make_optimizer(cfg, steps, params)
    state = optimizer.init(params)
    grads = {"w": jnp.ones((4,), jnp.float32)}
    step = jax.jit(lambda p, s: apply_gradients(optimizer, grads, s, p))
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def test_master_weights_keep_the_updates_bfloat16_rounding_drops():
    plain, _ = _steps(master=False)
    # 1 - 1e-4 rounds back to 1 in bfloat16 (spacing 2**-8 below 1): plain bf16 params never move.
    np.testing.assert_array_equal(np.asarray(plain["w"], np.float32), 1.0)
    params, state = _steps(master=True)
    assert isinstance(state, MasterState) and state.master["w"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(state.master["w"]), 1.0 - 200 * 1e-4, atol=2e-5)
    assert params["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(state.master["w"].astype(jnp.bfloat16)))


def _cfg(tmp_path, *overrides):
    return load_config("experiments/tiny", [f"train.run_dir={tmp_path / 'run'}", "model.dtype=bfloat16", *overrides])


def _float_leaves(tree):
    return [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)]


def test_master_weights_on_a_sharded_mesh_follow_float32_params(tmp_path):
    """bf16 params + f32 master/moments on data x fsdp x tensor = 2 x 2 x 2 follow float32 params from the
    same start (both compute in bfloat16, which rounds weights the same way), and the params are always
    the master rounded."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    runs = {"bf16 + master": ("model.param_dtype=bfloat16", "optimizer.master_weights=true"), "f32 params": ()}
    trajectories, start = {}, None
    for name, overrides in runs.items():
        cfg = _cfg(tmp_path, *overrides)
        layout = state_layout(cfg, mesh)
        step, _, _ = compile_steps(layout, lambda s: 0.0, mesh, cfg.rules(), 8, 128, 2)
        state = init_state(cfg, layout, mesh, params=start)
        start = start or jax.tree.map(jnp.copy, state["opt_state"].master)  # f32 starts here too (copied: steps donate)
        pipeline = Pipeline(cfg.data, seed=cfg.seed, shard_index=0, num_shards=1)
        losses = []
        for _ in range(5):
            state, metrics = step(state, to_global(next(pipeline), mesh, cfg.rules()))
            losses.append(float(metrics["loss"]))
        trajectories[name] = losses
        if name == "bf16 + master":
            master_state = state
    opt = master_state["opt_state"]
    assert {leaf.dtype for leaf in _float_leaves(master_state["params"])} == {jnp.dtype(jnp.bfloat16)}
    assert {leaf.dtype for leaf in _float_leaves(opt)} == {jnp.dtype(jnp.float32)}  # master, mu, nu
    for master, param in zip(jax.tree.leaves(opt.master), jax.tree.leaves(master_state["params"]), strict=True):
        assert master.sharding == param.sharding  # the master is sharded like its param (FSDP over 2 x 2 x 2)
        np.testing.assert_array_equal(np.asarray(master.astype(jnp.bfloat16)), np.asarray(param))
    want, got = trajectories["f32 params"], trajectories["bf16 + master"]
    assert got[-1] < 0.8 * got[0]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    for master, param in zip(jax.tree.leaves(opt.master), jax.tree.leaves(state["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(master), np.asarray(param), atol=1e-4)


def test_master_weights_survive_a_checkpoint_and_are_refused_without_bfloat16_params(tmp_path):
    cfg = _cfg(tmp_path, "model.param_dtype=bfloat16", "optimizer.master_weights=true", "train.steps=4",
               "train.checkpoint_every=4", "train.eval_every=0")
    result = train(cfg, show_progress=False)
    assert result["step"] == 4
    mesh = make_mesh(cfg.mesh)
    layout = state_layout(cfg, mesh)
    with Checkpoints(Path(cfg.train.run_dir) / "checkpoints", save_every=4, keep=1) as checkpoints:
        step, state = checkpoints.restore(layout.abstract)
    assert step == 4
    master = state["opt_state"].master
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(master))
    fresh = init_state(cfg, layout, mesh)["opt_state"].master
    pairs = zip(jax.tree.leaves(master), jax.tree.leaves(fresh), strict=True)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in pairs]
    assert max(moved) > 0  # four steps moved the master copy
    with pytest.raises(ValueError, match="optimizer.master_weights.*model.param_dtype=bfloat16"):
        load_config("experiments/tiny", ["optimizer.master_weights=true"])
