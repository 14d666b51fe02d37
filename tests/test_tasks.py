"""Reasoning tasks: deterministic generation, disjoint splits, worked solutions that verify, step
checkers on hand-written cases, fuzzed verifiers and step checkers, and problem files."""

from __future__ import annotations

import ast
import collections
import json
import os
import re
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks import TASKS, get_task, jsonl
from tasks.base import MAX_COMPLETION_CHARS, SPLITS, Problem, completion_steps, final_answer, solution_text, split_of
from tasks.countdown_solver import TRACE_MAX_LINES
from tasks.files import FIELDS, REQUIRED, ProblemFileError, iter_problem_lines, read_problems, write_problems

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ARITHMETIC, COUNTDOWN, SUDOKU = (get_task(name) for name in ("arithmetic", "countdown", "sudoku"))


def _problem(task: str, prompt: str, answer: str) -> Problem:
    return Problem(id="hand", task=task, difficulty=1, split="test", prompt=prompt, steps=(), answer=answer)


# ---------------------------------------------------------------- independent reference checks
# These use Python's own parser (ast.parse only builds a tree; nothing is evaluated), so they share no
# code with the tasks' parsers. They only ever see text the verifier already accepted, or our prompts.


def _ast_values(text: str) -> tuple[Fraction, list[Fraction], list[int]]:
    """(value, every intermediate result, the literals) of an integer expression with + - * /."""
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}
    ops[ast.Div] = lambda a, b: a / b
    intermediates, literals = [], []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            literals.append(-node.operand.value)
            return -Fraction(node.operand.value)
        assert isinstance(node, ast.BinOp) and type(node.op) in ops, ast.dump(node)
        value = ops[type(node.op)](walk(node.left), walk(node.right))
        intermediates.append(value)
        return value

    return walk(ast.parse(text.strip(), mode="eval").body), intermediates, literals


