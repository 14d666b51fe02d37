"""Reinforcement learning on chain-of-thought with verifiable rewards: GRPO and expert iteration (STaR).

    result = train_rl(load_config("experiments/rl_tiny", ["rl.init_from=runs/tiny"]))

One step of the loop, all on one mesh:

1. the next `prompts_per_step` x `oversample` problems of the prompt stream (train split, fixed order);
2. the policy's params are resharded on device to the rollout layout and the jitted sampler
   draws `group_size` completions per prompt (row keys from the stream's RNG, the problem's
   stream index and the sample number);
3. the task's verifier scores them (over-length completions get nothing); reasons are counted;
   with oversample > 1, the `prompts_per_step` groups trained on are those with a signal first;
4. grpo: advantages relative to the group, old-policy and reference log-probs by a forward
   pass, then `epochs x minibatches` clipped-ratio optimizer steps with a KL penalty;
   expert_iteration: SFT (weighted NLL) on the verified completions (and, with rl.search,
   the search's verified chain per prompt);
5. metrics (TensorBoard, metrics.jsonl, progress bar), a line per step in rollouts.jsonl,
   pass@1 on validation problems every `eval_every` steps, an orbax checkpoint every
   `checkpoint_every` steps: params, optimizer state, and the stream's position and RNG.

A killed run restarted on the same rl.run_dir resumes at its newest checkpoint: the prompt
stream continues exactly where that step left it and records past it are dropped.

Each role has its own module: the prompt stream and rollout worker (train/rl_rollout.py:
`sample_groups`), the rows kept and the `TrainExamples` a learner update reads
(train/rl_examples.py), the learner and the reference model (train/rl_learner.py), the loss
(train/rl_loss.py), search distillation (train/rl_search.py). This file wires them into the
loop and reports each step (`step_metrics`).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import jax
import numpy as np

from configs.fileio import LineLog, run_path
from configs.load import load_config, save_config
from configs.schema import Config, RLConfig
from model.distributed import check_shared_directory
from model.sharding import make_mesh
from search.sampler import Sampling, decode_text
from tasks.base import Problem
from train.checkpoint import CheckpointError, Checkpoints, find_run_config, load_params
from train.data import get_vocabulary
from train.metrics import MetricsWriter, step_of
from train.policy import load_policy
from train.problems import plan_problems
from train.rl_examples import ChosenRows, build_examples, choose_rows, rollout_logprob_gap
from train.rl_learner import Learner, ReferenceModel
from train.rl_rollout import GroupRollouts, PromptStream, RolloutWorker, row_keys, sample_groups, score_rollouts
from train.state import init_state
from train.trainer import Preemption, TrainingError, check_vocab


class RLError(RuntimeError):
    """The RL run cannot start or go on; the message names the key or file to fix."""


def rollout_sampling(cfg: Config) -> Sampling:
    return Sampling(cfg.rl.temperature, cfg.rl.top_k, cfg.rl.top_p)


def eval_problems(cfg: Config) -> list[Problem]:
    """The validation problems pass@1 is measured on (the same for every evaluation of a run)."""
    return plan_problems(cfg.data.mixture, cfg.rl.eval_problems, split="validation", seed=cfg.seed)


def evaluate_pass_at_1(worker: RolloutWorker, params, problems: list[Problem], *, samples: int, sampling: Sampling,
                       seed: int, rows: int | None = None) -> dict[str, float]:
    """pass@1: the verified rate of `samples` completions per problem (`params` in the rollout layout).

    Sample k of problem p draws with fold_in(fold_in(key(seed), p), k), so a policy's number
    does not depend on batching. Problems whose prompt is wider than rl.max_prompt_len are
    left out (`eval_skipped`).
    """
    width = worker.cfg.rl.max_prompt_len
    fitting = [(i, p) for i, p in enumerate(problems) if 1 + len(worker.vocab.encode(p.prompt)) <= width]
    if not fitting:
        return {"pass_at_1": float("nan"), "eval_skipped": float(len(problems))}
    texts = [p.prompt for _, p in fitting for _ in range(samples)]
    keys = row_keys(jax.random.key(seed), [i for i, _ in fitting for _ in range(samples)],
                    list(range(samples)) * len(fitting))
    out = worker(params, texts, keys, sampling, rows=rows)
    completions = [decode_text(worker.vocab, out.tokens[r, : out.num[r]]) for r in range(len(texts))]
    scored = score_rollouts([p for _, p in fitting for _ in range(samples)], completions, out.finished,
                            worker.cfg.rl)
    return {"pass_at_1": float(scored.correct.mean()), "eval_skipped": float(len(problems) - len(fitting))}


def policy_pass_at_1(checkpoint: str | Path, problems: list[Problem], *, samples: int = 1, temperature: float = 1.0,
                     seed: int = 0, overrides: tuple[str, ...] = (), mesh=None) -> dict[str, float]:
    """`evaluate_pass_at_1` of a policy run (SFT or RL: a run dir with config.yaml) on `problems`.

    What the demo compares before and after RL; the policy's own rl.* settings (prompt width,
    completion length) apply.
    """
    policy = load_policy(checkpoint, overrides=overrides, mesh=mesh)
    cfg = policy.cfg
    worker = RolloutWorker(cfg, policy.mesh, policy.vocab, jax.tree.map(lambda a: a.sharding, policy.params))
    sampling = Sampling(temperature, cfg.rl.top_k, cfg.rl.top_p)
    return evaluate_pass_at_1(worker, worker.rollout_params(policy.params), problems, samples=samples,
                              sampling=sampling, seed=seed, rows=cfg.rl.prompts_per_step * cfg.rl.group_size)


def with_policy(cfg: Config, init_from: str | Path, run_dir: str | Path, **rl_settings) -> Config:
    """`cfg` with rl.init_from, rl.run_dir (and any other rl.* given) set, validated: a demo stage's RL config."""
    rl = cfg.rl.model_dump() | {"init_from": str(init_from), "run_dir": str(run_dir), **rl_settings}
    return Config.model_validate(cfg.model_dump() | {"rl": rl})


