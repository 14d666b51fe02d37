"""Countdown search: legal moves, a memoized reachability solver, and the depth-first search whose
first solution is a problem's worked solution and whose written-out exploration is its `search` trace.

A state is a tuple of positive integers in canonical order: after a move the new number comes
first, then the rest in their previous order. Two states are the same when their sorted tuples
(their multisets) are equal; the memo tables are keyed that way.

Rules: `a + b`, `a * b`, `a - b` only if the result is positive (written larger first),
`a / b` only if exact (written larger first). Moves that multiply or divide by 1 are legal
but never tried by the search: they only discard a 1, and no solution needs that.
"""

from __future__ import annotations

from typing import NamedTuple

from tasks.expr import MAX_VALUE, Node, Op

TRACE_MAX_LINES = 24


class Move(NamedTuple):
    """One step: `left op right = result`, taking state positions `i` and `j` (i < j)."""

    i: int
    j: int
    left: int
    op: str
    right: int
    result: int


def state_text(state: tuple[int, ...]) -> str:
    """Numbers separated by single spaces."""
    return " ".join(map(str, state))


def step_text(move: Move, after: tuple[int, ...]) -> str:
    """The step line: `25 + 17 = 42 | left: 42 3 6`."""
    return f"{move.left} {move.op} {move.right} = {move.result} | left: {state_text(after)}"


def backtrack_text(state: tuple[int, ...]) -> str:
    """The line that returns the search to an earlier state: `backtrack: left 25 17 3 6`."""
    return f"backtrack: left {state_text(state)}"


