"""What RL learns from: a resumable prompt stream, rollouts with the jitted sampler on the mesh, verified rewards.

    stream = PromptStream(cfg, vocab)                  # problem i of the stream from (seed, problem_start + i)
    worker = RolloutWorker(cfg, mesh, vocab, param_shardings)  # reshards params on device, samples in one call
    batch = worker(params, prompts, keys, sampling)    # Rollouts: tokens, logprobs, num, finished (host arrays)
    scored = score_rollouts(problems, texts, finished, rl_cfg)
    step = sample_groups(worker, stream, params, sampling)  # one RL step's groups, sampled and scored

The stream is the RL loop's checkpointed state besides the train state: its position and
the RNG key, saved and restored with the same protocol as the data pipeline (`save`,
`restore`, `batches_read`), so `Checkpoints` stores it as the `data` item of each step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs.schema import Config, RLConfig
from model.distributed import host_values
from model.sharding import batch_sharding, state_shardings
from model.transformer import Transformer
from search.sampler import PAD_ID, Sampling, decode_text, encode_prompts, generate
from tasks import get_task
from tasks.base import Problem, final_answer
from train.data.sources import Component
from train.host_state import DataStateError, check_saved, load_host_state, save_host_state

OVER_LENGTH = "over length"


class PromptStream:
    """The train problems RL sees, in a fixed order: stream index i is a problem from (seed, problem_start + i).

    Index i picks a component of `data.mixture` by rate (a hash of (seed, i)) and takes that
    task's train problem number problem_start + i. Prompts wider than rl.max_prompt_len are
    skipped (counted in `skipped`). Position and RNG key are what `save`/`restore` keep. Every
    process takes the same prompts (a step's rollouts are one global batch split over the
    mesh), so the stream is one shard, saved by process 0 and read back by all, whatever the
    process count.
    """

    def __init__(self, cfg: Config, vocab):
        self.mixture = {name: rate for name, rate in cfg.data.mixture.items() if name != "text"}
        if not self.mixture:
            raise ValueError("data.mixture has no reasoning-task component for RL prompts (TASK_dN_STYLE)")
        self.components = [(Component.parse(name), rate) for name, rate in self.mixture.items()]
        self.cumulative = np.cumsum([rate for _, rate in self.components]) / sum(r for _, r in self.components)
        self.seed, self.start, self.width, self.vocab = cfg.rl.seed, cfg.rl.problem_start, cfg.rl.max_prompt_len, vocab
        self.position = self.batches_read = self.skipped = 0
        self.truncated_examples = 0  # the pipeline protocol's counter; RL never truncates a prompt
        self.key = np.asarray(jax.random.key_data(jax.random.key(cfg.rl.seed)))

    def problem(self, index: int) -> Problem:
        """Stream index `index`'s problem (deterministic)."""
        digest = hashlib.sha256(f"rl-stream|{self.seed}|{index}".encode()).digest()
        fraction = int.from_bytes(digest[:8], "big") / 2**64
        component = self.components[int(np.searchsorted(self.cumulative, fraction, side="right"))][0]
        return get_task(component.task).generate(self.seed, self.start + index, component.difficulty, "train")

    def take(self, count: int) -> list[tuple[int, Problem]]:
        """The next `count` fitting problems as (stream index, problem); advances the position."""
        out = []
        while len(out) < count:
            problem = self.problem(self.position)
            if 1 + len(self.vocab.encode(problem.prompt)) <= self.width:
                out.append((self.position, problem))
            else:
                self.skipped += 1
            self.position += 1
        return out

    def next_key(self) -> jax.Array:
        """A fresh key for this step; the stream's key moves on (and is saved with the position)."""
        key, step_key = jax.random.split(jax.random.wrap_key_data(jnp.asarray(self.key)))
        self.key = np.asarray(jax.random.key_data(key))
        self.batches_read += 1
        return step_key

    def _identity(self) -> dict:
        return {"mixture": self.mixture, "seed": self.seed, "problem_start": self.start, "width": self.width}

    def save(self, directory: str | Path) -> None:
        """Writes the position and key to directory/shard-0-of-1/state.json (atomically; process 0 only)."""
        if jax.process_index() == 0:
            state = self._identity() | {"position": self.position, "batches_read": self.batches_read,
                                        "skipped": self.skipped, "key": self.key.tolist()}
            save_host_state(directory, 0, 1, state)

    def check(self, directory: str | Path) -> None:
        """FileNotFoundError when no position was saved (damage: the checkpoint falls back to an older step)."""
        check_saved(directory, 0, 1)

    def restore(self, directory: str | Path) -> None:
        """Continues from a saved position; a stream saved with other settings is a DataStateError."""
        _, state = load_host_state(directory, 0, 1, what="prompt stream")
        saved = {k: state.get(k) for k in self._identity()}
        if saved != self._identity():
            changed = ", ".join(f"{k}: saved {saved[k]!r}, now {v!r}" for k, v in self._identity().items()
                                if saved[k] != v)
            raise DataStateError(f"{directory}: the prompt stream was saved with other settings ({changed}); "
                                 "start a new rl.run_dir to change them")
        self.position, self.batches_read, self.skipped = state["position"], state["batches_read"], state["skipped"]
        self.key = np.asarray(state["key"], np.uint32)