def check_policy(cfg: Config) -> Path:
    """rl.init_from must name a policy run whose model is cfg.model; returns its path."""

    if not cfg.rl.init_from:
        raise RLError("rl.init_from is not set: RL starts from a policy (a `ponder train` run directory)")
    path = run_path(cfg.rl.init_from)
    if not path.is_dir():
        raise RLError(f"rl.init_from={path}: no such directory")
    config = find_run_config(path)
    if config is not None:
        policy_model = load_config(config).model
        # head_dim null means embed_dim // num_heads: compare what the model is built with
        policy_shape = policy_model.model_dump() | {"head_dim": policy_model.resolved_head_dim}
        shape = cfg.model.model_dump() | {"head_dim": cfg.model.resolved_head_dim}
        differences = [f"{k}: policy {v!r}, this config {shape[k]!r}" for k, v in policy_shape.items()
                       if shape[k] != v and k not in ("remat", "attention", "dtype", "scan_layers")]
        if differences:
            raise RLError(f"rl.init_from={path}: the policy's model differs from model.* ({config}): "
                          + "; ".join(differences))
    return path


def train_rl(cfg: Config, *, show_progress: bool = True, mesh=None) -> dict:
    """Runs (or resumes) RL to `rl.steps`; returns the last metrics, `pass_at_1_start` and `stopped`."""
    check_vocab(cfg)
    rl = cfg.rl
    policy_path = check_policy(cfg)
    run_dir = run_path(rl.run_dir)
    check_shared_directory(run_dir)  # several hosts must share one run directory (a no-op on one)
    mesh = mesh or make_mesh(cfg.mesh)
    vocab = get_vocabulary(cfg.data.vocab)
    if jax.process_index() == 0:
        save_config(cfg, run_dir)
    learner = Learner(cfg, mesh)
    layout = learner.layout
    stream = PromptStream(cfg, vocab)
    with contextlib.ExitStack() as cleanup:
        checkpoints = cleanup.enter_context(  # closed on exit: a failed save raises unless another error does
            Checkpoints(run_dir / "checkpoints", save_every=rl.checkpoint_every, keep=rl.keep_checkpoints))
        try:
            reference = ReferenceModel(learner, load_params(policy_path, layout.abstract["params"]))  # frozen
            if checkpoints.latest_step() is not None:
                step, state = checkpoints.restore(layout.abstract, data=stream)
                resumed = f"resumed from step {step}"
            else:
                params = load_params(policy_path, layout.abstract["params"])  # its own buffers: the state is donated
                state, step = init_state(cfg, layout, mesh, params), 0
                resumed = f"policy from {policy_path}"
        except CheckpointError as err:
            raise RLError(str(err)) from None
        return _loop(cfg, mesh, vocab, learner, stream, checkpoints, state, step, reference, resumed, show_progress,
                     cleanup)