def _can_make(numbers: tuple[int, ...], target: int) -> bool:
    """Brute force: can `target` be made from some of `numbers` (positive integer intermediates)?"""
    if target in numbers:
        return True
    for i in range(len(numbers)):
        for j in range(len(numbers)):
            if i != j:
                a, b = numbers[i], numbers[j]
                rest = tuple(x for k, x in enumerate(numbers) if k not in (i, j))
                for value in (a + b, a * b, a - b, a // b if a % b == 0 else 0):
                    if value > 0 and _can_make((value,) + rest, target):
                        return True
    return False


def _numbers_target(problem: Problem) -> tuple[list[int], int]:
    numbers_line, target_line = problem.prompt.splitlines()
    return [int(x) for x in numbers_line.split(":")[1].split()], int(target_line.split(":")[1])


def _truly_correct(problem: Problem, answer: str) -> bool:
    """An answer's correctness, decided without the task's own parsers."""
    if problem.task == "arithmetic":
        truth, _, _ = _ast_values(problem.prompt.removeprefix("Compute: "))
        return re.fullmatch("-?[0-9]+", answer.strip()) is not None and int(answer) == truth
    if problem.task == "countdown":
        numbers, target = _numbers_target(problem)
        answer = re.sub("(?<![0-9])0+(?=[0-9])", "", answer)  # Python refuses leading zeros; they are harmless
        if not re.fullmatch(r"[0-9+\-*/() ]+", answer) or "**" in answer or "//" in answer:
            return False
        try:
            value, intermediates, literals = _ast_values(answer)
        except (SyntaxError, AssertionError, ZeroDivisionError):
            return False
        usage_ok = not collections.Counter(literals) - collections.Counter(numbers)
        return value == target and usage_ok and all(x.denominator == 1 and x > 0 for x in intermediates)
    return answer.strip() == problem.answer


def _sudoku_grids(problem: Problem) -> tuple[int, str, str]:
    """(size, givens as rows joined by '/', solution)."""
    _, *rows = problem.prompt.splitlines()
    return len(rows), "/".join(rows), problem.answer


# ---------------------------------------------------------------- registry and generation


def test_registry_names_known_tasks():
    assert set(TASKS) == {"arithmetic", "countdown", "sudoku"}
    assert all(get_task(name).name == name for name in TASKS)
    with pytest.raises(ValueError, match="known tasks: arithmetic, countdown, sudoku"):
        get_task("chess")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generation_is_deterministic(name):
    task = get_task(name)
    for difficulty in task.difficulties:
        first = task.generate(7, 3, difficulty, "validation")
        assert first == task.generate(7, 3, difficulty, "validation")
        assert first.id == f"{name}-d{difficulty}-validation-s7-3" and first.split == "validation"
        assert first.prompt.endswith("\n") and not first.prompt.endswith("\n\n")
        canonical = {task.canonical(task.generate(7, index, difficulty)) for index in range(40)}
        assert len(canonical) >= 36, (difficulty, len(canonical))
        assert task.canonical(task.generate(8, 3, difficulty)) != task.canonical(task.generate(7, 3, difficulty))
    with pytest.raises(ValueError, match="difficulty"):
        task.generate(0, 0, 99)
    with pytest.raises(ValueError, match="split"):
        task.generate(0, 0, 1, "dev")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_disjoint(name):
    task = get_task(name)
    by_split = {split: set() for split in SPLITS}
    for split, count in (("train", 10_000), ("validation", 300), ("test", 300)):
        for index in range(count):
            problem = task.generate(0, index, 1, split)
            assert problem.split == split and split_of(task.split_key(problem)) == split
            by_split[split].add(task.canonical(problem))
    assert not by_split["train"] & by_split["validation"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["validation"] & by_split["test"]
    assert all(len(canonical) > 20 for canonical in by_split.values())


def _mutated_answer(problem: Problem) -> str:
    if problem.task == "arithmetic":
        return str(int(problem.answer) + 1)
    if problem.task == "countdown":
        return f"({problem.answer}) + 1"
    rows = problem.answer.split("/")
    rows[0] = rows[0][1] + rows[0][0] + rows[0][2:]  # swap two cells: a column now repeats a digit
    return "/".join(rows)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_worked_solutions_verify_and_every_step_checks(name):
    task = get_task(name)
    for difficulty in task.difficulties:
        for index in range(12 if difficulty < 3 else 6):
            problem = task.generate(1, index, difficulty)
            assert task.check_problem(problem) is None
            assert problem.steps and "\n" not in "".join(problem.steps)
            for style in task.trace_styles:
                completion = solution_text(task.trace(problem, style), problem.answer)
                assert task.score(problem, completion) == (1.0, "correct"), (problem, style)
            direct = solution_text(problem.steps, problem.answer)
            assert task.check_steps(problem, direct) == [True] * len(problem.steps), problem
            score, reason = task.score(problem, solution_text(problem.steps, _mutated_answer(problem)))
            assert score == 0.0 and reason != "correct"


def test_arithmetic_problems_match_an_independent_evaluation():
    for difficulty in ARITHMETIC.difficulties:
        for index in range(50):
            problem = ARITHMETIC.generate(2, index, difficulty)
            expression = problem.prompt.removeprefix("Compute: ")
            value, intermediates, _ = _ast_values(expression)
            assert value == int(problem.answer)
            assert all(abs(x) <= 2000 for x in intermediates)
            assert [_ast_values(step)[0] for step in problem.steps] == [value] * len(problem.steps)
            assert len(problem.steps) == difficulty + 1  # one operation per step


def test_countdown_search_traces_explore_and_end_with_the_solution():
    saw_backtracking = False
    for difficulty in COUNTDOWN.difficulties:
        for index in range(15):
            problem = COUNTDOWN.generate(3, index, difficulty)
            numbers, target = _numbers_target(problem)
            if len(numbers) <= 4:
                assert _can_make(tuple(numbers), target)
            search = COUNTDOWN.trace(problem, "search")
            assert len(search) <= TRACE_MAX_LINES and search[-1] == problem.steps[-1]
            labels = COUNTDOWN.check_steps(problem, solution_text(search, problem.answer))
            assert labels[-1] and all(
                label for line, label in zip(search, labels, strict=True) if line.startswith("backtrack:")
            )
            saw_backtracking |= any(line.startswith("backtrack:") for line in search)
    assert saw_backtracking


# ---------------------------------------------------------------- hand-written step checker cases


@pytest.mark.parametrize(
    "steps, labels",
    [
        (["19 * 3 - 4", "57 - 4", "53"], [True, True, True]),
        (["19*3-4", "(57) - 4", " 53 "], [True, True, True]),  # spacing and redundant parentheses do not matter
        (["20 * 3 - 4"], [False]),  # wrong arithmetic
        (["57 - 4"], [False]),  # two operations in one step
        (["19 * 3 - 4", "let me think", "57 - 4"], [True, False, True]),  # unparseable: state unchanged
        (["20 * 3 - 4", "60 - 4", "56"], [False, False, False]),  # faithful rewrites of a wrong expression
        (["12 + 7 * 3 - 4"], [False]),  # dropped parentheses: not one operation
        (["53", "53"], [False, False]),
    ],
)
def test_arithmetic_step_checker(steps, labels):
    problem = _problem("arithmetic", "Compute: (12 + 7) * 3 - 4\n", "53")
    assert ARITHMETIC.check_steps(problem, solution_text(steps, "53")) == labels


def test_arithmetic_step_checker_accepts_any_single_operation_and_scores():
    problem = _problem("arithmetic", "Compute: 2 + 3 - 4 * 5\n", "-15")
    assert ARITHMETIC.check_steps(problem, "5 - 4 * 5\n5 - 20\n-15\nAnswer: -15") == [True] * 3
    assert ARITHMETIC.check_steps(problem, "2 + 3 - 20\n5 - 20\n-15\nAnswer: -15") == [True] * 3
    assert ARITHMETIC.score(problem, "Answer: -15") == (1.0, "correct")
    assert ARITHMETIC.score(problem, "-15") == (0.0, "no answer line")
    assert ARITHMETIC.score(problem, "Answer: 5 - 20") == (0.0, "unparseable answer")
    assert ARITHMETIC.score(problem, "Answer: -14")[0] == 0.0


@pytest.mark.parametrize(
    "steps, labels",
    [
        (["2 * 3 = 6 | left: 6 5", "6 * 5 = 30 | left: 30"], [True, True]),
        (["2 + 3 = 5 | left: 5 5"], [False]),  # right arithmetic, available numbers, target now unreachable
        (["2 * 3 = 7 | left: 7 5"], [False]),  # wrong arithmetic
        (["4 * 5 = 20 | left: 20 2 3"], [False]),  # 4 is not available
        (["3 * 3 = 9 | left: 9 2 5"], [False]),  # 3 is available once
        (["2 * 3 = 6 | left: 6 5 5"], [False]),  # wrong `left:` list
        (["3 / 2 = 1 | left: 1 5"], [False]),  # inexact division
        (["3 - 5 = 2 | left: 2 2"], [False]),  # negative intermediate
        (["5 * 3 = 15 | left: 2 15"], [True]),  # `left:` compared as a multiset
        (["2 + 3 = 5 | left: 5 5", "backtrack: left 2 3 5", "2 * 3 = 6 | left: 6 5"], [False, True, True]),
        (["backtrack: left 6 5"], [False]),  # never seen
        (["2 * 3 = 6 | left: 6 5", "hmm", "6 * 5 = 30 | left: 30"], [True, False, True]),
        (["2 + 3 = 6 | left: 6 5", "6 * 5 = 30 | left: 30"], [False, True]),  # checked against the claimed state
        (["2 + 3 = 6 | left: 6 5 9 9", "6 * 5 = 30 | left: 30 9 9"], [False, False]),  # claim too big: unknown
    ],
)
def test_countdown_step_checker(steps, labels):
    problem = _problem("countdown", "Numbers: 2 3 5\nTarget: 30\n", "2 * 3 * 5")
    assert COUNTDOWN.check_steps(problem, solution_text(steps, "2 * 3 * 5")) == labels


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("2 * 3 * 5", "correct"),
        ("(5 * (3 * 2))", "correct"),
        ("2 * 3 * 5 * 1", "uses 1, which is not available"),
        ("5 * 5 + 5", "uses 5 3 times (available 1)"),
        ("3 * 3 + 2", "uses 3 twice (available 1)"),
        ("(2 + 3) * 5", "value 25 != target 30"),
        ("5 * (2 - 3) + 35", "uses 35, which is not available"),
        ("5 / 2 * 3", "inexact division: 5 / 2"),
        ("5 * 3 * (3 - 2)", "uses 3 twice (available 1)"),
        ("2 ** 3", "unparseable answer: unexpected '*'"),
        ("", "unparseable answer: expected a number or '('"),
    ],
)
def test_countdown_verifier_reasons(answer, reason):
    problem = _problem("countdown", "Numbers: 2 3 5\nTarget: 30\n", "2 * 3 * 5")
    assert COUNTDOWN.score(problem, f"Answer: {answer}")[1] == reason