def row_keys(step_key: jax.Array, stream_indices, samples) -> jax.Array:
    """[R] keys fold_in(fold_in(step_key, stream index), sample): a row's draw does not depend on its batch."""
    indices = jnp.asarray(np.asarray(stream_indices, np.int64) & 0x7FFFFFFF, jnp.uint32)
    samples = jnp.asarray(np.asarray(samples, np.int64), jnp.uint32)
    return jax.vmap(lambda i, k: jax.random.fold_in(jax.random.fold_in(step_key, i), k))(indices, samples)


def rollout_rules(cfg: Config) -> tuple:
    """Logical rules for sampling: without rl.rollout_fsdp, parameters leave the fsdp axis (gathered once)."""
    if cfg.rl.rollout_fsdp:
        return cfg.rules()
    return tuple((name, tuple(a for a in axes if a != "fsdp") if name not in ("batch", "length") else axes)
                 for name, axes in cfg.rules())


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """Sampled completions (host arrays): tokens [R, N] (PAD after a row stops), logprobs [R, N], num [R]."""

    tokens: np.ndarray
    logprobs: np.ndarray
    num: np.ndarray
    eos_id: int = 1  # the vocabulary's EOS: a row that ends with it finished

    @property
    def finished(self) -> np.ndarray:
        """[R] bool: the row ended with EOS (not cut at the token limit)."""
        last = np.take_along_axis(self.tokens, np.maximum(self.num - 1, 0)[:, None], axis=1)[:, 0]
        return (self.num > 0) & (last == self.eos_id)


