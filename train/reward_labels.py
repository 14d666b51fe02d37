"""Labelled samples for reward models from a policy: the jitted sampler, the verifier, step checkers, MC rollouts.

    policy = load_policy("runs/small")                                     # train.policy
    problems = plan_problems(policy.cfg.data.mixture, 200, split="train")  # train.problems
    build_reward_data(policy, problems, "reward.jsonl", LabelSettings(samples=8, mc_rollouts=4))

For every problem the policy samples `samples` completions. The outcome is the task's
verifier. Step labels come from the task's step checker (`label_source` auto or checker) or
from Monte-Carlo rollouts (mc, or auto on a task without a checker): from each step's
prefix, prompt + steps[:i+1], the policy samples `mc_rollouts` completions; the step's label
is the fraction that verify (soft) or whether any does (hard). That needs only a verifier,
so it works for any task.

All generation runs through `search.sampler.generate` in fixed shapes (`rows` prompts of a
fixed width per call), so sampling compiles once and MC rollouts once. Problem p's sample
k draws with fold_in(fold_in(key, p), k) and an MC rollout with a key from (p, the prefix,
r), so a record does not depend on the batch it was made in and an interrupted run resumes
with the same results: records go to `OUT.partial` as each chunk of problems finishes
(flushed), and `OUT` appears, by rename, only when all are done.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from configs.fileio import atomic_path, write_atomic
from tasks import get_task
from tasks.base import Problem, completion_steps, final_answer
from train.policy import Policy
from train.reward_data import RewardDataError, RewardRecord

LABEL_MODES = ("soft", "hard")
LABEL_SOURCE_CHOICES = ("auto", "checker", "mc")


@dataclasses.dataclass(frozen=True)
class LabelSettings:
    """How samples are drawn and labelled (everything that decides the records, for resume checks)."""

    samples: int = 4  # completions per problem
    mc_rollouts: int = 4  # rollouts per step prefix for MC labels
    labels: str = "soft"  # MC labels: soft (fraction verified) or hard (any verified)
    label_source: str = "auto"  # auto (checker where the task has one, else MC), checker or mc
    max_new_tokens: int = 128  # tokens per completion and per rollout
    temperature: float = 1.0
    rows: int = 64  # rows per jitted generate call
    seed: int = 0

    def __post_init__(self):
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels must be soft or hard, got {self.labels!r}")
        if self.label_source not in LABEL_SOURCE_CHOICES:
            raise ValueError(f"label_source must be auto, checker or mc, got {self.label_source!r}")
        if min(self.samples, self.rows, self.max_new_tokens) < 1 or self.mc_rollouts < 0 or self.temperature < 0:
            raise ValueError("samples, rows and max_new_tokens must be >= 1, mc_rollouts and temperature >= 0")


def has_step_checker(task) -> bool:
    """Whether a task labels steps itself (a task without one sets `has_step_checker = False`)."""
    return bool(getattr(task, "has_step_checker", True))


@functools.cache
def _jit_generate() -> Callable:
    from search.sampler import generate

    return jax.jit(generate, static_argnums=(0, 2),
                   static_argnames=("max_new_tokens", "sampling", "stop_ids", "page_size"))


def fold_keys(seed: int, *columns) -> jax.Array:
    """[R] keys fold_in(...fold_in(key(seed), columns[0][r])..., columns[-1][r]) for int columns [R]."""

    def one(*values):
        key = jax.random.key(seed)
        for value in values:
            key = jax.random.fold_in(key, value)
        return key

    return jax.vmap(one)(*(jnp.asarray(np.asarray(c, np.int64) & 0x7FFFFFFF, jnp.uint32) for c in columns))


class Sampler:
    """Completions of text prompts by the policy, `rows` per jitted call at one prompt width (one compile)."""

    def __init__(self, policy: Policy, *, width: int, max_new_tokens: int, temperature: float, rows: int):
        from search.sampler import Sampling

        self.policy, self.width, self.max_new_tokens, self.rows = policy, width, max_new_tokens, rows
        self.sampling = Sampling(temperature)
        needed = width + max_new_tokens
        if needed > policy.cfg.model.max_seq_len:
            raise ValueError(f"prompts of {width} tokens plus {max_new_tokens} new tokens exceed the policy's "
                             f"model.max_seq_len={policy.cfg.model.max_seq_len}; lower max_new_tokens")

    def fits(self, text: str) -> bool:
        return 1 + len(self.policy.vocab.encode(text)) <= self.width

    def __call__(self, texts: list[str], keys: jax.Array) -> list[str]:
        """The completion text (up to EOS) of each prompt; keys [len(texts)]."""
        from search.sampler import decode_text, encode_prompts

        out = []
        for start in range(0, len(texts), self.rows):
            chunk = texts[start : start + self.rows]
            padded = chunk + [chunk[0]] * (self.rows - len(chunk))  # copies keep the shape; their results drop
            chunk_keys = keys[start : start + self.rows]
            chunk_keys = jnp.concatenate([chunk_keys, jnp.repeat(chunk_keys[:1], self.rows - len(chunk), axis=0)])
            tokens, lengths = encode_prompts(self.policy.vocab, padded, self.width)
            with jax.set_mesh(self.policy.mesh):
                generated = _jit_generate()(
                    self.policy.graphdef, self.policy.params, self.policy.cfg.model, tokens, lengths, chunk_keys,
                    max_new_tokens=self.max_new_tokens, sampling=self.sampling, stop_ids=(self.policy.vocab.eos_id,))
            ids, num = np.asarray(generated.tokens), np.asarray(generated.num)
            out += [decode_text(self.policy.vocab, ids[row, : num[row]]) for row in range(len(chunk))]
        return out


def checker_record(problem: Problem, sample: int, completion: str) -> RewardRecord:
    """A completion labelled by its task's step checker and verifier alone (no policy, no rollouts)."""
    task = get_task(problem.task)
    if not has_step_checker(task):
        raise ValueError(f"task {task.name} has no step checker")
    steps, labels = tuple(completion_steps(completion)), tuple(task.check_steps(problem, completion))
    if len(labels) != len(steps):
        raise ValueError(f"task {task.name}: its step checker does not label every step line")
    return RewardRecord(problem, sample, completion, steps, final_answer(completion), tuple(map(float, labels)),
                        float(task.score(problem, completion)[0] == 1.0), "checker", labels)