def test_countdown_verifier_rejects_non_positive_intermediates():
    problem = _problem("countdown", "Numbers: 2 3 5 7\nTarget: 4\n", "7 - 5 + 2")
    assert COUNTDOWN.score(problem, "Answer: 7 - 5 + 2") == (1.0, "correct")
    assert COUNTDOWN.score(problem, "Answer: 2 - 5 + 7")[1].startswith("non-positive intermediate")


SUDOKU_PROBLEM = _problem("sudoku", "Sudoku 4x4:\n12.4\n3.12\n2143\n4.21\n", "1234/3412/2143/4321")


@pytest.mark.parametrize(
    "steps, labels",
    [
        (["r1c3=3", "r2c2=4", "r4c2=3"], [True, True, True]),
        (["r1c3=3", "r1c3=3"], [True, False]),  # the cell is no longer empty
        (["r2c2=1", "r2c2=4"], [False, False]),  # wrong digit, then overwriting it
        (["r1c1=1"], [False]),  # a given
        (["r5c1=1", "r1c3=9", "r0c1=1", "fill r1c3"], [False] * 4),  # off the grid, digit out of range, junk
        ([" r4c2 = 3 "], [True]),
    ],
)
def test_sudoku_step_checker(steps, labels):
    assert SUDOKU.check_steps(SUDOKU_PROBLEM, solution_text(steps, "1234/3412/2143/4321")) == labels


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("1234/3412/2143/4321", "correct"),
        ("1234/3412/2143/432", "unparseable answer: expected 4 rows of 4 digits 1-4 joined by '/'"),
        ("1234/3412/2143/4325", "unparseable answer: expected 4 rows of 4 digits 1-4 joined by '/'"),
        ("2134/3412/2143/4321", "changes the given r1c1=1"),
        ("1243/3421/2134/4312", "changes the given r1c4=4"),
        ("1234/3412/2143/4311", "changes the given r4c3=2"),
    ],
)
def test_sudoku_verifier_reasons(answer, reason):
    assert SUDOKU.score(SUDOKU_PROBLEM, f"Answer: {answer}")[1] == reason


