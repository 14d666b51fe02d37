"""Sudoku grids: a bitmask backtracking solver that finds and counts solutions, a generator of puzzles with a
unique solution, and the human-justifiable order in which a solution fills the cells.

A grid is a flat list of `size * size` ints in row-major order, 0 for an empty cell; `size` is 4
(2x2 boxes) or 9 (3x3 boxes). Candidate sets are bitmasks with bit v set for digit v.
"""

from __future__ import annotations

import functools
import random

SIZES = (4, 9)
_POPCOUNT = tuple(bin(mask).count("1") for mask in range(1 << 10))


@functools.cache
def geometry(size: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """(row, column, box) of every cell, and the units (rows, then columns, then boxes) as cell lists."""
    box = {4: 2, 9: 3}[size]
    rows = tuple(cell // size for cell in range(size * size))
    cols = tuple(cell % size for cell in range(size * size))
    boxes = tuple((r // box) * box + c // box for r, c in zip(rows, cols, strict=True))
    units = tuple(
        tuple(cell for cell in range(size * size) if key[cell] == index)
        for key in (rows, cols, boxes)
        for index in range(size)
    )
    return rows, cols, boxes, units


class _Masks:
    """Used-digit bitmasks per row, column and box of a grid (None-valued `ok` if the givens clash)."""

    def __init__(self, grid: list[int], size: int):
        self.size = size
        self.rows_of, self.cols_of, self.boxes_of, _ = geometry(size)
        self.full = (1 << (size + 1)) - 2
        self.row = [0] * size
        self.col = [0] * size
        self.box = [0] * size
        self.ok = True
        for cell, value in enumerate(grid):
            if value:
                bit = 1 << value
                r, c, b = self.rows_of[cell], self.cols_of[cell], self.boxes_of[cell]
                if (self.row[r] | self.col[c] | self.box[b]) & bit:
                    self.ok = False
                self.row[r] |= bit
                self.col[c] |= bit
                self.box[b] |= bit

    def candidates(self, cell: int) -> int:
        return self.full & ~(
            self.row[self.rows_of[cell]] | self.col[self.cols_of[cell]] | self.box[self.boxes_of[cell]]
        )

    def toggle(self, cell: int, bit: int) -> None:
        self.row[self.rows_of[cell]] ^= bit
        self.col[self.cols_of[cell]] ^= bit
        self.box[self.boxes_of[cell]] ^= bit


def count_solutions(grid: list[int], size: int, limit: int = 2) -> int:
    """How many solutions `grid` has, counting no further than `limit`."""
    return len(solutions(grid, size, limit))


def solutions(grid: list[int], size: int, limit: int = 1) -> list[list[int]]:
    """Up to `limit` solved grids that keep every filled cell of `grid` (none if it clashes or is stuck)."""
    masks = _Masks(grid, size)
    if not masks.ok:
        return []
    empties = [cell for cell, value in enumerate(grid) if not value]
    found: list[list[int]] = []
    filled = list(grid)

    def search(depth: int) -> bool:  # True: stop, the limit is reached
        if depth == len(empties):
            found.append(list(filled))
            return len(found) >= limit
        best, best_count, best_mask = depth, 99, 0
        for k in range(depth, len(empties)):  # the most constrained cell next
            mask = masks.candidates(empties[k])
            if _POPCOUNT[mask] < best_count:
                best, best_count, best_mask = k, _POPCOUNT[mask], mask
                if best_count <= 1:
                    break
        empties[depth], empties[best] = empties[best], empties[depth]
        cell = empties[depth]
        while best_mask:
            bit = best_mask & -best_mask
            best_mask ^= bit
            masks.toggle(cell, bit)
            filled[cell] = bit.bit_length() - 1
            stop = search(depth + 1)
            masks.toggle(cell, bit)
            if stop:
                return True
        return False

    search(0)
    return found


def full_grid(rng: random.Random, size: int) -> list[int]:
    """A random solved grid: the base pattern with shuffled bands, rows, stacks, columns and digits."""
    box = {4: 2, 9: 3}[size]

    def shuffled_lines() -> list[int]:
        return [band * box + line for band in rng.sample(range(box), box) for line in rng.sample(range(box), box)]

    rows, cols, digits = shuffled_lines(), shuffled_lines(), rng.sample(range(1, size + 1), size)
    grid = [digits[(box * (r % box) + r // box + c) % size] for r in rows for c in cols]
    if rng.random() < 0.5:  # transpose
        grid = [grid[c * size + r] for r in range(size) for c in range(size)]
    return grid


def dig(solution: list[int], size: int, blanks: int, rng: random.Random) -> list[int]:
    """A puzzle: `solution` with up to `blanks` cells emptied (random order) while the solution stays unique."""
    puzzle = list(solution)
    removed = 0
    for cell in rng.sample(range(size * size), size * size):
        if removed == blanks:
            break
        puzzle[cell] = 0
        # Forced if the removed digit is the cell's only candidate; otherwise count solutions.
        if _POPCOUNT[_Masks(puzzle, size).candidates(cell)] == 1 or count_solutions(puzzle, size, 2) == 1:
            removed += 1
        else:
            puzzle[cell] = solution[cell]
    return puzzle


def fill_order(puzzle: list[int], solution: list[int], size: int) -> list[tuple[int, int]]:
    """(cell, digit) in the order a person could justify: naked single, else hidden single, else the
    first cell with the fewest candidates (filled with its solution digit)."""
    grid = list(puzzle)
    masks = _Masks(grid, size)
    *_, units = geometry(size)
    order = []
    while True:
        empties = [cell for cell, value in enumerate(grid) if not value]
        if not empties:
            return order
        choice = next((cell for cell in empties if _POPCOUNT[masks.candidates(cell)] == 1), None)
        if choice is None:
            choice = _hidden_single(grid, masks, units, size)
        if choice is None:
            choice = min(empties, key=lambda cell: _POPCOUNT[masks.candidates(cell)])
        grid[choice] = solution[choice]
        masks.toggle(choice, 1 << solution[choice])
        order.append((choice, solution[choice]))


def _hidden_single(grid: list[int], masks: _Masks, units: tuple[tuple[int, ...], ...], size: int) -> int | None:
    """The first empty cell (units in order rows, columns, boxes; digits ascending) that is the only
    place for some digit in its unit."""
    for unit in units:
        places: dict[int, list[int]] = {}
        for cell in unit:
            if not grid[cell]:
                mask = masks.candidates(cell)
                for digit in range(1, size + 1):
                    if mask >> digit & 1:
                        places.setdefault(digit, []).append(cell)
        for digit in sorted(places):
            if len(places[digit]) == 1:
                return places[digit][0]
    return None


def grid_text(grid: list[int], size: int, empty: str = ".", sep: str = "/") -> str:
    """Rows of digits (`empty` for 0) joined by `sep`: `1.3./..1./...`."""
    return sep.join("".join(str(v) if v else empty for v in grid[r * size : (r + 1) * size]) for r in range(size))


def grid_errors(grid: list[int], size: int) -> str | None:
    """The first repeated digit in a row, column or box of a complete grid, or None if the grid is valid."""
    *_, units = geometry(size)
    for k, unit in enumerate(units):
        seen: set[int] = set()
        for cell in unit:
            if grid[cell] in seen:
                kind = ("row", "column", "box")[k // size]
                return f"{kind} {k % size + 1} repeats {grid[cell]}"
            seen.add(grid[cell])
    return None
