"""JSON lines from files anyone may have written: read bounded and strict, and a bad line never raises.

Problem files (tasks/files.py) and reward data files (train/reward_data.py) both come through
`iter_json_lines`, so a hostile line is handled one way. A file is read in binary, one line (up
to "\\n") at a time; each non-blank line yields its 1-based number and either the caller's
`parse` of its JSON value or a `BadLine` naming `file:line: reason`. A line is bad when it is
longer than MAX_LINE_BYTES (the rest of it is read and dropped in chunks, never held whole), is
not strict UTF-8, nests arrays/objects deeper than MAX_DEPTH (counted before parsing, so the
parser never runs out of stack), is not standard JSON (NaN, Infinity, a float out of range, a
duplicate key, a lone surrogate escape), or when `parse` rejects its value.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import Any, BinaryIO, TypeVar

MAX_LINE_BYTES = 1 << 20  # a problem or a labelled sample is a few KiB; 1 MiB is generous for either
MAX_DEPTH = 64  # nested arrays and objects on one line, the line's own object included (ours use 2 or 3)
MAX_REASON_CHARS = 500  # a report stays one readable line, whatever the line held
_DRAIN_BYTES = 1 << 16  # how much of an over-long line's tail is read at a time

_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"?', re.DOTALL)  # an unclosed string runs to the end
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_NESTING = {"[": 1, "{": 1, "]": -1, "}": -1}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
T = TypeVar("T")


class BadLine(ValueError):
    """A line that cannot be used; the message is `file:line: reason` on one line."""

    def __init__(self, path: str, number: int, reason: str):
        super().__init__(f"{path}:{number}: {_printable(reason)}")
        self.path, self.number = path, number


def iter_json_lines(path: str | os.PathLike, parse: Callable[[Any], T]) -> Iterator[tuple[int, T | BadLine]]:
    """(1-based line number, `parse(value)` or the BadLine saying why not) for each non-blank line.

    `parse` gets the line's decoded JSON value and raises ValueError to reject it; whatever it
    or the line raises becomes the line's BadLine. Only file-level errors (no such file, an I/O
    error) propagate.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(_bounded_lines(f), start=1):
            if raw is None:
                yield number, BadLine(path, number, f"line longer than {MAX_LINE_BYTES} bytes")
                continue
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    continue
                parsed = parse(loads(text))
            except UnicodeDecodeError as err:
                yield number, BadLine(path, number, f"not valid UTF-8: {err.reason} at byte {err.start}")
            except ValueError as err:
                yield number, BadLine(path, number, str(err))
            except RecursionError:  # a `parse` that walks a value recursively; loads itself never gets here
                yield number, BadLine(path, number, "nested too deeply")
            except Exception as err:  # a line never stops the file: any other failure is that line's report
                yield number, BadLine(path, number, f"{type(err).__name__}: {err}")
            else:
                yield number, parsed


def loads(text: str) -> Any:
    """One standard JSON value from `text`, its nesting checked first; raises ValueError saying what is wrong."""
    if _depth(text) > MAX_DEPTH:
        raise ValueError(f"nested too deeply: more than {MAX_DEPTH} levels of arrays and objects")
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite, object_pairs_hook=_object)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON: {err}") from None
    if "\\u" in text:  # only an escape can make a lone surrogate (the bytes were strict UTF-8)
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate escape (\\ud800-\\udfff), which is not Unicode") from None
    return value


def _bounded_lines(f: BinaryIO) -> Iterator[bytes | None]:
    """Each line's bytes, or None for a line longer than MAX_LINE_BYTES (its rest read in chunks and dropped)."""
    while line := f.readline(MAX_LINE_BYTES + 1):
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(_DRAIN_BYTES)
            yield None
        else:
            yield line


def _depth(text: str) -> int:
    """How deeply arrays and objects nest in `text` (brackets inside strings do not count)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:  # the common case: too few to nest too deeply
        return 0
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_NESTING.__getitem__, brackets)), default=0)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not standard JSON")


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {literal} is out of range")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) < len(pairs):  # which value the writer meant is anyone's guess
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return record


def _printable(reason: str) -> str:
    """`reason` on one line (control characters escaped) and at most MAX_REASON_CHARS long."""
    reason = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", reason[: 4 * MAX_REASON_CHARS])
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."