def test_sudoku_verifier_catches_repeats_away_from_givens():
    problem = _problem("sudoku", "Sudoku 4x4:\n....\n....\n....\n....\n", "1234/3412/2143/4321")
    assert SUDOKU.score(problem, "Answer: 1234/3412/2143/4321") == (1.0, "correct")
    assert SUDOKU.score(problem, "Answer: 1234/1234/3412/3412")[1] == "column 1 repeats 1"
    assert SUDOKU.score(problem, "Answer: 1234/2341/3412/4123")[1] == "box 1 repeats 2"


# ---------------------------------------------------------------- robustness on hostile text


@pytest.mark.parametrize("name", sorted(TASKS))
def test_verifiers_and_checkers_survive_hostile_text(name):
    task = get_task(name)
    problem = task.generate(0, 0, 1)
    hostile = [
        "Answer: " + "(" * 5000 + "1" + ")" * 5000,
        "Answer: 9**9**9",
        "Answer: " + "9" * 5000,
        "Answer: " + " * ".join(["999999"] * 100),
        "(" * 5000 + "\n" + "1 - " * 3000 + "1\n" + "r1c1=" + "9" * 100,
        "99999999999 * 9999999 = 1 | left: " + "9 " * 5000,
        "x" * (3 * MAX_COMPLETION_CHARS),
        "\x00\n\udcff\nAnswer: \u0663",
        "",
    ]
    for completion in hostile:
        score, reason = task.score(problem, completion)
        assert score == 0.0 and isinstance(reason, str)
        labels = task.check_steps(problem, completion)
        assert labels == [False] * len(completion_steps(completion))
    broken = Problem("b", name, 1, "test", "nonsense\n", (), "?")
    assert task.score(broken, solution_text(problem.steps, problem.answer))[0] == 0.0
    assert not any(task.check_steps(broken, solution_text(problem.steps, problem.answer)))
    assert task.check_problem(broken)


# ---------------------------------------------------------------- property-based fuzzing

FUZZ_PROBLEMS = {
    name: [get_task(name).generate(5, index, difficulty) for difficulty in (1, 2) for index in range(3)]
    for name in TASKS
}
junk_lines = st.text(max_size=60).map(lambda text: text.replace("\n", " "))


def _completion(lines: list[str], answer: str | None) -> str:
    return "\n".join(lines) + ("" if answer is None else f"\nAnswer: {answer}")


@pytest.mark.parametrize("name", sorted(TASKS))
@FUZZ
@given(data=st.data(), text=st.text(max_size=400))
def test_fuzz_arbitrary_text(name, data, text):
    task = get_task(name)
    problem = data.draw(st.sampled_from(FUZZ_PROBLEMS[name]))
    score, reason = task.score(problem, text)
    assert (score, reason) == (1.0, "correct") or (score == 0.0 and reason != "correct")
    assert score == (1.0 if final_answer(text) is not None and _truly_correct(problem, final_answer(text)) else 0.0)
    labels = task.check_steps(problem, text)
    assert len(labels) == len(completion_steps(text)) and all(isinstance(label, bool) for label in labels)


arithmetic_text = st.text(alphabet="0123456789+-*() ", max_size=30)


@FUZZ
@given(data=st.data(), answer=st.one_of(arithmetic_text, st.integers(-3000, 3000).map(str)))
def test_fuzz_arithmetic_accepts_only_the_true_value(data, answer):
    problem = data.draw(st.sampled_from(FUZZ_PROBLEMS["arithmetic"]))
    score, _ = ARITHMETIC.score(problem, f"Answer: {answer}")
    assert score == (1.0 if _truly_correct(problem, answer) else 0.0)


@FUZZ
@given(data=st.data())
def test_fuzz_arithmetic_steps_labelled_correct_keep_the_value(data):
    problem = data.draw(st.sampled_from(FUZZ_PROBLEMS["arithmetic"]))
    lines = data.draw(st.lists(st.one_of(st.sampled_from(problem.steps), arithmetic_text, junk_lines), max_size=8))
    completion = _completion(lines, None)
    labels = ARITHMETIC.check_steps(problem, completion)
    truth = int(problem.answer)
    for line, label in zip(completion_steps(completion), labels, strict=True):
        if label:
            assert _ast_values(line)[0] == truth