def _prefix(steps: tuple[str, ...], upto: int) -> str:
    return "".join(f"{step}\n" for step in steps[:upto])


class Labeller:
    """Samples completions of problems and labels them (verifier, step checker, MC rollouts)."""

    def __init__(self, policy: Policy, settings: LabelSettings, prompt_width: int):
        self.policy, self.settings = policy, settings
        make = functools.partial(Sampler, policy, max_new_tokens=settings.max_new_tokens,
                                 temperature=settings.temperature, rows=settings.rows)
        self.sampler = make(width=prompt_width)
        self.rollouts = make(width=prompt_width + settings.max_new_tokens) if self._needs_mc() else None
        self.stats = {"samples": 0, "correct": 0, "mc_rollouts": 0, "mc_prefixes_too_long": 0}

    def _needs_mc(self) -> bool:
        return self.settings.mc_rollouts > 0 and self.settings.label_source != "checker"

    def source(self, task) -> str:
        if self.settings.label_source == "auto":
            return "checker" if has_step_checker(task) else "mc"
        if self.settings.label_source == "checker" and not has_step_checker(task):
            raise ValueError(f"label_source checker: task {task.name} has no step checker; use auto or mc")
        return self.settings.label_source

    def __call__(self, problems: list[Problem], indices: list[int]) -> list[RewardRecord]:
        """Records for `problems` (global plan indices `indices`), `samples` per problem in sample order."""
        s = self.settings
        texts = [p.prompt for p in problems for _ in range(s.samples)]
        keys = fold_keys(s.seed, [i for i in indices for _ in range(s.samples)], list(range(s.samples)) * len(problems))
        completions = self.sampler(texts, keys)
        return self.label([(problem, index, k, completions[n * s.samples + k])
                           for n, (problem, index) in enumerate(zip(problems, indices, strict=True))
                           for k in range(s.samples)])

    def label(self, samples: list[tuple[Problem, int, int, str]]) -> list[RewardRecord]:
        """Records for given (problem, problem index, sample number, completion): verifier, checker, MC labels.

        The problem index keys the MC rollouts' randomness (with the prefix), so equal indices
        and prefixes get equal labels.
        """
        s = self.settings
        drafts = []
        for problem, index, k, completion in samples:
            task = get_task(problem.task)
            steps = tuple(completion_steps(completion))
            checker = tuple(task.check_steps(problem, completion)) if has_step_checker(task) else None
            if checker is not None and len(checker) != len(steps):
                checker = None  # a checker that does not label every step line is no use here
            outcome = task.score(problem, completion)[0]
            drafts.append((problem, index, k, completion, steps, checker, outcome, self.source(task)))
            self.stats["samples"] += 1
            self.stats["correct"] += outcome == 1.0
        mc = self._monte_carlo([(p, i, steps) for p, i, _, _, steps, _, _, source in drafts if source == "mc"])
        records = []
        for problem, index, k, completion, steps, checker, outcome, source in drafts:
            if source == "checker":
                if checker is None:
                    raise ValueError(f"task {problem.task}: its step checker does not label every step line")
                labels = tuple(float(x) for x in checker)
            else:
                labels = tuple(mc[(index, _prefix(steps, i + 1))] for i in range(len(steps)))
            records.append(RewardRecord(problem, k, completion, steps, final_answer(completion), labels,
                                        float(outcome == 1.0), source, checker,
                                        s.mc_rollouts if source == "mc" else 0))
        return records

    def _monte_carlo(self, items: list[tuple[Problem, int, tuple[str, ...]]]) -> dict[tuple[int, str], float]:
        """{(problem index, step prefix): label} from `mc_rollouts` completions of every distinct prefix."""
        s = self.settings
        prefixes: dict[tuple[int, str], Problem] = {}
        for problem, index, steps in items:
            for i in range(len(steps)):
                prefixes.setdefault((index, _prefix(steps, i + 1)), problem)
        labels: dict[tuple[int, str], float] = {}
        if not prefixes:
            return labels
        if self.rollouts is None:
            raise ValueError("MC labels need mc_rollouts >= 1")
        runnable = []
        for (index, prefix), problem in prefixes.items():
            if self.rollouts.fits(problem.prompt + prefix):
                runnable.append((index, prefix, problem))
            else:  # re-encoded text longer than it was sampled (invalid bytes): nothing to roll out from
                labels[(index, prefix)] = 0.0
                self.stats["mc_prefixes_too_long"] += 1
        if not runnable:
            return labels
        r = s.mc_rollouts
        texts = [problem.prompt + prefix for _, prefix, problem in runnable for _ in range(r)]
        keys = fold_keys(s.seed + 1, [index for index, _, _ in runnable for _ in range(r)],
                         [zlib.crc32(prefix.encode()) for _, prefix, _ in runnable for _ in range(r)],
                         list(range(r)) * len(runnable))
        continuations = self.rollouts(texts, keys)
        self.stats["mc_rollouts"] += len(texts)
        for n, (index, prefix, problem) in enumerate(runnable):
            task = get_task(problem.task)
            verified = [task.score(problem, prefix + continuations[n * r + j])[0] == 1.0 for j in range(r)]
            fraction = sum(verified) / r
            labels[(index, prefix)] = fraction if s.labels == "soft" else float(fraction > 0)
        return labels


