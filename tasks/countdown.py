"""Countdown: reach a target by combining numbers with + - * /, two at a time.

    Numbers: 25 17 3 6               <- prompt (numbers in random order)
    Target: 42
    25 + 17 = 42 | left: 42 3 6      <- each step combines two available numbers into one
    Answer: 25 + 17                  <- one expression, each number used at most once

Rules: every intermediate result is a positive integer (subtraction only larger minus smaller,
giving > 0; division only when exact). Not every number has to be used. Generated targets need
at least two steps (never one of the numbers, never one operation on two of them). The `left:`
list is the multiset after the step, written with the new number first, then the rest in their
order before the step (the checker compares it as a multiset). The worked solution is the first solution of a
depth-first search that tries results closest to the target first (see countdown_solver).

Trace styles: `direct` is the solution's steps only; `search` writes out that depth-first search
with dead ends and `backtrack: left 25 17 3 6` lines, at most 24 lines, always ending in the
solved state (a longer exploration is cut and resumes the solution path, see `search_trace`).

Verifier and step checker read only the prompt (numbers and target), never the reference answer,
so `score`/`check_steps` are `score_from_prompt`/`check_steps_from_prompt` on the problem's prompt:
a test-time verifier (`search.scorer=checker`). The verifier accepts any legal expression that hits
the target, not only the stored answer.

Verifier: the answer parses (numbers, + - * /, parentheses), uses each number at most as often
as the prompt has it, keeps every intermediate result a positive integer, and equals the target.

Step checker: a step line `a op b = c | left: ...` is correct iff a and b are in the current
multiset, `a op b = c` follows the rules, the `left:` multiset is the current one with a and b
replaced by c, and the target is still reachable from it. A `backtrack: left ...` line is correct
iff it restores a state seen earlier: the start or one left by a legal step (reachable or not).
Search traces are therefore labelled step by step: their dead-end steps are incorrect, their
backtracking lines correct. After any line that parses, the next step is checked against the
state that line claims, even if it was wrong (a claim with more numbers than the prompt leaves the
state unknown, so later steps are incorrect until a correct backtrack); a line that does not parse
is incorrect and leaves the state unchanged.

Difficulty 1..5: 3, 4, 4, 5, 6 numbers; numbers 1-9, 1-12, 1-25, four 1-12 and one of 25/50/75/100,
four 1-10 and two of 25/50/75/100; targets 10-99, 10-150, 20-250, 50-500, 100-999.
"""

from __future__ import annotations

import collections
import random
import re

from tasks.base import Problem, PromptCheckedTask, completion_steps, final_answer
from tasks.countdown_solver import answer_expression, pair_results, reachable, search_trace, solve, step_text
from tasks.expr import MAX_DIGITS, ExprError, apply_op, evaluate, leaves, parse, to_text

BIG_NUMBERS = (25, 50, 75, 100)
MAX_NUMBERS = 7  # problems with more numbers are refused: reachability checks would grow too slow
# difficulty -> (small numbers, largest small number, big numbers, smallest target, largest target)
LEVELS = {
    1: (3, 9, 0, 10, 99),
    2: (4, 12, 0, 10, 150),
    3: (4, 25, 0, 20, 250),
    4: (4, 12, 1, 50, 500),
    5: (4, 10, 2, 100, 999),
}
_PROMPT = re.compile(r"Numbers:[ \t]*([\d \t]+)\nTarget:[ \t]*(\d+)[ \t]*\n?", re.ASCII)
_STEP = re.compile(r"\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(\d+)\s*\|\s*left:?([\d\s]*)", re.ASCII)
_BACKTRACK = re.compile(r"\s*backtrack:\s*left:?([\d\s]*)", re.ASCII)


def _ints(texts: list[str]) -> tuple[int, ...] | None:
    """The integers, or None if one has too many digits to be a countdown number."""
    return None if any(len(t) > MAX_DIGITS for t in texts) else tuple(int(t) for t in texts)


def _legal(current: tuple[int, ...], a: int, op: str, b: int, c: int, left: tuple[int, ...]) -> bool:
    """Whether `a op b = c` is a rule-abiding move from `current` that leaves exactly `left`."""
    rest = collections.Counter(current)
    rest.subtract((a, b))
    if rest[a] < 0 or rest[b] < 0:
        return False
    try:
        if apply_op(op, a, b, positive=True) != c:
            return False
    except ExprError:
        return False
    rest[c] += 1
    return collections.Counter(left) == +rest


