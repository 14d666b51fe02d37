"""Arithmetic: evaluate an integer expression with +, -, * and parentheses, one operation per step.

    Compute: (12 + 7) * 3 - 4        <- prompt
    19 * 3 - 4                       <- each step rewrites the whole expression
    57 - 4                              with exactly one operation done
    53
    Answer: 53

The worked steps always do the leftmost operation whose operands are both numbers (which
respects precedence and parentheses: that is left-to-right evaluation). Negative values are
written `-5` wherever they appear (`3 - -5` is three minus negative five).

Step checker (lenient about order): a step is correct iff it parses and its expression tree is
the previous line's tree with exactly one ready operation (both operands numbers) done
correctly, whichever one, and its value is still the true value. The previous line is the
prompt's expression for step 1. An incorrect step that parses becomes the previous line for
the next step (so a correct rewrite of a wrong expression is still wrong: its value is off);
a line that does not parse is incorrect and leaves the previous line unchanged.

No prompt-only checking (`search.scorer=checker` refuses arithmetic): the verifier and the step
checker compare against the expression's value, and computing that from the prompt is solving the
problem, so a "verifier" would be no easier than the task; they read the reference answer instead.

Difficulty 1..5: 2, 3, 4, 5, 6 operations; numbers 1-9, 1-9, 1-20, 10-99, 10-99; every
intermediate value stays within +-100, 100, 500, 1000, 2000 (a product that would not gets a
one-digit right operand, or becomes a sum or difference).
"""

from __future__ import annotations

import random
import re

from tasks.base import Problem, Task, completion_steps, final_answer
from tasks.expr import ExprError, Node, Op, apply_op, evaluate, parse, to_text

PROMPT_PREFIX = "Compute: "
# difficulty -> (operations, smallest number, largest number, bound on |intermediate values|)
LEVELS = {1: (2, 1, 9, 100), 2: (3, 1, 9, 100), 3: (4, 1, 20, 500), 4: (5, 10, 99, 1000), 5: (6, 10, 99, 2000)}
_INTEGER = re.compile(r"(-?)0*(\d{1,13})", re.ASCII)  # sign, digits without leading zeros


def rewrites(node: Node) -> list[Node]:
    """Every tree obtained from `node` by doing exactly one ready operation, in text order."""
    if isinstance(node, int):
        return []
    if isinstance(node.left, int) and isinstance(node.right, int):
        try:
            return [apply_op(node.op, node.left, node.right)]
        except ExprError:
            return []
    return [Op(node.op, left, node.right) for left in rewrites(node.left)] + [
        Op(node.op, node.left, right) for right in rewrites(node.right)
    ]


def _random_tree(rng: random.Random, num_ops: int, low: int, high: int, bound: int) -> tuple[Node, int]:
    """A random expression tree with `num_ops` operations and its value; intermediates stay within bound."""
    if num_ops == 0:
        value = rng.randint(low, high)
        return value, value
    num_left = rng.randrange(num_ops)
    left, left_value = _random_tree(rng, num_left, low, high, bound)
    right, right_value = _random_tree(rng, num_ops - 1 - num_left, low, high, bound)
    draw = rng.random()
    order = "*+-" if draw < 0.3 else ("+-*" if draw < 0.65 else "-+*")
    if order[0] == "*" and abs(left_value * right_value) > bound and isinstance(right, int):
        right = right_value = rng.randint(2, 9)  # a one-digit multiplier keeps products of big numbers modest
    for op in order:  # the drawn op, else the first alternative that stays within bound (+ or - always does)
        value = apply_op(op, left_value, right_value)
        if abs(value) <= bound:
            return Op(op, left, right), value
    raise AssertionError("unreachable: |l + r| or |l - r| is within bound")  # pragma: no cover


class Arithmetic(Task):
    """Evaluate an integer expression step by step."""

    name = "arithmetic"
    difficulties = (1, 2, 3, 4, 5)

    def _sample(self, rng: random.Random, difficulty: int) -> Problem:
        num_ops, low, high, bound = LEVELS[difficulty]
        tree, value = _random_tree(rng, num_ops, low, high, bound)
        steps, node = [], tree
        while isinstance(node, Op):
            node = rewrites(node)[0]
            steps.append(to_text(node))
        return Problem(
            id="",
            task=self.name,
            difficulty=difficulty,
            split="",
            prompt=f"{PROMPT_PREFIX}{to_text(tree)}\n",
            steps=tuple(steps),
            answer=str(value),
            meta={"operations": num_ops, "value": value},
        )

    def canonical(self, problem: Problem) -> str:
        return to_text(self._expression(problem))

    def check_problem(self, problem: Problem) -> str | None:
        try:
            value = evaluate(self._expression(problem))
        except (ExprError, ValueError) as err:
            return f"arithmetic prompt is not 'Compute: <expression>': {err}"
        if problem.answer != str(value):
            return f"answer {problem.answer!r} is not the expression's value {value}"
        return None

    def score(self, problem: Problem, completion: str) -> tuple[float, str]:
        try:
            answer = final_answer(completion)
            if answer is None:
                return 0.0, "no answer line"
            if not _INTEGER.fullmatch(answer):
                return 0.0, "unparseable answer"
            if int(answer) != int(problem.answer):
                return 0.0, f"wrong answer {answer}"
            return 1.0, "correct"
        except Exception as err:  # a verifier never raises: bad problem data scores 0 too
            return 0.0, f"verifier error: {err}"

    def check_steps(self, problem: Problem, completion: str) -> list[bool]:
        lines = completion_steps(completion)
        try:
            previous = self._expression(problem)
            truth = int(problem.answer)
            labels = []
            for line in lines:
                try:
                    node = parse(line, "+-*", negative_literals=True)
                    labels.append(node in rewrites(previous) and evaluate(node) == truth)
                except ExprError:
                    labels.append(False)
                    continue
                previous = node
            return labels
        except Exception:  # never raise on model output or bad problem data
            return [False] * len(lines)

    def prompt_error(self, prompt: str) -> str | None:
        return (f"{self.name}: no prompt-only checking: its verifier and step checker need the expression's value "
                "(the reference answer), and computing that from the prompt is solving the problem")

    def answer_key(self, problem: Problem, answer: str) -> str:
        """The integer an answer the verifier reads as one names ("053" and "53" agree); else the text."""
        text = answer.strip()
        match = _INTEGER.fullmatch(text)
        return str(int(match.group(1) + match.group(2))) if match else text

    def _expression(self, problem: Problem) -> Node:
        """The prompt's expression tree; raises ValueError/ExprError if the prompt is malformed."""
        if not problem.prompt.startswith(PROMPT_PREFIX):
            raise ValueError(f"prompt does not start with {PROMPT_PREFIX!r}")
        return parse(problem.prompt[len(PROMPT_PREFIX) :], "+-*", negative_literals=True)