def _expressions(numbers: list[int]) -> st.SearchStrategy[str]:
    leaves = st.one_of(st.sampled_from(numbers), st.integers(0, 120)).map(str)
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.tuples(inner, st.sampled_from("+-*/"), inner).map(" ".join),
            inner.map(lambda text: f"({text})"),
        ),
        max_leaves=6,
    )


def _answer_variants(answer: str, numbers: list[int]) -> st.SearchStrategy[str]:
    """The right answer, reformatted or with one token replaced (sometimes another valid solution)."""
    tokens = re.findall(r"[0-9]+|\S", answer)

    def replace(position: int, token: str) -> str:
        return " ".join(tokens[:position] + [token] + tokens[position + 1 :])

    return st.one_of(
        st.sampled_from([answer, f"({answer})", answer.replace(" ", ""), f"  {answer} "]),
        st.builds(replace, st.integers(0, len(tokens) - 1), st.sampled_from([*"+-*/()", *map(str, numbers), "1"])),
    )


@FUZZ
@given(data=st.data())
def test_fuzz_countdown_accepts_only_valid_solutions(data):
    problem = data.draw(st.sampled_from(FUZZ_PROBLEMS["countdown"]))
    numbers, target = _numbers_target(problem)
    text = st.text(alphabet="0123456789+-*/() ", max_size=30)
    answer = data.draw(st.one_of(_expressions(numbers), text, _answer_variants(problem.answer, numbers)))
    score, reason = COUNTDOWN.score(problem, f"Answer: {answer}")
    assert score == (1.0 if _truly_correct(problem, answer) else 0.0), (answer, reason)
    if score == 1.0:  # the same facts, spelled out
        value, intermediates, literals = _ast_values(answer)
        assert value == target and not collections.Counter(literals) - collections.Counter(numbers)


@FUZZ
@given(data=st.data())
def test_fuzz_countdown_steps_labelled_correct_are_legal_and_on_track(data):
    problem = data.draw(st.sampled_from(FUZZ_PROBLEMS["countdown"]))
    numbers, target = _numbers_target(problem)
    small = st.sampled_from(numbers + [target, 1, 2, 7])
    step = st.tuples(small, st.sampled_from("+-*/"), small, small, st.lists(small, max_size=4)).map(
        lambda t: f"{t[0]} {t[1]} {t[2]} = {t[3]} | left: {' '.join(map(str, t[4]))}"
    )
    backtrack = st.lists(small, min_size=1, max_size=4).map(lambda xs: "backtrack: left " + " ".join(map(str, xs)))
    choices = st.one_of(st.sampled_from(list(problem.steps) + COUNTDOWN.trace(problem, "search")), step, backtrack)
    lines = data.draw(st.lists(st.one_of(choices, junk_lines), max_size=8))
    completion = _completion(lines, None)
    labels = COUNTDOWN.check_steps(problem, completion)
    for line, label in zip(completion_steps(completion), labels, strict=True):
        if label and "backtrack" not in line:
            a, b, c, *left = (int(x) for x in re.findall("[0-9]+", line))
            op = re.search(r"[-+*/]", line).group()
            value = {"+": a + b, "-": a - b, "*": a * b, "/": Fraction(a, b) if b else 0}[op]
            assert value == c and value > 0
            assert _can_make(tuple(left), target)


def _sudoku_answers(problem: Problem) -> st.SearchStrategy[str]:
    size, _, solution = _sudoku_grids(problem)
    cells = [c for c in solution if c != "/"]

    def perturb(changes: list[tuple[int, str]]) -> str:
        grid = list(cells)
        for cell, digit in changes:
            grid[cell % len(grid)] = digit
        return "/".join("".join(grid[r * size : (r + 1) * size]) for r in range(size))

    digits = "".join(str(d) for d in range(1, size + 1))
    return st.one_of(
        st.lists(st.tuples(st.integers(0, size * size - 1), st.sampled_from(digits)), max_size=3).map(perturb),
        st.text(alphabet=digits + "/.", max_size=2 * size * size),
    )


@FUZZ
@given(data=st.data())
def test_fuzz_sudoku_accepts_only_the_solution(data):
    problem = data.draw(st.sampled_from(FUZZ_PROBLEMS["sudoku"]))
    answer = data.draw(_sudoku_answers(problem))
    score, _ = SUDOKU.score(problem, f"Answer: {answer}")
    assert score == (1.0 if answer == problem.answer else 0.0)


