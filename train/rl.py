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
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import jax
import numpy as np

from configs.load import load_config, save_config
from configs.schema import Config
from model.sharding import make_mesh
from search.sampler import Sampling, decode_text
from tasks.base import Problem
from train.checkpoint import CheckpointError, Checkpoints, find_run_config, load_params
from train.data import get_vocabulary
from train.metrics import MetricsWriter, drop_records_after
from train.rl_learner import Learner
from train.rl_loss import group_advantages
from train.rl_rollout import PromptStream, RolloutWorker, row_keys, score_rollouts, sequences
from train.state import init_state
from train.trainer import Preemption, TrainingError, check_vocab


class RLError(RuntimeError):
    """The RL run cannot start or go on; the message names the key or file to fix."""


def rollout_sampling(cfg: Config) -> Sampling:
    return Sampling(cfg.rl.temperature, cfg.rl.top_k, cfg.rl.top_p)


def eval_problems(cfg: Config) -> list[Problem]:
    """The validation problems pass@1 is measured on (the same for every evaluation of a run)."""
    from train.reward_labels import plan_problems

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
    from train.state import state_layout

    config = find_run_config(Path(checkpoint))
    if config is None:
        raise FileNotFoundError(f"{checkpoint}: no config.yaml in the run directory")
    cfg = load_config(config, list(overrides))
    mesh = mesh or make_mesh(cfg.mesh)
    layout = state_layout(cfg, mesh)
    params = load_params(checkpoint, layout.abstract["params"])
    worker = RolloutWorker(cfg, mesh, get_vocabulary(cfg.data.vocab), layout.shardings["params"])
    sampling = Sampling(temperature, cfg.rl.top_k, cfg.rl.top_p)
    return evaluate_pass_at_1(worker, worker.rollout_params(params), problems, samples=samples, sampling=sampling,
                              seed=seed, rows=cfg.rl.prompts_per_step * cfg.rl.group_size)


def with_policy(cfg: Config, init_from: str | Path, run_dir: str | Path, **rl_settings) -> Config:
    """`cfg` with rl.init_from, rl.run_dir (and any other rl.* given) set, validated: a demo stage's RL config."""
    rl = cfg.rl.model_dump() | {"init_from": str(init_from), "run_dir": str(run_dir), **rl_settings}
    return Config.model_validate(cfg.model_dump() | {"rl": rl})


def check_policy(cfg: Config) -> Path:
    """rl.init_from must name a policy run whose model is cfg.model; returns its path."""

    if not cfg.rl.init_from:
        raise RLError("rl.init_from is not set: RL starts from a policy (a `ponder train` run directory)")
    path = Path(cfg.rl.init_from)
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
    run_dir = Path(rl.run_dir)
    mesh = mesh or make_mesh(cfg.mesh)
    vocab = get_vocabulary(cfg.data.vocab)
    if jax.process_index() == 0:
        save_config(cfg, run_dir)
    learner = Learner(cfg, mesh)
    layout = learner.layout
    stream = PromptStream(cfg, vocab)
    with contextlib.ExitStack() as cleanup:
        checkpoints = Checkpoints(run_dir / "checkpoints", save_every=rl.checkpoint_every, keep=rl.keep_checkpoints)
        cleanup.callback(checkpoints.close)
        cleanup.callback(checkpoints.wait)
        try:
            reference = load_params(policy_path, layout.abstract["params"])  # frozen, sharded like the policy
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
          reference, resumed: str, show_progress: bool, cleanup: contextlib.ExitStack) -> dict:
    """The steps from `step` to rl.steps, with metrics, evaluations and checkpoints."""
    rl, run_dir, layout = cfg.rl, Path(cfg.rl.run_dir), learner.layout

    worker = RolloutWorker(cfg, mesh, vocab, layout.shardings["params"])
    distiller = None
    if rl.search != "none":
        from train.rl_search import SearchDistiller

        distiller = SearchDistiller(cfg, mesh, vocab, worker.graphdef)
    writer = MetricsWriter(run_dir, total_steps=rl.steps, initial_step=step, show_progress=show_progress)
    cleanup.callback(writer.close)
    rollout_log = run_dir / "rollouts.jsonl"
    if jax.process_index() == 0:
        drop_records_after(rollout_log, step)
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
    log = open(rollout_log, "a", buffering=1) if jax.process_index() == 0 else None  # noqa: SIM115 (closed by cleanup)
    if log is not None:
        cleanup.callback(log.close)
    while step < rl.steps:
        state, metrics, record = _rl_step(cfg, state, reference, stream, worker, learner, distiller, step + 1)
        step += 1
        nonfinite = 0 if metrics.pop("finite") else nonfinite + 1
        if nonfinite >= cfg.train.max_nonfinite_steps:
            raise TrainingError(f"{nonfinite} RL steps in a row had a non-finite loss or gradient (last: step "
                                f"{step}); stopping with the last good checkpoint in {run_dir / 'checkpoints'} "
                                "intact. Try a lower optimizer.learning_rate.")
        if log is not None:
            log.write(json.dumps({"step": step, **record}) + "\n")
        if step % rl.log_every == 0 or step == rl.steps:
            last = metrics | {"compile_s": learner.compile_seconds + worker.compile_seconds}
            writer.write(step, last)
        if rl.eval_every and (step % rl.eval_every == 0 or step == rl.steps):
            last |= evaluate(step)
        writer.progress(step, {k: last[k] for k in ("reward_mean", "kl", "pass_at_1") if k in last})
        stopping = preemption.reached(step)
        checkpoints.save(step, state, data=stream, config=cfg, force=stopping or step == rl.steps)
        if stopping:
            checkpoints.wait()
            writer.message(f"ponder rl: SIGTERM: saved step {step} to {run_dir / 'checkpoints'}; exiting")
            return last | {"step": step, "stopped": "preempted"}
    return last | {"step": step, "stopped": "done",
                   **({"pass_at_1_start": start_eval["pass_at_1"]} if start_eval else {})}


