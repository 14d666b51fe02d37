"""Problem files: JSON lines, one problem per line, written atomically and read with validation.

Each line is an object with keys `id, task, difficulty, split, prompt, answer, steps, meta`.
Reading requires `id`, `task`, `prompt` and `answer` (strings, a known task); `difficulty`
(an int, default 0 = unknown), `split` (one of SPLITS, default "test"), `steps` (a list of
strings) and `meta` (an object) are optional; any other key is an error (it is usually a typo).
The task then checks that it can verify the problem (its prompt parses, its answer verifies).
Blank lines are ignored. Lines are read by tasks/jsonl.py: a line that is too long, not UTF-8,
nested too deeply or not standard JSON is a bad line like any other, never an exception.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

from configs.fileio import atomic_open
from tasks import TASKS
from tasks.base import SPLITS, Problem
from tasks.jsonl import iter_json_lines

REQUIRED = ("id", "task", "prompt", "answer")
OPTIONAL = {"difficulty": 0, "split": "test", "steps": [], "meta": {}}
FIELDS = ("id", "task", "difficulty", "split", "prompt", "answer", "steps", "meta")  # the order lines are written in


class ProblemFileError(ValueError):
    """A problem file line that is not a valid problem; the message names the file and line."""


def write_problems(path: str | os.PathLike, problems: Iterable[Problem]) -> None:
    """Writes problems as JSON lines; atomic: the file appears complete or not at all."""
    with atomic_open(path) as f:
        for problem in problems:
            record = {key: getattr(problem, key) for key in FIELDS} | {"steps": list(problem.steps)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def iter_problem_lines(path: str | os.PathLike) -> Iterator[tuple[int, Problem | str]]:
    """(1-based line number, the Problem or `file:line: reason`) for each non-blank line of a file.

    Never raises for a line, whatever it holds; only a file that cannot be opened or read raises (OSError).
    """
    for number, parsed in iter_json_lines(path, _parse_record):
        yield number, parsed if isinstance(parsed, Problem) else str(parsed)


def read_problems(path: str | os.PathLike, skip_bad_lines: bool = False) -> tuple[list[Problem], list[str]]:
    """The problems of a file, and `file:line: reason` for each bad line skipped.

    A bad line raises ProblemFileError (naming file, 1-based line and reason) unless
    `skip_bad_lines`, in which case it is skipped and reported.
    """
    problems, bad = [], []
    for _, parsed in iter_problem_lines(path):
        if isinstance(parsed, Problem):
            problems.append(parsed)
        elif not skip_bad_lines:
            raise ProblemFileError(parsed)
        else:
            bad.append(parsed)
    return problems, bad


def _parse_record(record: Any) -> Problem:
    """One validated problem from a line's JSON value; raises ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in REQUIRED if key not in record]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    unknown = sorted(set(record) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join((*REQUIRED, *OPTIONAL))}")
    record = OPTIONAL | record
    for key in REQUIRED:
        _expect(record, key, str, "a string")
    _expect(record, "difficulty", int, "an integer")
    _expect(record, "steps", list, "a list of strings")
    _expect(record, "meta", dict, "an object")
    if not all(isinstance(step, str) for step in record["steps"]):
        raise ValueError("'steps' must be a list of strings")
    if record["split"] not in SPLITS:
        raise ValueError(f"'split' must be one of {', '.join(SPLITS)}, got {record['split']!r}")
    task = TASKS.get(record["task"])
    if task is None:
        raise ValueError(f"unknown task {record['task']!r}; known tasks: {', '.join(sorted(TASKS))}")
    problem = Problem.from_json(record)
    reason = task.check_problem(problem)
    if reason:
        raise ValueError(reason)
    return problem


def _expect(record: dict[str, Any], key: str, kind: type, description: str) -> None:
    """Raises ValueError unless record[key] has type `kind` (bool is not an integer here)."""
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key!r} must be {description}, got {type(value).__name__}")
