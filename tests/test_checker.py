"""The prompt-only verifier: tasks' checks from the prompt alone, and `search.scorer=checker` built on them.

Countdown's and sudoku's prompt-only checks must equal the reference-based `score`/`check_steps`
on generated problems (unique answers); arithmetic refuses; the scorer never reads a reference.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from test_search_cli import SIZES, compile_cache, ponder_search, run_dir  # noqa: F401 (fixtures: a tiny checkpoint)

from search.export import ArtifactError, export_search
from search.sampler import PAD_ID
from search.scorers import CheckerScorer, OracleScorer, make_scorer
from search.spec import SearchSpec
from search.state import Models
from tasks import get_task
from tasks.base import ANSWER_PREFIX, solution_text
from tasks.files import write_problems
from tools import cli
from train.data import get_vocabulary


def _corrupted(steps: list[str], answer: str, rng: random.Random) -> str:
    """A completion with a digit changed in one step, maybe a repeated step, maybe a wrong answer."""
    steps = list(steps)
    k = rng.randrange(len(steps))
    steps[k] = steps[k].replace(str(rng.randint(1, 9)), str(rng.randint(1, 9)), 1)
    if rng.random() < 0.5:
        steps.insert(rng.randrange(len(steps) + 1), steps[rng.randrange(len(steps))])
    return solution_text(steps, answer if rng.random() < 0.5 else answer.replace("1", "2", 1))


@pytest.mark.parametrize("name", ["countdown", "sudoku"])
def test_prompt_only_checks_equal_the_reference_checks_on_generated_problems(name):
    task = get_task(name)
    rng = random.Random(0)
    wrong_steps = wrong_answers = 0
    for difficulty in task.difficulties:
        for index in range(8):
            problem = task.generate(3, index, difficulty, "test")
            assert task.prompt_error(problem.prompt) is None
            for style in task.trace_styles:
                right = solution_text(task.trace(problem, style), problem.answer)
                assert task.score_from_prompt(problem.prompt, right) == (1.0, "correct")
                if style == "direct":
                    assert all(task.check_steps_from_prompt(problem.prompt, right))
                completions = [right] + [_corrupted(task.trace(problem, style), problem.answer, rng) for _ in range(4)]
                for completion in completions:
                    score, labels = task.score(problem, completion), task.check_steps(problem, completion)
                    assert task.score_from_prompt(problem.prompt, completion) == score
                    assert task.check_steps_from_prompt(problem.prompt, completion) == labels
                    wrong_answers += score[0] == 0.0
                    wrong_steps += not all(labels)
    assert wrong_answers > 10 and wrong_steps > 10  # the corruptions were caught, not just passed through


def test_countdown_accepts_any_legal_answer_and_checks_steps_from_the_prompt():
    task = get_task("countdown")
    prompt = "Numbers: 3 5 7\nTarget: 15\n"
    for answer in ("3 * 5", "3 + 5 + 7", "(7 + 3) + 5"):
        assert task.score_from_prompt(prompt, f"Answer: {answer}") == (1.0, "correct")
    assert task.score_from_prompt(prompt, "Answer: 3 * 5 * 1")[0] == 0.0  # 1 is not offered
    assert task.score_from_prompt(prompt, "Answer: 7 + 7 + 1")[0] == 0.0
    steps = "3 + 5 = 8 | left: 8 7\n8 + 7 = 15 | left: 15\n3 * 7 = 21 | left: 21 5\nbacktrack: left 3 5 7\n"
    assert task.check_steps_from_prompt(prompt, steps + "Answer: 3 + 5 + 7") == [True, True, False, True]


def test_sudoku_steps_from_the_givens_alone():
    task = get_task("sudoku")
    empty = "Sudoku 4x4:\n....\n....\n....\n....\n"  # many solutions: any digit some solution keeps is right
    steps = ["r1c1=1", "r1c2=1", "r1c3=2", "r2c1=1", "r2c2=3", "r1c2=4"]  # r1c2 holds the wrong 1: not empty
    assert task.check_steps_from_prompt(empty, "\n".join(steps)) == [True, False, True, False, True, False]
    clash = "Sudoku 4x4:\n11..\n....\n....\n....\n"  # no solution: every step is wrong, no answer verifies
    assert task.check_steps_from_prompt(clash, "r1c3=3\nr1c4=4") == [False, False]
    assert task.score_from_prompt(clash, "Answer: 1234/3412/2143/4321")[0] == 0.0
    problem = task.generate(0, 0, 2, "test")
    assert task.score_from_prompt(problem.prompt, f"Answer: {problem.answer}") == (1.0, "correct")


@pytest.mark.parametrize("name,prompt", [("countdown", "Numbers: 3 x 7\nTarget: 15\n"), ("countdown", None),
                                         ("sudoku", "Sudoku 5x5:\n.....\n"), ("sudoku", None)])
def test_a_malformed_prompt_is_named_and_never_raises(name, prompt):
    task = get_task(name)
    assert f"{name} prompt is not" in task.prompt_error(prompt)
    score, reason = task.score_from_prompt(prompt, "r1c1=1\nAnswer: 3 * 5")
    assert score == 0.0 and "verifier error" in reason
    assert task.check_steps_from_prompt(prompt, "r1c1=1\n3 * 5 = 15 | left: 15\nAnswer: 3 * 5") == [False, False]


def test_arithmetic_has_no_prompt_only_checks():
    task = get_task("arithmetic")
    problem = task.generate(0, 0, 1, "test")
    assert not task.checks_from_prompt
    assert "arithmetic: no prompt-only checking" in task.prompt_error(problem.prompt)
    with pytest.raises(ValueError, match="computing that from the prompt is solving the problem"):
        task.score_from_prompt(problem.prompt, f"Answer: {problem.answer}")
    with pytest.raises(ValueError, match="arithmetic"):
        task.check_steps_from_prompt(problem.prompt, "")


@pytest.fixture(scope="module")
def vocab():
    return get_vocabulary("byte")


def _chain_rows(vocab, chains: list[list[str]], width: int = 64):
    """`_host_score`'s arrays scoring every line of each chain as the newest step after the lines before it.

    Returns (rows' chain index, tree_index [R], path [R, D, S], path_len [R, D], tokens [R, S], num [R], active [R]).
    """
    rows = [(c, k) for c, lines in enumerate(chains) for k in range(len(lines))]
    depth = max(len(lines) for lines in chains)
    path = np.full((len(rows), depth, width), PAD_ID, np.int32)
    path_len = np.zeros((len(rows), depth), np.int32)
    tokens = np.full((len(rows), width), PAD_ID, np.int32)
    num = np.zeros(len(rows), np.int32)
    for r, (c, k) in enumerate(rows):
        for d, line in enumerate(chains[c][:k]):
            ids = vocab.encode(line + "\n")
            path[r, d, : len(ids)], path_len[r, d] = ids, len(ids)
        ids = vocab.encode(chains[c][k] + ("" if chains[c][k].startswith(ANSWER_PREFIX) else "\n"))
        tokens[r, : len(ids)], num[r] = ids, len(ids)
    tree_index = np.array([c for c, _ in rows], np.int32)
    return tree_index, path, path_len, tokens, num, np.ones(len(rows), bool)


def _chains(task, problems, seed: int = 0) -> list[list[str]]:
    """One chain per problem: the worked steps, corrupted for every other problem."""
    rng = random.Random(seed)
    chains = []
    for i, problem in enumerate(problems):
        text = solution_text(task.trace(problem), problem.answer)
        chains.append((text if i % 2 else _corrupted(task.trace(problem), problem.answer, rng)).split("\n"))
    return chains


@pytest.mark.parametrize("name", ["countdown", "sudoku"])
def test_the_checker_scores_as_the_oracle_does_from_prompts_alone(vocab, name):
    task = get_task(name)
    problems = [task.generate(0, i, 2, "test") for i in range(6)]
    arrays = _chain_rows(vocab, _chains(task, problems))
    oracle, checker = OracleScorer(vocab), make_scorer("checker", vocab=vocab)
    assert isinstance(checker, CheckerScorer) and checker.host_callback and not checker.oracle
    oracle.bind(problems)
    checker.bind(problems)
    assert checker.prompts == [(p.task, p.prompt) for p in problems]  # all it keeps of a problem
    scores = checker._host_score(*arrays)
    np.testing.assert_array_equal(scores, oracle._host_score(*arrays))
    assert 0 < scores.mean() < 1


def test_the_checker_never_reads_a_reference(vocab):
    """Answers, steps and meta replaced by garbage: the checker's scores do not move, the oracle's do."""
    task = get_task("sudoku")  # its reference step checker reads the stored solution
    problems = [task.generate(0, i, 2, "test") for i in range(6)]
    garbage = [dataclasses.replace(p, answer="4321/1234/garbage", steps=("r9c9=9",), meta={}) for p in problems]
    arrays = _chain_rows(vocab, _chains(task, problems))
    checker, oracle = CheckerScorer(vocab), OracleScorer(vocab)
    checker.bind(problems)
    truth = checker._host_score(*arrays)
    checker.bind(garbage)
    np.testing.assert_array_equal(checker._host_score(*arrays), truth)
    oracle.bind(garbage)
    assert (oracle._host_score(*arrays) != truth).any()


def test_the_checker_refuses_arithmetic_and_malformed_prompts(vocab):
    checker = CheckerScorer(vocab)
    countdown = get_task("countdown").generate(0, 0, 1, "test")
    arithmetic = get_task("arithmetic").generate(0, 0, 1, "test")
    with pytest.raises(ValueError, match=r"search.scorer=checker .* cannot score arithmetic problem "
                                         r"arithmetic-d1-test-s0-0: arithmetic: no prompt-only checking"):
        checker.bind([countdown, arithmetic])
    broken = dataclasses.replace(countdown, prompt="Numbers: 3\n")
    with pytest.raises(ValueError, match="countdown prompt is not"):
        checker.check_problems([broken])
    make_scorer("logprob").check_problems([arithmetic])  # other scorers take any problem


def test_ponder_search_refuses_the_checker_on_arithmetic_before_searching(run_dir, tmp_path, capsys):  # noqa: F811
    problems = tmp_path / "problems.jsonl"
    write_problems(problems, [get_task("countdown").generate(0, 0, 1, "test"),
                              get_task("arithmetic").generate(0, 0, 1, "test")])
    with pytest.raises(SystemExit) as exit_:
        cli.main(["search", "--checkpoint", str(run_dir), "--problems", str(problems), "--out",
                  str(tmp_path / "out.jsonl"), "--no-progress", "search.scorer=checker"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "ponder search: error: search.scorer=checker (a prompt-only verifier) cannot score arithmetic" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_ponder_search_with_the_checker_on_countdown(run_dir, compile_cache, tmp_path):  # noqa: F811
    """The live search binds each batch's prompts; the summary names the checker, never ORACLE."""
    path, out = tmp_path / "problems.jsonl", tmp_path / "results.jsonl"
    write_problems(path, [get_task("countdown").generate(0, index, 1, "test") for index in range(2)])
    result = ponder_search(compile_cache, "--checkpoint", str(run_dir), "--problems", str(path), "--out", str(out),
                           "--strategy", "beam", "search.n=2", "search.m=2", "search.scorer=checker", *SIZES)
    assert result.returncode == 0, result.stderr
    assert "scorer checker (prompt-only verifier)" in result.stdout
    assert "ORACLE" not in result.stdout + result.stderr
    assert len(out.read_text().splitlines()) == 2


def test_the_checker_cannot_be_exported(vocab):
    models = Models(None, None, CheckerScorer(vocab))  # refused before the model is looked at
    with pytest.raises(ArtifactError, match=r"the checker scorer cannot be exported: .* host callback"):
        export_search(SearchSpec(strategy="beam"), models, None, None, None, 1, [32], ["cpu"], {})


def test_rl_search_distillation_refuses_the_checker_on_an_arithmetic_mixture(vocab):
    from configs.load import load_config
    from train.rl_search import SearchDistiller

    cfg = load_config("configs/models/tiny.yaml", ["search.scorer=checker", "data.mixture={countdown_d1_direct: 1.0, "
                                                   "arithmetic_d1_direct: 1.0}"])
    with pytest.raises(ValueError, match="search.scorer=checker .* cannot score the data.mixture task arithmetic"):
        SearchDistiller(cfg, None, vocab, None)  # refused before the mesh or the model is looked at