@FUZZ
@given(data=st.data())
def test_fuzz_sudoku_steps_labelled_correct_match_the_solution(data):
    problem = data.draw(st.sampled_from(FUZZ_PROBLEMS["sudoku"]))
    size, givens, solution = _sudoku_grids(problem)
    cell = st.integers(0, size + 1)
    step = st.tuples(cell, cell, st.integers(0, size + 1)).map(lambda t: f"r{t[0]}c{t[1]}={t[2]}")
    lines = data.draw(st.lists(st.one_of(st.sampled_from(problem.steps), step, junk_lines), max_size=10))
    completion = _completion(lines, None)
    labels = SUDOKU.check_steps(problem, completion)
    filled = set()
    for line, label in zip(completion_steps(completion), labels, strict=True):
        if label:
            row, col, value = (
                int(x) for x in line.strip().replace("r", "").replace("c", " ").replace("=", " ").split()
            )
            index = (row - 1) * (size + 1) + col - 1  # rows joined by '/'
            assert givens[index] == "." and solution[index] == str(value) and (row, col) not in filled
            filled.add((row, col))


# ---------------------------------------------------------------- problem files


def _some_problems() -> list[Problem]:
    return [get_task(name).generate(0, index, 1 + index) for name in sorted(TASKS) for index in range(3)]


def test_problem_files_round_trip(tmp_path):
    path = tmp_path / "sub" / "problems.jsonl"
    problems = _some_problems()
    write_problems(path, problems)
    assert read_problems(path) == (problems, [])
    first = json.loads(path.read_text().splitlines()[0])
    assert list(first) == ["id", "task", "difficulty", "split", "prompt", "answer", "steps", "meta"]
    assert os.listdir(path.parent) == ["problems.jsonl"]  # no temporary file left behind


def test_writing_problems_is_atomic(tmp_path):
    path = tmp_path / "problems.jsonl"
    write_problems(path, _some_problems()[:2])
    before = path.read_text()

    def failing():
        yield _some_problems()[0]
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError):
        write_problems(path, failing())
    assert path.read_text() == before and os.listdir(tmp_path) == ["problems.jsonl"]


GOOD = {"id": "a1", "task": "arithmetic", "prompt": "Compute: 2 + 3 * 4\n", "answer": "14"}


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object, got list"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "answer"}), "missing key(s) answer"),
        (json.dumps(GOOD | {"id": 7}), "'id' must be a string, got int"),
        (json.dumps(GOOD | {"difficulty": "2"}), "'difficulty' must be an integer, got str"),
        (json.dumps(GOOD | {"difficulty": True}), "'difficulty' must be an integer, got bool"),
        (json.dumps(GOOD | {"steps": [1]}), "'steps' must be a list of strings"),
        (json.dumps(GOOD | {"split": "dev"}), "'split' must be one of train, validation, test"),
        (json.dumps(GOOD | {"task": "chess"}), "unknown task 'chess'; known tasks: arithmetic, countdown, sudoku"),
        (json.dumps(GOOD | {"promt": "typo"}), "unknown key(s) promt"),
        (json.dumps(GOOD | {"answer": "15"}), "answer '15' is not the expression's value 14"),
        (json.dumps(GOOD | {"task": "countdown"}), "countdown prompt is not"),
    ],
)
def test_malformed_problem_lines_are_named(tmp_path, bad_line, message):
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + bad_line + "\n" + json.dumps(GOOD | {"id": "a2"}) + "\n")
    with pytest.raises(ProblemFileError) as error:
        read_problems(path)
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)
    problems, bad = read_problems(path, skip_bad_lines=True)
    assert [p.id for p in problems] == ["a1", "a2"] and problems[0].difficulty == 0
    assert len(bad) == 1 and bad[0].startswith(f"{path}:3: ") and message in bad[0]
    assert ARITHMETIC.score(problems[0], "Answer: 14") == (1.0, "correct")


# ---------------------------------------------------------------- hostile problem lines (tasks/jsonl.py)


def _with(record_json: str, tail: str) -> bytes:
    """A record's JSON with `tail` (raw JSON text, e.g. `"meta": [...]`) added as its last member."""
    return (record_json[:-1] + ", " + tail + "}").encode()


