"""Reward-model data: labelled samples as JSON lines, their token layout, and a resumable batch stream.

One line per sampled completion (written by `ponder reward data`, train/reward_labels.py):

    problem_id, task, difficulty, split, prompt, reference_answer   the problem (what verifiers read)
    sample            which of the problem's samples this is (0-based)
    completion        the policy's text after the prompt, as sampled
    steps             its step lines (tasks.base.completion_steps); answer: its final answer or null
    labels            one label in [0, 1] per step: is the step right (checker) / can it still succeed (MC)
    outcome           1 if the verifier accepts the completion, else 0
    label_source      "checker" (the task's step checker) or "mc" (Monte-Carlo rollouts)
    checker_labels    the step checker's labels when the task has one (null otherwise), for comparison
    mc_rollouts       rollouts per step behind MC labels (0 for checker labels)

Token layout, exactly what the policy sees in search (BOS id 0, EOS id 1):

    BOS prompt(ends "\\n") step_1 "\\n" ... step_n "\\n" "Answer: X" EOS

A PRM has a label at each step's delimiter (its newline: the step's last token, where
`search.scorers.RewardModelScorer` reads the head) and the outcome at the answer line's EOS;
an ORM has the outcome at the completion's last token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from configs.fileio import atomic_open
from configs.schema import Config
from tasks.base import ANSWER_PREFIX, SPLITS, Problem
from tasks.jsonl import BadLine, iter_json_lines
from train.data.vocab import get_vocabulary
from train.host_state import DataStateError, load_host_state, save_host_state

LABEL_SOURCES = ("checker", "mc")
_PROBLEM_KEYS = ("problem_id", "task", "difficulty", "split", "prompt", "reference_answer")
_KEYS = (*_PROBLEM_KEYS, "sample", "completion", "steps", "answer", "labels", "outcome", "label_source",
         "checker_labels", "mc_rollouts")


class RewardDataError(ValueError):
    """A reward data file that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class RewardRecord:
    """One labelled sample: a problem, the policy's completion, per-step labels and the outcome."""

    problem: Problem
    sample: int
    completion: str
    steps: tuple[str, ...]
    answer: str | None
    labels: tuple[float, ...]
    outcome: float
    label_source: str
    checker_labels: tuple[bool, ...] | None = None
    mc_rollouts: int = 0

    def to_json(self) -> dict[str, Any]:
        p = self.problem
        return {
            "problem_id": p.id, "task": p.task, "difficulty": p.difficulty, "split": p.split, "prompt": p.prompt,
            "reference_answer": p.answer, "sample": self.sample, "completion": self.completion,
            "steps": list(self.steps), "answer": self.answer, "labels": list(self.labels), "outcome": self.outcome,
            "label_source": self.label_source,
            "checker_labels": None if self.checker_labels is None else list(self.checker_labels),
            "mc_rollouts": self.mc_rollouts,
        }

    @classmethod
    def from_json(cls, record: Any) -> RewardRecord:
        """Validates one decoded JSON line; raises ValueError saying what is wrong."""
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        missing = [key for key in _KEYS if key not in record and key not in ("checker_labels", "mc_rollouts")]
        if missing:
            raise ValueError(f"missing key(s) {', '.join(missing)}")
        unknown = sorted(set(record) - set(_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_KEYS)}")
        for key in ("problem_id", "task", "prompt", "reference_answer", "completion"):
            _expect(isinstance(record[key], str), key, "a string", record[key])
        for key in ("difficulty", "sample"):
            _expect(isinstance(record[key], int) and not isinstance(record[key], bool), key, "an integer", record[key])
        _expect(record["split"] in SPLITS, "split", f"one of {', '.join(SPLITS)}", record["split"])
        _expect(record["answer"] is None or isinstance(record["answer"], str), "answer", "a string or null",
                record["answer"])
        steps, labels = record["steps"], record["labels"]
        _expect(isinstance(steps, list) and all(isinstance(s, str) and "\n" not in s for s in steps), "steps",
                "a list of strings without newlines", steps)
        _expect(isinstance(labels, list) and all(_is_unit(x) for x in labels), "labels", "a list of numbers in [0, 1]",
                labels)
        if len(labels) != len(steps):
            raise ValueError(f"'labels' has {len(labels)} entries for {len(steps)} steps")
        _expect(record["outcome"] in (0, 1) and not isinstance(record["outcome"], bool), "outcome", "0 or 1",
                record["outcome"])
        _expect(record["label_source"] in LABEL_SOURCES, "label_source", " or ".join(LABEL_SOURCES),
                record["label_source"])
        checker = record.get("checker_labels")
        if checker is not None:
            _expect(isinstance(checker, list) and all(isinstance(x, bool) for x in checker)
                    and len(checker) == len(steps), "checker_labels", "null or one boolean per step", checker)
        rollouts = record.get("mc_rollouts", 0)
        _expect(isinstance(rollouts, int) and not isinstance(rollouts, bool) and rollouts >= 0, "mc_rollouts",
                "a non-negative integer", rollouts)
        problem = Problem(id=record["problem_id"], task=record["task"], difficulty=record["difficulty"],
                          split=record["split"], prompt=record["prompt"], steps=(),
                          answer=record["reference_answer"])
        return cls(problem, record["sample"], record["completion"], tuple(steps), record["answer"],
                   tuple(float(x) for x in labels), float(record["outcome"]), record["label_source"],
                   None if checker is None else tuple(checker), rollouts)