def _loop(cfg: Config, mesh, vocab, learner: Learner, stream: PromptStream, checkpoints: Checkpoints, state, step: int,
          reference: ReferenceModel, resumed: str, show_progress: bool, cleanup: contextlib.ExitStack) -> dict:
    """The steps from `step` to rl.steps, with metrics, evaluations and checkpoints."""
    rl, run_dir, layout = cfg.rl, run_path(cfg.rl.run_dir), learner.layout

    worker = RolloutWorker(cfg, mesh, vocab, layout.shardings["params"])
    distiller = None
    if rl.search != "none":
        from train.rl_search import SearchDistiller

        distiller = SearchDistiller(cfg, mesh, vocab, worker.graphdef)
    writer = MetricsWriter(run_dir, total_steps=rl.steps, initial_step=step, show_progress=show_progress)
    cleanup.callback(writer.close)
    validation = eval_problems(cfg) if rl.eval_every else []
    eval_sampling = Sampling(rl.eval_temperature, rl.top_k, rl.top_p) if rl.eval_temperature is not None \
        else rollout_sampling(cfg)
    rows = rl.prompts_per_step * rl.oversample * rl.group_size  # the rollouts' shape: evaluation reuses it
    sampled = f" (of {rl.prompts_per_step * rl.oversample} sampled)" if rl.oversample > 1 else ""
    writer.message(f"ponder rl: {rl.algorithm} in {run_dir} ({resumed}) on mesh {dict(mesh.shape)}; "
                   f"{rl.prompts_per_step} prompts{sampled} x {rl.group_size} samples per step, "
                   f"{rl.epochs * rl.minibatches} optimizer step(s) each")

    def evaluate(at: int) -> dict:
        result = evaluate_pass_at_1(worker, worker.rollout_params(state["params"]), validation,
                                    samples=rl.eval_samples, sampling=eval_sampling, seed=rl.seed + 1, rows=rows)
        writer.write(at, result)
        return result

    last: dict = {}
    start_eval = evaluate(step) if rl.eval_every and step == 0 else {}
    preemption = Preemption()
    cleanup.callback(preemption.close)
    nonfinite = 0
    log = None
    if jax.process_index() == 0:  # the steps past the checkpoint run again
        log = LineLog(run_dir / "rollouts.jsonl", keep=lambda line, resumed_at=step: step_of(line) <= resumed_at)
        cleanup.callback(log.close)
    while step < rl.steps:
        state, metrics, record = _rl_step(cfg, state, stream, worker, learner, reference, distiller, step + 1)
        step += 1
        nonfinite = 0 if metrics.pop("finite") else nonfinite + 1
        if nonfinite >= cfg.train.max_nonfinite_steps:
            raise TrainingError(f"{nonfinite} RL steps in a row had a non-finite loss or gradient (last: step "
                                f"{step}); stopping with the last good checkpoint in {run_dir / 'checkpoints'} "
                                "intact. Try a lower optimizer.learning_rate.")
        if log is not None:
            log.write(json.dumps({"step": step, **record}))
        if step % rl.log_every == 0 or step == rl.steps:
            last = metrics | {"compile_s": learner.compile_seconds + worker.compile_seconds}
            writer.write(step, last)
        if rl.eval_every and (step % rl.eval_every == 0 or step == rl.steps):
            last |= evaluate(step)
        writer.progress(step, {k: last[k] for k in ("reward_mean", "kl", "pass_at_1") if k in last})
        stopping = preemption.reached(step)
        if checkpoints.save(step, state, data=stream, config=cfg, force=stopping or step == rl.steps):
            writer.sync()  # the logs of every step up to a checkpoint are durable before it is
            if log is not None:
                log.sync()
        if stopping:
            checkpoints.wait()
            writer.message(f"ponder rl: SIGTERM: saved step {step} to {run_dir / 'checkpoints'}; exiting")
            return last | {"step": step, "stopped": "preempted"}
    return last | {"step": step, "stopped": "done",
                   **({"pass_at_1_start": start_eval["pass_at_1"]} if start_eval else {})}