class RolloutWorker:
    """Samples completions with `search.sampler.generate` on the mesh, compiled ahead of time per shape.

    The train-layout params go to the rollout layout (`rollout_rules`) by a jitted identity
    with the rollout shardings as out_shardings: an on-device all-gather, never via the host.
    """

    def __init__(self, cfg: Config, mesh: Mesh, vocab, train_param_shardings):
        self.cfg, self.mesh, self.vocab = cfg, mesh, vocab
        self.rules = rollout_rules(cfg)
        abstract = nnx.eval_shape(lambda: Transformer(cfg.model, rules=self.rules, rngs=nnx.Rngs(0)))
        self.graphdef, abstract_params = nnx.split(abstract)
        self.param_shardings = state_shardings(abstract_params, mesh, self.rules).to_pure_dict()
        self.abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                            abstract_params.to_pure_dict(), self.param_shardings)
        self.same_layout = all(  # then sampling reads the training arrays themselves
            new.is_equivalent_to(old, len(a.shape)) for new, old, a in zip(
                jax.tree.leaves(self.param_shardings), jax.tree.leaves(train_param_shardings),
                jax.tree.leaves(self.abstract_params), strict=True))
        with jax.set_mesh(mesh):
            self.reshard = jax.jit(lambda params: params, out_shardings=self.param_shardings)
        self.compiled: dict = {}
        self.compile_seconds = 0.0

    def _compiled(self, rows: int, sampling: Sampling):
        signature = (rows, sampling)
        if signature not in self.compiled:
            cfg, graphdef, width = self.cfg, self.graphdef, self.cfg.rl.max_prompt_len

            def rollout(params, prompts, lengths, keys):
                out = generate(graphdef, params, cfg.model, prompts, lengths, keys,
                               max_new_tokens=cfg.rl.max_new_tokens, sampling=sampling, stop_ids=(self.vocab.eos_id,),
                               page_size=cfg.search.page_size)
                return out.tokens, out.logprobs, out.num

            rows_2d = batch_sharding(self.mesh, self.rules, (rows, width))
            rows_1d = batch_sharding(self.mesh, self.rules, (rows,))
            replicated = NamedSharding(self.mesh, PartitionSpec())
            start = time.perf_counter()
            with jax.set_mesh(self.mesh):
                self.compiled[signature] = jax.jit(
                    rollout, in_shardings=(self.param_shardings, rows_2d, rows_1d, rows_1d),
                    out_shardings=(replicated, replicated, replicated),
                ).lower(self.abstract_params, jax.ShapeDtypeStruct((rows, width), jnp.int32),
                        jax.ShapeDtypeStruct((rows,), jnp.int32),
                        jax.eval_shape(lambda: jax.random.split(jax.random.key(0), rows))).compile()
            self.compile_seconds += time.perf_counter() - start
        return self.compiled[signature]

    def rollout_params(self, params):
        """The params in the rollout layout (an on-device reshard; the same arrays if the layouts agree)."""
        if self.same_layout:
            return params
        with jax.set_mesh(self.mesh):
            return self.reshard(params)

    def __call__(self, params, prompts: list[str], keys: jax.Array, sampling: Sampling,
                 rows: int | None = None) -> Rollouts:
        """Completions of `prompts` (texts), one per key [len(prompts)], `rows` per call (default: all).

        `params` must already be in the rollout layout (`rollout_params`). A last partial call
        is padded with copies of its first row, whose results are dropped.
        """
        rows = rows or len(prompts)
        fn = self._compiled(rows, sampling)
        outs = []
        for start in range(0, len(prompts), rows):
            chunk = prompts[start : start + rows]
            pad = rows - len(chunk)
            tokens, lengths = encode_prompts(self.vocab, chunk + [chunk[0]] * pad, self.cfg.rl.max_prompt_len)
            chunk_keys = keys[start : start + rows]
            if pad:
                chunk_keys = jnp.concatenate([chunk_keys, jnp.repeat(chunk_keys[:1], pad, axis=0)])
            with jax.set_mesh(self.mesh):
                out = host_values(fn(params, tokens, lengths, chunk_keys))
            outs.append([x[: len(chunk)] for x in out])
        return Rollouts(*(np.concatenate([o[i] for o in outs]) for i in range(3)), eos_id=self.vocab.eos_id)


def reason_category(reason: str) -> str:
    """A verifier reason without its specifics: "wrong answer 42" -> "wrong_answer" (a metric name)."""
    match = re.match(r"[A-Za-z][A-Za-z ]*", reason)
    words = (match.group(0) if match else "other").strip().lower()
    return re.sub(r"\s+", "_", words) or "other"


@dataclasses.dataclass(frozen=True)
class Scored:
    """Rewards of rollouts: reward [R] (what the learner sees), correct [R] (the verifier's 1.0), reasons."""

    reward: np.ndarray
    correct: np.ndarray
    reasons: Counter
    steps_correct: np.ndarray  # [R] fraction of step lines the task's checker accepts (0 without steps)


