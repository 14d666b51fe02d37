"""The training loop: pretraining, SFT and reward models on a mesh, with checkpoints, metrics, eval and preemption.

    result = train(load_config("experiments/tiny"))

A run directory holds config.yaml (the resolved config), checkpoints/, metrics.jsonl and
tensorboard/. Starting a run whose directory has checkpoints resumes from the newest one
that restores (state and data position from the same step).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import warnings
from typing import Any

import jax
import numpy as np

from configs.fileio import run_path
from configs.load import save_config
from configs.schema import Config
from model.distributed import check_shared_directory
from model.flops import flops_per_token
from model.sharding import make_mesh
from train.checkpoint import CheckpointError, Checkpoints, load_params, missing_params
from train.data import DataStateError, Pipeline, get_vocabulary, padded_vocab_size, to_global
from train.data.shards import HostShards
from train.flops import peak_tflops
from train.metrics import MetricsWriter
from train.optim import learning_rate_schedule
from train.state import init_state, state_layout
from train.step import compile_steps, loss_kind


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the last good checkpoint is intact."""


class Preemption:
    """SIGTERM (what a TPU VM gets before maintenance) asks the loop to save and stop after this step.

    On several hosts JAX's preemption sync point makes every host stop at the same step.
    """

    def __init__(self):
        self.requested = threading.Event()
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self.requested.set())

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested.is_set()

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def check_vocab(cfg: Config) -> None:
    """The model must have a row for every token id the data can produce."""
    needed = padded_vocab_size(get_vocabulary(cfg.data.vocab))
    if cfg.model.vocab_size < needed:
        raise TrainingError(f"model.vocab_size={cfg.model.vocab_size} is below the data vocabulary's {needed} "
                         f"(data.vocab={cfg.data.vocab!r}, padded to a multiple of 128)")


