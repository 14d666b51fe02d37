"""What every reasoning task provides: problems with stepwise solutions, a verifier, a step checker.

A task is deterministic: `generate(seed, index, difficulty, split)` always returns the same
problem, and the three splits are disjoint by construction (a problem's split is a hash of
its split key, by default its canonical form, and generation rejects candidates whose hash
falls in another split). Generation runs in two phases so that rejected candidates stay cheap:
`_sample` draws a candidate far enough to know its split key, `_complete` does the expensive
rest (solving, writing the steps) only for the accepted one.

Text format of a worked example, the same for every task:

    <prompt>\n<step 1>\n<step 2>\n...\nAnswer: <answer><end of sequence>

The newline ends a step: the search treats it as the step delimiter.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import random
from typing import Any, ClassVar

SPLITS = ("train", "validation", "test")
# Fraction of the hash space owned by each split (cumulative upper bounds).
_SPLIT_BOUNDS = {"train": 0.90, "validation": 0.95, "test": 1.00}
ANSWER_PREFIX = "Answer: "
MAX_COMPLETION_CHARS = 20_000  # verifiers look at no more than this


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: `prompt` ends with a newline; `steps` is the worked solution, one line each.

    Verifiers and step checkers read only `prompt` and `answer`, so a problem file needs no more.
    `meta` holds facts derived at generation (numbers and target, grid size, ...) for analysis;
    it must be JSON-serializable: problem files store it.
    """

    id: str
    task: str
    difficulty: int
    split: str
    prompt: str
    steps: tuple[str, ...]
    answer: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"steps": list(self.steps)}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Problem:
        return cls(**(record | {"steps": tuple(record.get("steps", ()))}))


def solution_text(steps: list[str] | tuple[str, ...], answer: str) -> str:
    """The target text after the prompt: steps one per line, then the answer line."""
    return "".join(f"{step}\n" for step in steps) + f"{ANSWER_PREFIX}{answer}"