_GOOD_JSON = json.dumps(GOOD)
DEEP = "[" * 3000 + "]" * 3000


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (_with(_GOOD_JSON, f'"meta": {{"x": {DEEP}}}'), "nested too deeply"),
        (DEEP.encode(), "nested too deeply"),
        (b'{"a": ' * 5000 + b"1" + b"}" * 5000, "nested too deeply"),
        (_with(_GOOD_JSON, '"meta": ' + "[" * (jsonl.MAX_DEPTH - 1) + "]" * (jsonl.MAX_DEPTH - 1)),
         "'meta' must be an object, got list"),  # depth MAX_DEPTH is parsed (and then judged on its type)
        (bytes(range(256)).replace(b"\n", b""), "not valid UTF-8"),
        (b"\x00" * 64, "invalid JSON"),
        (_GOOD_JSON.replace("a1", "a\x00").encode(), "invalid JSON: Invalid control character"),
        (_GOOD_JSON.replace("a1", "a\xff").encode("latin-1"), "not valid UTF-8"),
        (_GOOD_JSON.encode().replace(b"a1", b"a\xed\xa0\x80"), "not valid UTF-8"),  # a surrogate in UTF-8 form
        (_GOOD_JSON.replace("a1", "a\\ud800").encode(), "lone surrogate"),
        (_with(_GOOD_JSON, '"meta": {"x": NaN}'), "NaN is not standard JSON"),
        (_with(_GOOD_JSON, '"meta": {"x": -Infinity}'), "-Infinity is not standard JSON"),
        (_with(_GOOD_JSON, '"meta": {"x": 1e400}'), "number 1e400 is out of range"),
        (_with(_GOOD_JSON, '"difficulty": ' + "9" * 5000), "digits"),
        (_with(_GOOD_JSON, '"answer": "15"'), "duplicate key 'answer'"),
        (b'"just a string"', "expected a JSON object, got str"),
        (b"42", "expected a JSON object, got int"),
        (b"null", "expected a JSON object, got NoneType"),
        (json.dumps(GOOD | {"prompt": None}).encode(), "'prompt' must be a string, got NoneType"),
        (json.dumps(GOOD | {"answer": 14}).encode(), "'answer' must be a string, got int"),
        (json.dumps(GOOD | {"meta": [1]}).encode(), "'meta' must be an object, got list"),
        (json.dumps(GOOD | {"steps": "2 + 12"}).encode(), "'steps' must be a list of strings, got str"),
        (json.dumps(GOOD | {"difficulty": 1.5}).encode(), "'difficulty' must be an integer, got float"),
    ],
)
def test_hostile_problem_lines_are_named_and_skipped(tmp_path, bad_line, message):
    path = tmp_path / "problems.jsonl"
    path.write_bytes(b"\n".join([_GOOD_JSON.encode(), b"", bad_line, json.dumps(GOOD | {"id": "a2"}).encode()]))
    with pytest.raises(ProblemFileError) as error:
        read_problems(path)
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)
    problems, bad = read_problems(path, skip_bad_lines=True)
    assert [p.id for p in problems] == ["a1", "a2"]
    assert len(bad) == 1 and bad[0].startswith(f"{path}:3: ") and message in bad[0]
    assert len(bad[0]) <= len(f"{path}:3: ") + jsonl.MAX_REASON_CHARS and "\n" not in bad[0]


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path):
    path = tmp_path / "problems.jsonl"
    record = GOOD | {"meta": {"note": "[{" * 5000 + '\\"]'}, "steps": ["[" * 100]}
    path.write_text(json.dumps(record) + "\n")
    (problem,), bad = read_problems(path)
    assert bad == [] and problem.meta == record["meta"] and problem.steps == tuple(record["steps"])


def test_reports_stay_one_short_line_whatever_the_line_held(tmp_path):
    path = tmp_path / "problems.jsonl"
    lines = [json.dumps(GOOD | {"task": "x" * 100_000}), json.dumps(GOOD | {"\x1b[31mred\nkey": 1})]
    path.write_text("\n".join(lines) + "\n")
    _, bad = read_problems(path, skip_bad_lines=True)
    assert [report.split(": ")[0] for report in bad] == [f"{path}:1", f"{path}:2"]
    assert "unknown task 'xxx" in bad[0] and bad[0].endswith("...")
    assert all(len(report) <= len(f"{path}:1: ") + jsonl.MAX_REASON_CHARS for report in bad)
    assert "\\x1b[31mred\\x0akey" in bad[1] and not any(c in bad[1] for c in "\x1b\n")


def _padded(size: int) -> bytes:
    """GOOD as one line of exactly `size` bytes (its meta holds the padding)."""
    line = _with(_GOOD_JSON, '"meta": {"pad": ""}')
    return line.replace(b'"pad": ""', b'"pad": "' + b"p" * (size - len(line)) + b'"')