def _rl_step(cfg: Config, state, stream: PromptStream, worker: RolloutWorker, learner: Learner,
             reference: ReferenceModel, distiller, step: int):
    """One sample -> score -> update round; returns (state, metrics, the rollouts.jsonl record).

    The roles, in order: the rollout worker samples and scores groups, `choose_rows` keeps
    groups and weighs their rows (plus the search's verified chains), `build_examples` adds
    old-policy and reference log-probs, the learner updates, `step_metrics` reports.
    """
    rollouts = sample_groups(worker, stream, state["params"], rollout_sampling(cfg))
    rows = choose_rows(rollouts, cfg.rl)
    search_metrics: dict = {}
    if distiller is not None:
        chains, found, search_metrics = distiller(rollouts.params, [p for _, p in rows.items],
                                                  jax.random.fold_in(rollouts.key, 1 << 30), [i for i, _ in rows.items])
        rows = rows.with_chains(chains, found)
    start = time.perf_counter()
    examples = None  # nothing to learn from: no optimizer step (Adam's momentum would move the params)
    if rows.trainable(cfg.rl):
        examples = build_examples(rows, worker.vocab, learner, state["params"], reference)
    state, updates = learner.update(state, examples, step)
    train_seconds = time.perf_counter() - start
    gap = {"rollout_logprob_gap": rollout_logprob_gap(examples, rows)} if examples is not None else {}
    metrics = step_metrics(cfg.rl, rollouts, rows, updates, gap, train_seconds, stream.skipped) | search_metrics
    record = {"stream": [i for i, _ in rollouts.items], "trained": [i for i, _ in rows.items],
              "problems": [p.id for _, p in rollouts.items],
              "reward": [round(float(r), 4) for r in rollouts.scored.reward], "sample": rollouts.texts[0]}
    return state, metrics | {"finite": all(m["finite"] for m in updates)}, record


def step_metrics(rl: RLConfig, rollouts: GroupRollouts, rows: ChosenRows, updates: list[dict[str, float]],
                 extra: dict, train_seconds: float, skipped: int) -> dict[str, float]:
    """A step's metrics: the optimizer steps' means, then rewards, lengths, speeds and the groups kept."""
    scored, out = rollouts.scored, rollouts.rollouts
    trained = {k: float(np.mean([m[k] for m in updates])) for k in updates[0]} if updates else {}
    trained_tokens = sum(m["trained_tokens"] for m in updates)
    trained.pop("finite", None)
    trained |= extra
    grouped = scored.correct.reshape(-1, rollouts.group_size)
    generated = int(out.num.sum())
    return trained | {
        "reward_mean": float(scored.reward.mean()), "reward_std": float(scored.reward.std()),
        "reward_min": float(scored.reward.min()), "reward_max": float(scored.reward.max()),
        "correct": float(scored.correct.mean()),
        "groups_all_correct": float(grouped.all(axis=1).mean()),
        "groups_none_correct": float((~grouped).all(axis=1).mean()),
        "completion_length": float(out.num.mean()), "completion_length_max": float(out.num.max()),
        "over_length": float((~out.finished).mean()),
        "rollout_tokens_per_s": generated / rollouts.seconds, "rollout_s": rollouts.seconds,
        "train_tokens_per_s": trained_tokens / train_seconds if trained_tokens else 0.0, "train_s": train_seconds,
        "kept": float(rows.weights.mean()), "prompts_skipped": float(skipped),
        "groups_informative": float(rows.informative.mean()),  # of the sampled groups: some signal to learn from
        "groups_trained_informative": float(rows.informative[rows.kept].mean()),
        "optimizer_steps": float(len(updates)),
    } | ({"steps_correct": float(scored.steps_correct.mean())} if rl.step_reward else {}) | {
        f"verifier/{reason}": count / len(rollouts.texts) for reason, count in sorted(scored.reasons.items())}