def split_of(canonical: str) -> str:
    """The split a problem belongs to, from a stable hash of its canonical form."""
    digest = hashlib.sha256(canonical.encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return next(split for split in SPLITS if fraction < _SPLIT_BOUNDS[split])


def rng_for(task: str, seed: int, split: str, index: int, difficulty: int, attempt: int) -> random.Random:
    """An RNG that depends only on its arguments (never on global state or call order)."""
    key = f"{task}|{seed}|{split}|{index}|{difficulty}|{attempt}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def final_answer(completion: str) -> str | None:
    """The text after the last `Answer: ` line of a completion (None if there is none)."""
    completion = completion[:MAX_COMPLETION_CHARS]
    for line in reversed(completion.splitlines()):
        if line.startswith(ANSWER_PREFIX):
            return line[len(ANSWER_PREFIX) :].strip()
    return None


def completion_steps(completion: str) -> list[str]:
    """The step lines of a completion: every line before the answer line (blank lines dropped)."""
    steps = []
    for line in completion[:MAX_COMPLETION_CHARS].splitlines():
        if line.startswith(ANSWER_PREFIX):
            break
        if line.strip():
            steps.append(line)
    return steps


class Task(abc.ABC):
    """A reasoning environment. Subclasses set `name`, `difficulties`, `trace_styles`."""

    name: ClassVar[str]
    difficulties: ClassVar[tuple[int, ...]]
    trace_styles: ClassVar[tuple[str, ...]] = ("direct",)
    # Whether `score_from_prompt` and `check_steps_from_prompt` exist: answers and steps can be
    # checked from the prompt alone (a test-time verifier), not only against the reference answer.
    checks_from_prompt: ClassVar[bool] = False

    def generate(self, seed: int, index: int, difficulty: int, split: str = "train") -> Problem:
        """The problem at `index` of `split`; deterministic in all arguments."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if difficulty not in self.difficulties:
            raise ValueError(f"{self.name}: difficulty {difficulty} not in {self.difficulties}")
        for attempt in range(10_000):
            rng = rng_for(self.name, seed, split, index, difficulty, attempt)
            candidate = self._sample(rng, difficulty)
            if split_of(self.split_key(candidate)) == split:
                problem = self._complete(candidate, rng, difficulty)
                return dataclasses.replace(
                    problem, id=f"{self.name}-d{difficulty}-{split}-s{seed}-{index}", split=split
                )
        raise RuntimeError(f"{self.name}: no {split} problem found for index {index}")  # pragma: no cover

    def trace(self, problem: Problem, style: str = "direct") -> list[str]:
        """Solution lines in a trace style (`direct`: the worked steps)."""
        if style not in self.trace_styles:
            raise ValueError(f"{self.name}: trace style {style!r} not in {self.trace_styles}")
        return list(problem.steps)

    @abc.abstractmethod
    def _sample(self, rng: random.Random, difficulty: int) -> Problem:
        """A candidate problem, complete enough for `split_key` (id and split are filled in by `generate`)."""

    def _complete(self, candidate: Problem, rng: random.Random, difficulty: int) -> Problem:
        """The finished problem from an accepted candidate (same split key); `rng` continues `_sample`'s stream."""
        return candidate

    @abc.abstractmethod
    def canonical(self, problem: Problem) -> str:
        """A string that is equal for two problems exactly when they are the same problem."""

    def split_key(self, problem: Problem) -> str:
        """The string whose hash picks the split: the canonical form, or something coarser.

        Equal canonical forms must give equal keys; a coarser key (a sudoku's solution grid)
        keeps more apart and can be known before the expensive part of generation.
        """
        return self.canonical(problem)

    def check_problem(self, problem: Problem) -> str | None:
        """Why a problem (e.g. read from a file) cannot be verified, or None if it is well-formed."""
        return None

    @abc.abstractmethod
    def score(self, problem: Problem, completion: str) -> tuple[float, str]:
        """(1.0, "correct") if the completion's final answer is right, else (0.0, reason). Never raises."""

    @abc.abstractmethod
    def check_steps(self, problem: Problem, completion: str) -> list[bool]:
        """One label per step line of the completion: is this step correct? Never raises."""

    def answer_key(self, problem: Problem, answer: str) -> str:
        """The form in which a vote counts `answer` to `problem`: equal keys are one answer. Never raises.

        Every vote over answers (`ponder search`, reward-model evaluation, RL search
        distillation) counts by this key. Default: the text without surrounding spaces.
        """
        return answer.strip()

    def prompt_error(self, prompt: str) -> str | None:
        """Why completions of `prompt` cannot be checked from the prompt alone (None: they can). Never raises.

        A task whose checking needs the reference answer says so for every prompt; one that can
        check from the prompt names what is malformed about this one.
        """
        if not self.checks_from_prompt:
            return f"{self.name}: checking an answer or a step needs the reference answer, not only the prompt"
        return None

    def score_from_prompt(self, prompt: str, completion: str) -> tuple[float, str]:
        """`score` from the prompt's text alone, never a reference answer: (1.0, "correct") or (0.0, reason).

        Never raises on a completion or a malformed prompt (0.0 with the reason); raises ValueError
        (`prompt_error`) for a task without prompt-only checking.
        """
        raise ValueError(self.prompt_error(prompt))

    def check_steps_from_prompt(self, prompt: str, completion: str) -> list[bool]:
        """`check_steps` from the prompt's text alone: one label per step line. Raises like `score_from_prompt`."""
        raise ValueError(self.prompt_error(prompt))


class PromptCheckedTask(Task):
    """A task whose answers verify from the prompt alone: `score` is `score_from_prompt`, and a problem is
    well-formed when its prompt parses and its own answer verifies."""

    checks_from_prompt: ClassVar[bool] = True

    def check_problem(self, problem: Problem) -> str | None:
        error = self.prompt_error(problem.prompt)
        if error:
            return error
        score, reason = self.score(problem, f"Answer: {problem.answer}")
        return None if score == 1.0 else f"answer {problem.answer!r} does not verify: {reason}"

    def score(self, problem: Problem, completion: str) -> tuple[float, str]:
        return self.score_from_prompt(problem.prompt, completion)
