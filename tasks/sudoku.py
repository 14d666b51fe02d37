"""Sudoku: fill a 4x4 or 9x9 grid with a unique solution, one cell per step.

    Sudoku 4x4:                      <- prompt: a header, then one row per line, `.` for a blank
    1.3.
    ..1.
    .1..
    4..1
    r1c2=2                           <- each step fills one cell (row, column, 1-based)
    ...
    Answer: 1234/3412/2143/4321      <- the full grid, rows joined by `/`

The worked steps fill cells in an order a person could justify: a naked single (a cell with one
candidate) if there is one, else a hidden single (the only place for a digit in a row, column or
box), else the first cell with the fewest candidates, filled with its solution digit.

Verifier: the answer is a complete grid of the right shape, keeps every given, and repeats no digit
in a row, column or box (with a unique solution, that is the solution).

Step checker: a step `rRcC=V` is correct iff it parses, the cell is on the grid and still empty,
and V is the solution's digit there. The filled grid is the givens plus every step so far that
named an empty cell on the grid with a digit in range, right or wrong (so a later step that
overwrites a wrong digit is incorrect); other lines are incorrect and change nothing.

Prompt-only checking (`search.scorer=checker`, a test-time verifier): the verifier reads only the
givens already (`score` is `score_from_prompt`). `check_steps_from_prompt` never reads the solution:
a step is correct iff its cell is on the grid and still empty and some solution of the givens keeps
the givens, every correct step so far and this digit (a backtracking solve, milliseconds on 9x9).
With a unique solution, as generated puzzles have, that is exactly `check_steps`.

Difficulty 1..5: 4x4 with 6 or 10 blanks; 9x9 with 40, 48 or 54 blanks. Blanks are removed while the
solution stays unique, so a grid that cannot lose that many cells keeps a few more givens.
Splits are decided by the solution grid, so no solved grid is shared between splits.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from tasks.base import Problem, PromptCheckedTask, completion_steps, final_answer
from tasks.sudoku_grid import SIZES, dig, fill_order, full_grid, grid_errors, grid_text, solutions

LEVELS = {1: (4, 6), 2: (4, 10), 3: (9, 40), 4: (9, 48), 5: (9, 54)}  # difficulty -> (size, blanks)
_HEADER = re.compile(r"Sudoku (\d)x\1:", re.ASCII)
_STEP = re.compile(r"\s*r(\d{1,2})c(\d{1,2})\s*=\s*(\d{1,2})\s*", re.ASCII)


def _parse_rows(rows: list[str], size: int, empty: str | None) -> list[int] | None:
    """A flat grid from `size` rows of `size` characters (digits 1..size, or `empty` for 0), else None."""
    if len(rows) != size or any(len(row) != size for row in rows):
        return None
    allowed = {str(d): d for d in range(1, size + 1)} | ({empty: 0} if empty else {})
    grid = [allowed.get(char, -1) for row in rows for char in row]
    return None if -1 in grid else grid


def _solvable_with(size: int, givens: list[int]) -> Callable[[int, int], bool]:
    """Judges digits in order from the givens alone: right iff some solution keeps the givens, every digit
    judged right so far and this one (called only on cells still empty)."""
    trusted = list(givens)
    found = solutions(trusted, size)
    known = found[0] if found else None  # one solution that keeps `trusted`: most digits need no new solve

    def right(cell: int, value: int) -> bool:
        nonlocal known
        if known is None:
            return False  # the givens have no solution: no step is right
        trusted[cell] = value
        if known[cell] != value:
            found = solutions(trusted, size)
            if not found:
                trusted[cell] = 0
                return False
            known = found[0]
        return True

    return right


class Sudoku(PromptCheckedTask):
    """Fill a sudoku grid one cell at a time."""

    name = "sudoku"
    difficulties = (1, 2, 3, 4, 5)

    def _sample(self, rng: random.Random, difficulty: int) -> Problem:
        size, _ = LEVELS[difficulty]
        solution = grid_text(full_grid(rng, size), size)
        return Problem("", self.name, difficulty, "", "", (), solution, {"size": size})

    def _complete(self, candidate: Problem, rng: random.Random, difficulty: int) -> Problem:
        size, blanks = LEVELS[difficulty]
        solution = _parse_rows(candidate.answer.split("/"), size, None)
        puzzle = dig(solution, size, blanks, rng)
        steps = tuple(
            f"r{cell // size + 1}c{cell % size + 1}={value}" for cell, value in fill_order(puzzle, solution, size)
        )
        prompt = f"Sudoku {size}x{size}:\n" + grid_text(puzzle, size, sep="\n") + "\n"
        meta = {"size": size, "blanks": puzzle.count(0)}
        return Problem("", self.name, difficulty, "", prompt, steps, candidate.answer, meta)

    def canonical(self, problem: Problem) -> str:
        size, givens = self._givens(problem.prompt)
        return f"{size}x{size}:{grid_text(givens, size)}"

    def split_key(self, problem: Problem) -> str:
        """The solution grid: every puzzle of one solved grid lands in the same split."""
        return problem.answer

    def prompt_error(self, prompt: str) -> str | None:
        try:
            self._givens(prompt)
        except ValueError as err:
            return str(err)
        return None

    def score_from_prompt(self, prompt: str, completion: str) -> tuple[float, str]:
        try:
            size, givens = self._givens(prompt)
            answer = final_answer(completion)
            if answer is None:
                return 0.0, "no answer line"
            grid = _parse_rows(answer.split("/"), size, None)
            if grid is None:
                return 0.0, f"unparseable answer: expected {size} rows of {size} digits 1-{size} joined by '/'"
            for cell, (given, value) in enumerate(zip(givens, grid, strict=True)):
                if given and given != value:
                    return 0.0, f"changes the given r{cell // size + 1}c{cell % size + 1}={given}"
            error = grid_errors(grid, size)
            return (0.0, error) if error else (1.0, "correct")
        except Exception as err:  # a verifier never raises: bad problem data scores 0 too
            return 0.0, f"verifier error: {err}"

    def check_steps(self, problem: Problem, completion: str) -> list[bool]:
        def agrees_with_answer(size: int, givens: list[int]) -> Callable[[int, int], bool]:
            solution = _parse_rows(problem.answer.split("/"), size, None)
            return lambda cell, value: solution[cell] == value

        return self._label_steps(problem.prompt, completion, agrees_with_answer)

    def check_steps_from_prompt(self, prompt: str, completion: str) -> list[bool]:
        return self._label_steps(prompt, completion, _solvable_with)

    def _label_steps(self, prompt: str, completion: str,
                     right: Callable[[int, list[int]], Callable[[int, int], bool]]) -> list[bool]:
        """One label per step line: its cell is on the grid and still empty, and `right(size, givens)(cell, digit)`.

        The filled grid takes every in-range step on an empty cell, right or wrong (see the module docstring).
        """
        lines = completion_steps(completion)
        try:
            size, grid = self._givens(prompt)
            is_right = right(size, list(grid))
            labels = []
            for line in lines:
                step = _STEP.fullmatch(line)
                row, col, value = (int(g) for g in step.groups()) if step else (0, 0, 0)
                if not (1 <= row <= size and 1 <= col <= size and 1 <= value <= size):
                    labels.append(False)
                    continue
                cell = (row - 1) * size + col - 1
                labels.append(grid[cell] == 0 and is_right(cell, value))
                grid[cell] = grid[cell] or value
            return labels
        except Exception:  # never raise on model output or bad problem data
            return [False] * len(lines)

    @staticmethod
    def _givens(prompt: str) -> tuple[int, list[int]]:
        """The grid size and the prompt's grid (0 for blanks); raises ValueError if the prompt is malformed."""
        header, *rows = prompt.rstrip("\n").split("\n") if isinstance(prompt, str) else ("",)
        match = _HEADER.fullmatch(header)
        size = int(match.group(1)) if match else 0
        grid = _parse_rows(rows, size, ".") if size in SIZES else None
        if grid is None:
            raise ValueError("sudoku prompt is not 'Sudoku NxN:' then N rows of N digits or '.' (N = 4 or 9)")
        return size, grid