def score_rollouts(problems: list[Problem], texts: list[str], finished: np.ndarray, rl: RLConfig) -> Scored:
    """The verifier's reward per completion (row r answers problems[r]); over-length completions get 0.

    A finished completion scores the task's verifier (1/0), plus rl.format_reward if it has an
    answer line, plus rl.step_reward x the fraction of its steps the task's step checker accepts.
    Reasons are counted by category (`reason_category`), over length included.
    """
    rows = len(texts)
    reward, correct, steps_correct = np.zeros(rows, np.float32), np.zeros(rows, bool), np.zeros(rows, np.float32)
    reasons: Counter = Counter()
    for r, (problem, text) in enumerate(zip(problems, texts, strict=True)):
        if not finished[r]:
            reasons[reason_category(OVER_LENGTH)] += 1
            continue
        task = get_task(problem.task)
        score, reason = task.score(problem, text)
        reasons[reason_category(reason)] += 1
        correct[r] = score == 1.0
        if rl.step_reward or rl.format_reward:
            labels = task.check_steps(problem, text) if rl.step_reward else []
            steps_correct[r] = float(np.mean(labels)) if len(labels) else 0.0
            score += rl.step_reward * steps_correct[r] + (rl.format_reward if final_answer(text) is not None else 0.0)
        reward[r] = score
    return Scored(reward, correct, reasons, steps_correct)


@dataclasses.dataclass(frozen=True)
class GroupRollouts:
    """One RL step's samples: rl.group_size completions of each of its problems, decoded and scored.

    Row r = g * group_size + k is sample k of group g (the problem items[g]); problems, texts: [R].
    `params` are the rollout-layout params they were sampled with, `key` the step's key.
    """

    items: list[tuple[int, Problem]]
    problems: list[Problem]
    rollouts: Rollouts
    texts: list[str]
    scored: Scored
    key: jax.Array
    params: Any
    group_size: int
    seconds: float


def sample_groups(worker: RolloutWorker, stream: PromptStream, params, sampling: Sampling) -> GroupRollouts:
    """The next rl.prompts_per_step x rl.oversample problems of `stream`, rl.group_size samples each, scored.

    Row keys come from the stream's next key, the problem's stream index and the sample number.
    `params`: the policy in the training layout (resharded here to the rollout layout).
    """
    rl, groups = worker.cfg.rl, worker.cfg.rl.group_size
    step_key = stream.next_key()
    items = stream.take(rl.prompts_per_step * rl.oversample)
    problems = [p for _, p in items for _ in range(groups)]
    keys = row_keys(step_key, [i for i, _ in items for _ in range(groups)], list(range(groups)) * len(items))
    start = time.perf_counter()
    rollout_params = worker.rollout_params(params)
    out = worker(rollout_params, [p.prompt for p in problems], keys, sampling)
    seconds = time.perf_counter() - start
    texts = [decode_text(worker.vocab, out.tokens[r, : out.num[r]]) for r in range(len(problems))]
    return GroupRollouts(items, problems, out, texts, score_rollouts(problems, texts, out.finished, rl), step_key,
                         rollout_params, groups, seconds)


def sequences(vocab, prompts: list[str], completions: list[np.ndarray], width: int) -> dict[str, np.ndarray]:
    """Training rows BOS + prompt + completion, right-padded to `width`: tokens, targets, loss_mask [R, width].

    The loss mask covers the positions whose target is a completion token (its EOS included).
    """
    rows = len(prompts)
    tokens = np.full((rows, width), PAD_ID, np.int32)
    mask = np.zeros((rows, width), np.float32)
    prompt_tokens, prompt_lengths = encode_prompts(vocab, prompts)
    for r, completion in enumerate(completions):
        length = int(prompt_lengths[r])
        completion = np.asarray(completion, np.int32)[: width - length]
        tokens[r, :length] = prompt_tokens[r, :length]
        tokens[r, length : length + len(completion)] = completion
        mask[r, length - 1 : length - 1 + len(completion)] = 1.0
    targets = np.concatenate([tokens[:, 1:], np.full((rows, 1), PAD_ID, np.int32)], axis=1)
    return {"tokens": tokens, "targets": targets, "loss_mask": mask}