def train(cfg: Config, *, show_progress: bool = True) -> dict:
    """Runs (or resumes) training to `cfg.train.steps`; returns the last logged metrics and `stopped`."""
    check_vocab(cfg)
    tc = cfg.train
    run_dir = run_path(tc.run_dir)
    check_shared_directory(run_dir)  # several hosts must share one run directory (a no-op on one)
    mesh = make_mesh(cfg.mesh)
    rules = cfg.rules()
    if jax.process_index() == 0:
        save_config(cfg, run_dir)
    layout = state_layout(cfg, mesh)
    schedule = learning_rate_schedule(cfg.optimizer, tc.steps)
    pipeline = data_source(cfg)
    checkpoints = Checkpoints(run_dir / "checkpoints", save_every=tc.checkpoint_every, keep=tc.keep_checkpoints,
                              async_save=tc.async_checkpoints)

    if checkpoints.latest_step() is not None:
        step, state, resumed = resume(checkpoints, layout.abstract, pipeline, cfg.data.resume)
    else:
        params, fresh = _init_params(cfg, layout)
        state, step = init_state(cfg, layout, mesh, params), 0
        resumed = f"params from {tc.init_from}{fresh}" if tc.init_from else "fresh start"

    train_step, eval_step, compile_seconds = compile_steps(
        layout, schedule, mesh, rules, cfg.data.batch_size, cfg.data.seq_len, tc.microbatches,
        loss_kind(cfg.data.objective),
    )
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = tc.peak_tflops_per_device or peak_tflops()
    writer = MetricsWriter(run_dir, total_steps=tc.steps, initial_step=step, show_progress=show_progress)
    param_count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(layout.abstract["params"]))
    writer.message(
        f"ponder train: {run_dir} ({resumed}); {param_count / 1e6:.2f}M params on mesh {dict(mesh.shape)}; "
        f"compiled train+eval steps in {compile_seconds:.1f}s; {flops / 1e6:.2f} MFLOPs per token"
    )
    eval_batches = _eval_batches(cfg, mesh) if tc.eval_every else []

    preemption = Preemption()
    last: dict = {}
    nonfinite_in_a_row = skipped = 0
    # The `finite` flag of the step before the last one dispatched: reading a step's flag waits
    # for that step, so it is read only once the next step is queued behind it. The host then
    # reads and places the next batch while the device computes, instead of idling between
    # steps. A non-finite step changes no parameters (see `train.step`), so finding it a step
    # late is safe: every checkpoint holds finite params.
    unchecked: tuple[int, jax.Array] | None = None

    def check_finite() -> None:
        nonlocal unchecked, nonfinite_in_a_row, skipped
        if unchecked is None:
            return
        flag_step, flag = unchecked
        unchecked = None
        finite = bool(flag)
        nonfinite_in_a_row = 0 if finite else nonfinite_in_a_row + 1
        skipped += not finite
        if nonfinite_in_a_row >= tc.max_nonfinite_steps:
            raise TrainingError(
                f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (last: step {flag_step}); "
                f"stopping. The last good checkpoint in {run_dir / 'checkpoints'} is intact; try a lower "
                "optimizer.learning_rate or stronger clipping."
            )

    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < tc.steps:
            if tc.profile_steps and step == tc.profile_steps[0]:
                jax.profiler.start_trace(str(run_dir / "profile"))
            batch = to_global(next(pipeline), mesh, rules)
            state, metrics = train_step(state, batch)
            step += 1
            window_steps += 1
            if tc.profile_steps and step == tc.profile_steps[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()

            check_finite()  # the previous step's
            unchecked = (step, metrics["finite"])

            if step % tc.log_every == 0 or step == tc.steps:  # the last step always logs: none goes unchecked
                jax.block_until_ready(metrics)
                check_finite()  # this step's, so the logged count is current
                seconds = time.perf_counter() - window_start
                tokens_per_s = window_steps * tokens_per_step / seconds
                tflops = flops * tokens_per_s / mesh.size / 1e12
                last = {k: float(v) for k, v in metrics.items() if k != "finite"} | {
                    "tokens_per_s": tokens_per_s,
                    "step_time_s": seconds / window_steps,
                    "tflops_per_device": tflops,
                    "nonfinite_steps": float(skipped),
                    "data_truncated_examples": float(pipeline.truncated_examples),
                } | ({"mfu": tflops / peak} if peak else {})
                writer.write(step, last)
                writer.progress(step, {"loss": last["loss"], "tok/s": tokens_per_s})
                window_start, window_steps = time.perf_counter(), 0

            if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
                evaluation = _evaluate(eval_step, state["params"], eval_batches)
                writer.write(step, evaluation)
                last |= evaluation

            stopping = preemption.reached(step)
            if checkpoints.save(step, state, data=pipeline, config=cfg, force=stopping or step == tc.steps):
                writer.sync()  # the metrics of every step up to a checkpoint are durable before it is
            if stopping:
                checkpoints.wait()
                writer.message(f"ponder train: SIGTERM: saved step {step} to {run_dir / 'checkpoints'}; exiting")
                return last | {"step": step, "stopped": "preempted"}
        writer.progress(step, {})
        return last | {"step": step, "stopped": "done"}
    finally:
        try:  # a failed save raises here, unless the run is stopping on another error: then that one propagates
            checkpoints.close(stopping_on=sys.exc_info()[1])
        finally:
            writer.close()
            preemption.close()


def resume(checkpoints: Checkpoints, abstract_state, pipeline: HostShards, mode: str) -> tuple[int, Any, str]:
    """(step, state, what happened) from the newest readable checkpoint, the data stream where it was.

    A data position that cannot continue exactly (saved as another number of data shards, or
    with other data settings) stops the run with DataStateError, unless `mode` is `restart`
    (data.resume): then params, optimizer state and step are restored and the data stream
    starts from its beginning, with a warning that examples already seen come again.
    """
    try:
        step, state = checkpoints.restore(abstract_state, data=pipeline)
        return step, state, f"resumed from step {step}"
    except DataStateError as err:
        if mode != "restart":
            raise DataStateError(f"{err} (or set data.resume=restart to keep the params and optimizer state and "
                                 "start the data stream afresh)") from None
        warnings.warn(f"{err}; data.resume=restart: the data stream starts afresh, so examples seen before "
                      "this step will be seen again", stacklevel=2)
    step, state = checkpoints.restore(abstract_state)
    return step, state, f"resumed from step {step}, data stream restarted"


def data_source(cfg: Config, split: str = "train") -> HostShards:
    """This host's data shards (train.data.shards): the seqio pipeline, or reward.data for `data.objective: reward`."""
    if cfg.data.objective == "reward":
        from train.reward_data import RewardData

        return HostShards(lambda k, n: RewardData(cfg, split=split, shard_index=k, num_shards=n), cfg.data.shards)
    return HostShards(lambda k, n: Pipeline(cfg.data, seed=cfg.seed, split=split, shard_index=k, num_shards=n),
                      cfg.data.shards)


def _init_params(cfg: Config, layout) -> tuple[dict | None, str]:
    """Params from `train.init_from` (None without it), and a note on what was initialised fresh.

    A value head the checkpoint lacks (a reward model initialised from a policy) starts fresh;
    any other missing parameter is an error.
    """
    if not cfg.train.init_from:
        return None, ""
    params = load_params(cfg.train.init_from, layout.abstract["params"], allow_missing=True)
    missing = missing_params(params)
    other = [name for name in missing if not name.startswith("value_head")]
    if other:
        raise CheckpointError(f"train.init_from={cfg.train.init_from}: the checkpoint has no {', '.join(other)} "
                              "(a different model config?)")
    return params, " (value_head initialised fresh)" if missing else ""


def _eval_batches(cfg: Config, mesh) -> list[dict]:
    """The same `eval_batches` validation batches for every evaluation of the run."""
    pipeline = data_source(cfg, split="validation")
    return [to_global(next(pipeline), mesh, cfg.rules()) for _ in range(cfg.train.eval_batches)]


def _evaluate(eval_step, params, batches) -> dict[str, float]:
    """Token-weighted loss and accuracy over the eval batches."""
    sums = [eval_step(params, batch) for batch in batches]
    count = max(sum(float(s["count"]) for s in sums), 1.0)
    return {
        "eval_loss": sum(float(s["loss_sum"]) for s in sums) / count,
        "eval_accuracy": sum(float(s["correct"]) for s in sums) / count,
    }