def _is_unit(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x <= 1.0


def _expect(ok: bool, key: str, description: str, value: Any) -> None:
    if not ok:
        shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
        raise ValueError(f"{key!r} must be {description}, got {shown}")


def read_reward_records(path: str | os.PathLike) -> list[RewardRecord]:
    """Every record of a reward data file; the first bad line raises RewardDataError naming `file:line`.

    Lines are read by tasks/jsonl.py (bounded, strict UTF-8, nesting checked), so whatever a line
    holds, the error is this one.
    """
    path = Path(path)
    if not path.is_file():
        raise RewardDataError(f"{path}: no such reward data file (make one with `ponder reward data`)")
    records = []
    for _, parsed in iter_json_lines(path, RewardRecord.from_json):
        if isinstance(parsed, BadLine):
            raise RewardDataError(str(parsed))
        records.append(parsed)
    if not records:
        raise RewardDataError(f"{path}: no records")
    return records


def write_reward_records(path: str | os.PathLike, records: list[RewardRecord]) -> Path:
    """Writes records as JSON lines, atomically: the file appears complete or not at all."""
    with atomic_open(path) as f:
        for record in records:
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    return Path(path)


@dataclasses.dataclass(frozen=True)
class Example:
    """A record as the reward model reads it: token ids, label positions [L] and labels [L]."""

    tokens: np.ndarray
    positions: np.ndarray
    labels: np.ndarray


def record_tokens(record: RewardRecord, vocab) -> tuple[list[int], list[int], list[int]]:
    """(token ids, positions of step delimiters, position of the answer line's EOS or []) in the search's layout."""
    newline = int(vocab.encode("\n")[-1])
    ids = [0] + list(vocab.encode(record.problem.prompt))  # BOS (id 0), as search.sampler.encode_prompts writes it
    step_ends = []
    for step in record.steps:
        ids += list(vocab.encode(step)) + [newline]
        step_ends.append(len(ids) - 1)
    answer_end = []
    if record.answer is not None:
        ids += list(vocab.encode(ANSWER_PREFIX + record.answer)) + [vocab.eos_id]
        answer_end.append(len(ids) - 1)
    return ids, step_ends, answer_end


def to_example(record: RewardRecord, vocab, kind: str, hard: bool = False) -> Example | None:
    """The record's tokens and labels for a PRM (each step, then the answer) or an ORM (the last token).

    None when nothing of the completion is there to label. `hard`: a label counts as 1 when > 0.
    """
    ids, step_ends, answer_end = record_tokens(record, vocab)
    if kind == "orm":
        completion_tokens = len(step_ends) + len(answer_end)
        positions, labels = ([len(ids) - 1], [record.outcome]) if completion_tokens else ([], [])
    elif kind == "prm":
        positions = step_ends + answer_end
        labels = list(record.labels) + [record.outcome] * len(answer_end)
    else:
        raise ValueError(f"reward.kind must be prm or orm, got {kind!r}")
    if not positions:
        return None
    labels = np.asarray(labels, np.float32)
    if hard:
        labels = (labels > 0).astype(np.float32)
    return Example(np.asarray(ids, np.int32), np.asarray(positions, np.int32), labels)


def held_out(problem_id: str, eval_fraction: float) -> bool:
    """Whether a problem belongs to the held-out (validation) part: a stable hash of its id."""
    digest = hashlib.sha256(problem_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


class RewardData:
    """This host's stream of packed reward-model batches from `reward.data`; resumes exactly.

    Rows of `data.seq_len` hold whole examples one after another (segment ids keep them apart,
    positions restart); an example longer than a row is cut (and counted). Each epoch visits
    this host's examples (every `num_shards`-th of the split, in file order) in an order drawn
    from (seed, epoch). Features: tokens, positions, segment_ids (int32), labels, label_mask
    (float32), all [host_batch, seq_len]. Same interface as `train.data.Pipeline` for the trainer
    and checkpoints: `save`, `restore`, `batches_read`, `truncated_examples`.
    """

    def __init__(self, cfg: Config, *, split: str = "train", shard_index: int | None = None,
                 num_shards: int | None = None):
        if split not in ("train", "validation"):
            raise ValueError(f"reward data has a train and a validation split, not {split!r}")
        self.cfg, self.split, self.seed = cfg, split, cfg.seed
        self.shard_index = jax.process_index() if shard_index is None else shard_index
        self.num_shards = jax.process_count() if num_shards is None else num_shards
        if cfg.data.batch_size % self.num_shards:
            raise ValueError(f"data.batch_size={cfg.data.batch_size} does not split over {self.num_shards} hosts")
        self.host_batch_size = cfg.data.batch_size // self.num_shards
        path = Path(cfg.reward.data)
        records = read_reward_records(path)
        with open(path, "rb") as f:
            self.file_digest = hashlib.file_digest(f, "sha256").hexdigest()
        vocab = get_vocabulary(cfg.data.vocab)
        fraction = cfg.reward.eval_fraction
        wanted = [r for r in records if held_out(r.problem.id, fraction) == (split == "validation")]
        examples = [to_example(r, vocab, cfg.reward.kind, cfg.reward.labels == "hard") for r in wanted]
        self.examples = [e for e in examples if e is not None][self.shard_index :: self.num_shards]
        if not self.examples:
            hint = ("raise reward.eval_fraction or set train.eval_every=0" if split == "validation"
                    else "lower reward.eval_fraction or make more data")
            raise RewardDataError(f"{path}: no labelled {split} examples for host {self.shard_index} "
                                  f"(reward.eval_fraction={fraction}); {hint}")
        self.epoch = self.cursor = self.batches_read = self.truncated_examples = 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))

    def _take(self) -> Example:
        if self.cursor == len(self.examples):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()
        return self.examples[self._order[self.cursor]]

    def __iter__(self) -> RewardData:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """The next host-local batch: each feature [host_batch, seq_len]."""
        rows, width = self.host_batch_size, self.cfg.data.seq_len
        batch = {name: np.zeros((rows, width), np.int32) for name in ("tokens", "positions", "segment_ids")}
        batch |= {name: np.zeros((rows, width), np.float32) for name in ("labels", "label_mask")}
        for row in range(rows):
            used, segment = 0, 0
            while True:
                example = self._take()
                length = len(example.tokens)
                if used and used + length > width:
                    break  # starts the next row
                if length > width:
                    self.truncated_examples += 1
                length = min(length, width)
                segment += 1
                span = slice(used, used + length)
                batch["tokens"][row, span] = example.tokens[:length]
                batch["positions"][row, span] = np.arange(length)
                batch["segment_ids"][row, span] = segment
                keep = example.positions < length
                batch["labels"][row, used + example.positions[keep]] = example.labels[keep]
                batch["label_mask"][row, used + example.positions[keep]] = 1.0
                used += length
                self.cursor += 1
                if used == width:
                    break
        self.batches_read += 1
        return batch

    # -- exact resume (the same protocol as train.data.Pipeline, so train.checkpoint saves it) --

    def _identity(self) -> dict:
        reward = self.cfg.reward.model_dump(mode="json")
        reward.pop("data")  # the file may move; its content must not change
        return {"file_sha256": self.file_digest, "reward": reward, "seq_len": self.cfg.data.seq_len,
                "batch_size": self.cfg.data.batch_size, "vocab": self.cfg.data.vocab, "seed": self.seed,
                "split": self.split}

    def save(self, directory: str | Path) -> Path:
        """Writes this host's position to directory/host-I-of-N/state.json (atomically); returns that path."""
        state = self._identity() | {"epoch": self.epoch, "cursor": self.cursor, "batches_read": self.batches_read,
                                    "truncated_examples": self.truncated_examples}
        return save_host_state(directory, self.shard_index, self.num_shards, state)

    def restore(self, directory: str | Path) -> None:
        """Continues from a saved position: the next batch is the one the saved stream would yield next."""
        target, state = load_host_state(directory, self.shard_index, self.num_shards)
        identity = self._identity()
        changed = [key for key in identity if state.get(key) != identity[key]]
        if changed:
            what = ", ".join("the content of reward.data" if key == "file_sha256" else key for key in changed)
            raise DataStateError(f"{target}: saved with different reward data settings ({what})")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.batches_read, self.truncated_examples = state["batches_read"], state["truncated_examples"]
        self._order = self._epoch_order()