class Countdown(PromptCheckedTask):
    """Combine numbers with + - * / to reach a target."""

    name = "countdown"
    difficulties = (1, 2, 3, 4, 5)
    trace_styles = ("direct", "search")

    def _sample(self, rng: random.Random, difficulty: int) -> Problem:
        num_small, small_max, num_big, target_min, target_max = LEVELS[difficulty]
        for _ in range(1000):
            numbers = [rng.randint(1, small_max) for _ in range(num_small)]
            numbers += rng.sample(BIG_NUMBERS, num_big)
            rng.shuffle(numbers)
            target = self._random_target(rng, numbers)
            one_step = {r[-1] for i, a in enumerate(numbers) for b in numbers[i + 1 :] for r in pair_results(a, b)}
            if target_min <= target <= target_max and target not in numbers and target not in one_step:
                prompt = f"Numbers: {' '.join(map(str, numbers))}\nTarget: {target}\n"
                return Problem("", self.name, difficulty, "", prompt, (), "", {"numbers": numbers, "target": target})
        raise RuntimeError(f"countdown: no target in range for difficulty {difficulty}")  # pragma: no cover

    @staticmethod
    def _random_target(rng: random.Random, numbers: list[int]) -> int:
        """The result of combining random pairs with random legal operations (so the target is reachable)."""
        pool = list(numbers)
        combinations = len(pool) - 1 if len(pool) < 4 or rng.random() < 0.7 else len(pool) - 2
        for _ in range(combinations):
            i, j = rng.sample(range(len(pool)), 2)
            *_, result = rng.choice(pair_results(pool[i], pool[j]))
            pool = [result] + [x for k, x in enumerate(pool) if k not in (i, j)]
        return pool[0]

    def _complete(self, candidate: Problem, rng: random.Random, difficulty: int) -> Problem:
        numbers, target = self._numbers_target(candidate.prompt)
        path = solve(numbers, target)
        if path is None:  # pragma: no cover (targets are built from the numbers)
            raise RuntimeError(f"countdown: unsolvable {candidate.prompt!r}")
        steps = tuple(step_text(move, state) for move, state in path)
        answer = to_text(answer_expression(numbers, path))
        return Problem("", self.name, difficulty, "", candidate.prompt, steps, answer, candidate.meta)

    def canonical(self, problem: Problem) -> str:
        numbers, target = self._numbers_target(problem.prompt)
        return f"{' '.join(map(str, sorted(numbers)))}|{target}"

    def trace(self, problem: Problem, style: str = "direct") -> list[str]:
        """`direct`: the worked steps; `search`: the depth-first search written out (same final answer)."""
        if style == "search":
            return search_trace(*self._numbers_target(problem.prompt))
        return super().trace(problem, style)

    def check_steps(self, problem: Problem, completion: str) -> list[bool]:
        return self.check_steps_from_prompt(problem.prompt, completion)

    def prompt_error(self, prompt: str) -> str | None:
        try:
            self._numbers_target(prompt)
        except ValueError as err:
            return str(err)
        return None

    def score_from_prompt(self, prompt: str, completion: str) -> tuple[float, str]:
        try:
            numbers, target = self._numbers_target(prompt)
            answer = final_answer(completion)
            if answer is None:
                return 0.0, "no answer line"
            try:
                node = parse(answer, "+-*/")
            except ExprError as err:
                return 0.0, f"unparseable answer: {err}"
            available = collections.Counter(numbers)
            for number, uses in collections.Counter(leaves(node)).items():
                if uses > available[number]:
                    if available[number] == 0:
                        return 0.0, f"uses {number}, which is not available"
                    times = "twice" if uses == 2 else f"{uses} times"
                    return 0.0, f"uses {number} {times} (available {available[number]})"
            try:
                value = evaluate(node, positive=True)
            except ExprError as err:
                return 0.0, str(err)
            if value != target:
                return 0.0, f"value {value} != target {target}"
            return 1.0, "correct"
        except Exception as err:  # a verifier never raises: bad problem data scores 0 too
            return 0.0, f"verifier error: {err}"

    def check_steps_from_prompt(self, prompt: str, completion: str) -> list[bool]:
        lines = completion_steps(completion)
        try:
            numbers, target = self._numbers_target(prompt)
            current: tuple[int, ...] | None = numbers
            seen = {tuple(sorted(numbers))}
            memo: dict[tuple[int, ...], bool] = {}
            labels = []
            for line in lines:
                if step := _STEP.fullmatch(line):
                    values, left = _ints(list(step.group(1, 3, 4))), _ints(step.group(5).split())
                    if values is None or left is None:
                        labels.append(False)
                        continue
                    (a, b, c), op = values, step.group(2)
                    legal = current is not None and _legal(current, a, op, b, c, left)
                    labels.append(legal and reachable(left, target, memo))
                    if legal:
                        seen.add(tuple(sorted(left)))
                elif back := _BACKTRACK.fullmatch(line):
                    left = _ints(back.group(1).split())
                    if left is None:
                        labels.append(False)
                        continue
                    labels.append(tuple(sorted(left)) in seen)
                else:
                    labels.append(False)
                    continue
                current = left if 0 < len(left) <= len(numbers) else None
            return labels
        except Exception:  # never raise on model output or bad problem data
            return [False] * len(lines)

    def answer_key(self, problem: Problem, answer: str) -> str:
        """`= <value>` for an expression that parses, keeps every intermediate a positive integer and uses
        only the prompt's numbers (so every correct expression votes for the target, whatever its form);
        any other answer is its own text."""
        try:
            numbers, _ = self._numbers_target(problem.prompt)
            node = parse(answer, "+-*/")
            if collections.Counter(leaves(node)) - collections.Counter(numbers):
                return answer.strip()  # uses a number the prompt does not offer
            return f"= {evaluate(node, positive=True)}"
        except Exception:  # never raise on model output or bad problem data: the text is its own vote
            return answer.strip()

    @staticmethod
    def _numbers_target(prompt: str) -> tuple[tuple[int, ...], int]:
        """The prompt's numbers and target; raises ValueError if the prompt is malformed."""
        match = _PROMPT.fullmatch(prompt) if isinstance(prompt, str) else None
        numbers = _ints(match.group(1).split()) if match else None
        if not match or not numbers or len(match.group(2)) > MAX_DIGITS:
            raise ValueError("countdown prompt is not 'Numbers: <n> <n> ...\\nTarget: <n>\\n'")
        if len(numbers) > MAX_NUMBERS or 0 in numbers:
            raise ValueError(f"countdown prompt needs 1 to {MAX_NUMBERS} positive numbers")
        return numbers, int(match.group(2))