def _rl_step(cfg: Config, state, reference, stream: PromptStream, worker: RolloutWorker, learner: Learner,
             distiller, step: int):
    """One sample -> score -> update round; returns (state, metrics, the rollouts.jsonl record)."""
    rl = cfg.rl
    groups = rl.group_size
    step_key = stream.next_key()
    sampled_items = stream.take(rl.prompts_per_step * rl.oversample)
    problems = [p for _, p in sampled_items for _ in range(groups)]
    keys = row_keys(step_key, [i for i, _ in sampled_items for _ in range(groups)],
                    list(range(groups)) * len(sampled_items))

    start = time.perf_counter()
    rollout_params = worker.rollout_params(state["params"])
    out = worker(rollout_params, [p.prompt for p in problems], keys, rollout_sampling(cfg))
    rollout_seconds = time.perf_counter() - start
    texts = [decode_text(worker.vocab, out.tokens[r, : out.num[r]]) for r in range(len(problems))]
    scored = score_rollouts(problems, texts, out.finished, rl)

    if rl.algorithm == "grpo":
        advantages = np.asarray(group_advantages(scored.reward.reshape(-1, groups), std_normalize=rl.std_normalize))
        advantages, weights = advantages.reshape(-1), np.ones(len(problems), np.float32)
        informative = (advantages.reshape(-1, groups) != 0).any(axis=1)
    else:
        advantages = np.zeros(len(problems), np.float32)
        weights = (scored.correct & out.finished).astype(np.float32)
        informative = weights.reshape(-1, groups).any(axis=1)
    kept = _kept_groups(informative, rl.prompts_per_step)
    rows_kept = (kept[:, None] * groups + np.arange(groups)[None, :]).reshape(-1)
    items = [sampled_items[g] for g in kept]
    prompts = [problems[r].prompt for r in rows_kept]
    completions = [out.tokens[r, : out.num[r]] for r in rows_kept]
    advantages, weights = advantages[rows_kept], weights[rows_kept]
    sampler_logprobs = out.logprobs[rows_kept]
    search_metrics: dict = {}
    if distiller is not None:
        chains, found, search_metrics = distiller(rollout_params, [p for _, p in items],
                                                  jax.random.fold_in(step_key, 1 << 30), [i for i, _ in items])
        prompts += [p.prompt for _, p in items]
        completions += chains
        advantages = np.concatenate([advantages, np.zeros(len(items), np.float32)])
        weights = np.concatenate([weights, found.astype(np.float32)])

    # nothing to learn from (EI: no verified row; GRPO: uniform groups and no KL term): no optimizer step, so
    # Adam's momentum does not move the params on a zero gradient
    trainable = weights.sum() > 0 if rl.algorithm != "grpo" else bool(np.any(advantages != 0) or rl.kl_coef > 0)
    start = time.perf_counter()
    step_metrics: list[dict] = []
    extra: dict = {}
    if trainable:
        batch = sequences(worker.vocab, prompts, completions, learner.width)
        # columns up to the last with a loss, in buckets: the learner's work follows the text, not the limits
        # (the positions cut hold padding or a row's last token, whose prediction nothing trains; attention
        # is causal, so what the kept positions see is unchanged)
        used = np.flatnonzero(batch["loss_mask"].any(axis=0))
        width = learner.batch_width(int(used[-1]) + 1 if used.size else 1)
        batch = {name: column[:, :width] for name, column in batch.items()}
        batch |= {"advantages": advantages.astype(np.float32), "weights": weights}
        device_batch = learner.put({k: batch[k] for k in ("tokens", "targets")})
        old = np.asarray(jax.device_get(learner.logprobs(state["params"], device_batch)))
        ref = np.asarray(jax.device_get(learner.logprobs(reference, device_batch)))
        batch |= {"old_logprobs": old, "ref_logprobs": ref}
        sampled = batch["loss_mask"][: len(rows_kept)]  # the kept sampled rows (search chains come after them)
        extra["rollout_logprob_gap"] = float(  # how far the sampler's log-probs are from the trainer's
            np.abs((old[: len(rows_kept)] - _sampler_logprobs(sampler_logprobs, sampled)) * sampled).sum()
            / max(sampled.sum(), 1.0))
    rows = len(prompts)
    for epoch in range(rl.epochs if trainable else 0):
        order = np.random.default_rng([rl.seed, step, epoch]).permutation(rows)
        for m in range(rl.minibatches):
            picked = order[m :: rl.minibatches]
            state, metrics = learner.step(state, learner.put({k: v[picked] for k, v in batch.items()}))
            step_metrics.append(metrics)
    step_metrics = [{k: float(v) for k, v in m.items()} for m in jax.device_get(step_metrics)]
    train_seconds = time.perf_counter() - start

    trained = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]} if step_metrics else {}
    trained_tokens = sum(m["trained_tokens"] for m in step_metrics)
    finite = all(m["finite"] for m in step_metrics)
    trained.pop("finite", None)
    trained |= extra
    grouped = scored.correct.reshape(-1, groups)
    generated = int(out.num.sum())
    metrics = trained | {
        "reward_mean": float(scored.reward.mean()), "reward_std": float(scored.reward.std()),
        "reward_min": float(scored.reward.min()), "reward_max": float(scored.reward.max()),
        "correct": float(scored.correct.mean()),
        "groups_all_correct": float(grouped.all(axis=1).mean()),
        "groups_none_correct": float((~grouped).all(axis=1).mean()),
        "completion_length": float(out.num.mean()), "completion_length_max": float(out.num.max()),
        "over_length": float((~out.finished).mean()),
        "rollout_tokens_per_s": generated / rollout_seconds, "rollout_s": rollout_seconds,
        "train_tokens_per_s": trained_tokens / train_seconds if trained_tokens else 0.0, "train_s": train_seconds,
        "kept": float(weights.mean()), "prompts_skipped": float(stream.skipped),
        "groups_informative": float(informative.mean()),  # of the sampled groups: some signal to learn from
        "groups_trained_informative": float(informative[kept].mean()),
        "optimizer_steps": float(len(step_metrics)),
    } | ({"steps_correct": float(scored.steps_correct.mean())} if rl.step_reward else {}) | {
        f"verifier/{reason}": count / len(texts) for reason, count in sorted(scored.reasons.items())} | search_metrics
    record = {"stream": [i for i, _ in sampled_items], "trained": [i for i, _ in items],
              "problems": [p.id for _, p in sampled_items],
              "reward": [round(float(r), 4) for r in scored.reward], "sample": texts[0]}
    return state, metrics | {"finite": finite}, record


def _kept_groups(informative: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` groups to train on, in stream order: informative groups first.

    With rl.oversample = 1 that is every group. With more, the first `count` groups that carry
    a signal (GRPO: rewards not all equal; expert iteration: a verified completion), topped up
    with uniform ones when too few do, so the learner's batch keeps its shape (DAPO's dynamic
    sampling, without re-sampling).
    """
    order = np.argsort(~informative, kind="stable")[:count]
    return np.sort(order)


def _sampler_logprobs(logprobs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The sampler's per-token log-probs [R, N] placed where the loss mask [R, W] puts the completion."""
    placed = np.zeros(mask.shape, np.float32)
    for r in range(len(mask)):
        positions = np.flatnonzero(mask[r])
        placed[r, positions] = logprobs[r, : len(positions)]
    return placed