def prompt_width(problems: list[Problem], vocab, multiple: int = 16) -> int:
    """The widest prompt (BOS included), rounded up to a multiple of `multiple`."""
    longest = max(1 + len(vocab.encode(p.prompt)) for p in problems)
    return -(-longest // multiple) * multiple


def build_reward_data(policy: Policy, problems: list[Problem], out: str | Path, settings: LabelSettings, *,
                      show_progress: bool = True, chunk_problems: int | None = None) -> dict[str, Any]:
    """Samples and labels every problem and writes `out` (JSONL); returns summary statistics.

    Chunks of problems go to `out.partial` as they finish (flushed); rerunning with the same
    policy, problems and settings continues after the last finished chunk. `out` appears, by
    an atomic rename, only once every problem is done.
    """
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial, meta_path = out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.meta")
    meta = {"checkpoint": str(policy.checkpoint.absolute()), "problems": [p.id for p in problems],
            "settings": dataclasses.asdict(settings)}
    done = _resumable(partial, meta_path, meta, settings.samples)
    if not done:
        partial.write_text("")
        write_atomic(meta_path, json.dumps(meta))
    labeller = Labeller(policy, settings, prompt_width(problems, policy.vocab))
    chunk = chunk_problems or max(1, settings.rows // settings.samples)
    bar = tqdm(total=len(problems), initial=done, unit="problem", desc="reward data", disable=not show_progress,
               dynamic_ncols=True)
    with open(partial, "a", encoding="utf-8") as f:
        for start in range(done, len(problems), chunk):
            indices = list(range(start, min(start + chunk, len(problems))))
            records = labeller([problems[i] for i in indices], indices)
            f.write("".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(indices))
            stats = labeller.stats
            bar.set_postfix({"correct": f"{stats['correct'] / max(stats['samples'], 1):.2f}",
                             "rollouts": stats["mc_rollouts"]}, refresh=False)
    bar.close()
    os.replace(partial, out)
    meta_path.unlink(missing_ok=True)
    return summarize(out) | {"resumed_problems": done} | labeller.stats


def _resumable(partial: Path, meta_path: Path, meta: dict, samples: int) -> int:
    """Problems already finished in `partial` by a run with the same `meta` (0: start afresh).

    A torn last line (the run died mid-write) is cut off; whole chunks stay.
    """
    if not (partial.is_file() and meta_path.is_file()):
        return 0
    try:
        if json.loads(meta_path.read_text()) != meta:
            return 0
    except json.JSONDecodeError:
        return 0
    text = partial.read_text(encoding="utf-8")
    lines = text.split("\n")
    whole = lines[:-1]  # the part after the last newline is torn (or empty)
    per_problem = [whole[i : i + samples] for i in range(0, len(whole) - len(whole) % samples, samples)]
    ids = []
    for group in per_problem:
        try:
            group_ids = {json.loads(line)["problem_id"] for line in group}
        except (json.JSONDecodeError, KeyError, TypeError):
            break
        if len(group_ids) != 1:
            break
        ids.append(group_ids.pop())
    done = 0
    while done < min(len(ids), len(meta["problems"])) and ids[done] == meta["problems"][done]:
        done += 1
    with atomic_path(partial, mode=partial.stat().st_mode & 0o777) as tmp:  # a crash mid-write keeps the old file
        tmp.write_text("".join(line + "\n" for line in whole[: done * samples]), encoding="utf-8")
    return done


def summarize(path: str | Path) -> dict[str, Any]:
    """Counts of a reward data file: records, problems, steps, outcome and step-label rates, MC vs checker."""
    from train.reward_data import read_reward_records

    records = read_reward_records(path)
    steps = [label for r in records for label in r.labels]
    both = [(label, checker) for r in records if r.label_source == "mc" and r.checker_labels is not None
            for label, checker in zip(r.labels, r.checker_labels, strict=True)]
    summary = {
        "records": len(records), "problems": len({r.problem.id for r in records}), "steps": len(steps),
        "outcome_rate": float(np.mean([r.outcome for r in records])),
        "step_label_mean": float(np.mean(steps)) if steps else float("nan"),
        "label_sources": sorted({r.label_source for r in records}),
    }
    if both:
        # "any rollout verified" (label > 0: the hard label) against the checker's verdict
        summary["mc_checker_agreement"] = float(np.mean([(label > 0) == checker for label, checker in both]))
    return summary


__all__ = ["LabelSettings", "Labeller", "RewardDataError", "Sampler", "build_reward_data", "checker_record",
           "summarize"]