def pair_results(a: int, b: int) -> list[tuple[int, str, int, int]]:
    """Useful (left, op, right, result) combinations of two numbers: + * - / with the rules above."""
    big, small = (a, b) if a >= b else (b, a)
    out = [(a, "+", b, a + b)]
    if small != 1 and a * b <= MAX_VALUE:
        out.append((a, "*", b, a * b))
    if big != small:
        out.append((big, "-", small, big - small))
    if small != 1 and big % small == 0:
        out.append((big, "/", small, big // small))
    return out


def apply(state: tuple[int, ...], move: Move) -> tuple[int, ...]:
    """The state after a move: the result first, then the untouched numbers in order."""
    return (move.result,) + tuple(x for k, x in enumerate(state) if k != move.i and k != move.j)


def moves(state: tuple[int, ...], target: int) -> list[Move]:
    """The search's moves from `state`, results closest to the target first (ties: position, op order)."""
    out = []
    for i in range(len(state)):
        for j in range(i + 1, len(state)):
            for left, op, right, result in pair_results(state[i], state[j]):
                out.append(Move(i, j, left, op, right, result))
    out.sort(key=lambda move: abs(move.result - target))  # stable: ties keep generation order
    return out


def _results(a: int, b: int) -> tuple[int, ...]:
    """The results of `pair_results(a, b)`, without the bookkeeping (the solver's inner loop)."""
    big, small = (a, b) if a >= b else (b, a)
    if small == 1:
        return (big + 1, big - 1) if big != 1 else (2,)
    out = (big + small, big * small) if big * small <= MAX_VALUE else (big + small,)
    if big != small:
        out += (big - small,)
    return out + (big // small,) if big % small == 0 else out


def reachable(state: tuple[int, ...], target: int, memo: dict[tuple[int, ...], bool]) -> bool:
    """Whether `target` can be made from some of the numbers in `state` (memo: sorted state -> answer)."""
    if target in state:
        return True
    if len(state) < 2:
        return False
    key = tuple(sorted(state))
    found = memo.get(key)
    if found is not None:
        return found
    found = False
    if len(key) == 2:
        found = target in _results(*key)
    else:
        for i in range(len(key) - 1):
            for j in range(i + 1, len(key)):
                rest = key[:i] + key[i + 1 : j] + key[j + 1 :]
                if any(reachable((result,) + rest, target, memo) for result in _results(key[i], key[j])):
                    found = True
                    break
            if found:
                break
    memo[key] = found
    return found


class _Search:
    """Depth-first search in `moves` order, skipping states known to fail; writes out its first lines."""

    def __init__(self, numbers: tuple[int, ...], target: int, max_lines: int):
        self.target = target
        self.failed: set[tuple[int, ...]] = set()
        self.max_lines = max_lines
        self.lines: list[str] = []
        self.line_states: list[tuple[int, ...]] = []  # the state each line leaves
        self.current = numbers

    def log(self, line: str, state: tuple[int, ...]) -> None:
        self.lines.append(line)
        self.line_states.append(state)
        self.current = state

    def run(self, state: tuple[int, ...]) -> bool:
        """True once the target is made or `max_lines` lines are written; False if `state` fails."""
        for move in moves(state, self.target):
            child = apply(state, move)
            if tuple(sorted(child)) in self.failed:
                continue
            if self.current != state:
                self.log(backtrack_text(state), state)
            self.log(step_text(move, child), child)
            if move.result == self.target or len(self.lines) >= self.max_lines:
                return True
            if len(child) > 1 and self.run(child):
                return True
            self.failed.add(tuple(sorted(child)))
        self.failed.add(tuple(sorted(state)))
        return False


def solve(numbers: tuple[int, ...], target: int) -> list[tuple[Move, tuple[int, ...]]] | None:
    """The first solution of the depth-first search as (move, state after) pairs, or None if there is none.

    Equal to what the uninformed search in `moves` order finds first, but found by descending
    into the first child from which the target is reachable, which skips the dead ends' writing.
    """
    memo: dict[tuple[int, ...], bool] = {}
    if target in numbers:
        return None
    path, state = [], numbers
    while True:
        children = ((move, apply(state, move)) for move in moves(state, target))
        found = next((pair for pair in children if reachable(pair[1], target, memo)), None)
        if found is None:  # only at the start: every later state is reachable
            return None
        path.append(found)
        if found[0].result == target:
            return path
        state = found[1]


def answer_expression(numbers: tuple[int, ...], path: list[tuple[Move, tuple[int, ...]]]) -> Node:
    """The expression tree that a solution path builds (its value is the last result)."""
    state, exprs = numbers, list(numbers)
    for move, after in path:
        first, second = exprs[move.i], exprs[move.j]
        swapped = move.left != state[move.i]  # `-` and `/` write the larger number first
        node = Op(move.op, second, first) if swapped else Op(move.op, first, second)
        exprs = [node] + [e for k, e in enumerate(exprs) if k != move.i and k != move.j]
        state = after
    return exprs[0]


def search_trace(numbers: tuple[int, ...], target: int, max_lines: int = TRACE_MAX_LINES) -> list[str]:
    """The search written out: steps, dead ends and `backtrack:` lines, ending in the solved state.

    At most `max_lines` lines: a longer exploration is cut, then backtracks to the deepest state
    of the solution path it has seen and finishes the solution from there.
    """
    path = solve(numbers, target)
    if path is None:
        raise ValueError(f"countdown: {target} cannot be made from {numbers}")
    search = _Search(numbers, target, max_lines=max_lines + 1)
    search.run(numbers)
    if len(search.lines) <= max_lines:
        return search.lines
    path_states = [numbers] + [state for _, state in path]
    for cut in range(max_lines, -1, -1):
        while cut and search.lines[cut - 1].startswith("backtrack:"):
            cut -= 1
        seen = {tuple(sorted(numbers))} | {tuple(sorted(s)) for s in search.line_states[:cut]}
        depth = max(k for k, state in enumerate(path_states) if tuple(sorted(state)) in seen)
        current = search.line_states[cut - 1] if cut else numbers
        resume = [] if sorted(current) == sorted(path_states[depth]) else [backtrack_text(path_states[depth])]
        resume += [step_text(move, state) for move, state in path[depth:]]
        if cut + len(resume) <= max_lines:
            return search.lines[:cut] + resume
    raise ValueError(f"countdown: a solution of {len(path)} steps does not fit in {max_lines} lines")