def test_over_long_lines_are_read_in_bounded_chunks_and_skipped(tmp_path):
    import tracemalloc

    cap = jsonl.MAX_LINE_BYTES
    path = tmp_path / "problems.jsonl"
    path.write_bytes(_padded(cap) + b"\n" + _padded(cap + 1) + b"\n")  # exactly the cap, then one byte over
    problems, bad = read_problems(path, skip_bad_lines=True)
    assert len(problems) == 1 and len(problems[0].meta["pad"]) > cap // 2
    assert bad == [f"{path}:2: line longer than {cap} bytes"]

    with open(path, "wb") as f:
        f.write(_GOOD_JSON.encode() + b"\n")
        f.write(b"[" * (16 * cap) + b"\n")  # 16 MiB of nesting
        f.write(_GOOD_JSON.encode() + b"\n")
        f.write(b"\xff" * (3 * cap))  # an over-long last line without a newline
    tracemalloc.start()
    try:
        problems, bad = read_problems(path, skip_bad_lines=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [p.id for p in problems] == ["a1", "a1"]
    assert bad == [f"{path}:{n}: line longer than {cap} bytes" for n in (2, 4)]
    assert peak < 3 * cap  # a line is read at most MAX_LINE_BYTES at a time: the 16 MiB were never held


def test_a_file_that_is_not_there_still_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_problems(tmp_path / "missing.jsonl", skip_bad_lines=True)


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _blank(line: bytes) -> bool:
    """Whether the reader skips this line silently (it decodes, to whitespace only)."""
    return _utf8(line) and not line.decode("utf-8").strip()


def _splice(line: bytes, insert: bytes, fraction: float) -> bytes:
    at = int(fraction * len(line))
    return line[:at] + insert.replace(b"\n", b"") + line[at:]


FUZZ_LINES = [(problem, json.dumps({key: getattr(problem, key) for key in FIELDS} | {"steps": list(problem.steps)},
                                   ensure_ascii=False).encode()) for problem in _some_problems()]
FUZZ_CAP = 2 * max(len(line) for _, line in FUZZ_LINES)  # the line cap while fuzzing, so long lines stay cheap
_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
_wrong_types = st.one_of(  # GOOD with one field of a type it must not have
    st.tuples(st.sampled_from(REQUIRED), _values.filter(lambda value: not isinstance(value, str))),
    st.tuples(st.just("difficulty"), _values.filter(lambda value: type(value) is not int)),
    st.tuples(st.just("steps"), _values.filter(lambda v: type(v) is not list or any(type(s) is not str for s in v))),
    st.tuples(st.just("meta"), _values.filter(lambda value: not isinstance(value, dict))),
    st.tuples(st.just("split"), _values.filter(lambda value: value not in SPLITS)),
).map(lambda pair: json.dumps(GOOD | dict([pair])).encode())
_bad_lines = st.one_of(  # lines that can never be a problem
    st.integers(jsonl.MAX_DEPTH, 600).map(lambda depth: _with(_GOOD_JSON, '"meta": ' + "[" * depth + "]" * depth)),
    st.integers(FUZZ_CAP + 1, 4 * FUZZ_CAP).map(lambda size: b"{" * size),
    st.binary(min_size=1, max_size=4).filter(lambda b: not _utf8(b)).map(
        lambda b: _GOOD_JSON.encode().replace(b"a1", b"a" + b.replace(b"\n", b"\xff"))),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999"]).map(
        lambda constant: _with(_GOOD_JSON, f'"meta": {{"x": {constant}}}')),
    st.sampled_from(REQUIRED).map(lambda key: _with(_GOOD_JSON, f'"{key}": "again"')),
    _values.filter(lambda value: not isinstance(value, dict)).map(lambda value: json.dumps(value).encode()),
    _wrong_types,
)
_lines = st.one_of(
    st.sampled_from(FUZZ_LINES).map(lambda pair: ("good", pair)),
    st.binary(max_size=300).map(lambda b: ("junk", b.replace(b"\n", b""))),  # bad unless blank
    _bad_lines.map(lambda line: ("bad", line)),
    st.builds(_splice, st.sampled_from([line for _, line in FUZZ_LINES]), st.binary(min_size=1, max_size=6),
              st.floats(0, 1)).map(lambda line: ("either", line)),  # a good line with bytes spliced in
)


@FUZZ
@given(lines=st.lists(_lines, max_size=12), crlf=st.booleans(), last_newline=st.booleans())
def test_fuzz_problem_files_of_arbitrary_lines(lines, crlf, last_newline):
    """Good lines come back as their problems, other non-blank lines are reported by number, nothing raises."""
    import tempfile

    raw = [line[1] if kind == "good" else line for kind, line in lines]
    ending = b"\r\n" if crlf else b"\n"
    with tempfile.TemporaryDirectory() as directory, pytest.MonkeyPatch.context() as patch:
        patch.setattr(jsonl, "MAX_LINE_BYTES", FUZZ_CAP)
        path = os.path.join(directory, "problems.jsonl")
        with open(path, "wb") as f:
            f.write(ending.join(raw) + (ending if last_newline else b""))
        results = list(iter_problem_lines(path))
        assert read_problems(path, skip_bad_lines=True) == (
            [p for _, p in results if isinstance(p, Problem)], [p for _, p in results if isinstance(p, str)])
    by_number = dict(results)
    assert len(by_number) == len(results)  # one result per line
    for number, (kind, line) in enumerate(lines, start=1):
        got = by_number.pop(number, None)
        if kind == "good":
            assert got == line[0]
        elif kind != "bad" and _blank(line):
            assert got is None
        elif kind == "either":
            assert isinstance(got, Problem) or got.startswith(f"{path}:{number}: ")
        else:
            assert isinstance(got, str) and got.startswith(f"{path}:{number}: "), (kind, line[:200], got)
    assert by_number == {}  # nothing under a number no line has
