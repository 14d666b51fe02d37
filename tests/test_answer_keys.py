"""One vote everywhere: `ponder search`, reward-model evaluation and RL search distillation count answers
by the task's `answer_key`, so `3 + 4` and `4 + 3` to a countdown problem are one answer in all three."""

from __future__ import annotations

import numpy as np
import pytest

from configs.load import load_config
from search.candidates import Candidate, choose, pick_answer
from search.runner import Searched, search_record
from search.scaling import Row, row_records
from search.spec import SearchSpec
from tasks import get_task
from tasks.base import Problem
from train.data import get_vocabulary
from train.reward import RecordScores, evaluate
from train.reward_data import RewardRecord
from train.rl_search import verified_chains

# Target 7 from 3, 4, 10: `3 + 4` and `4 + 3` are right; `10` is wrong, scored highest, and below the two together.
COUNTDOWN = Problem("countdown-votes", "countdown", 3, "test", "Numbers: 3 4 10\nTarget: 7\n", (), "3 + 4")
CHAINS = [("Answer: 3 + 4", 0.30), ("Answer: 4 + 3", 0.31), ("Answer: 10", 0.50)]


def _candidates() -> list[Candidate]:
    return [Candidate(i + 1, text, text.removeprefix("Answer: "), score, -1.0, True)
            for i, (text, score) in enumerate(CHAINS)]


def test_task_answer_keys():
    countdown = get_task("countdown").generate(0, 0, 3, "test")
    numbers, target = countdown.meta["numbers"], countdown.meta["target"]
    key = get_task("countdown").answer_key
    assert key(countdown, countdown.answer) == f"= {target}"
    assert key(countdown, f"{numbers[0]} + {numbers[1]}") == f"= {numbers[0] + numbers[1]}"
    assert key(countdown, f"{numbers[1]} + {numbers[0]}") == key(countdown, f"{numbers[0]} + {numbers[1]}")
    assert key(countdown, "1000 + 1") == "1000 + 1"  # numbers the prompt does not have: its own vote
    assert key(countdown, " nonsense ") == "nonsense"
    assert key(countdown, "(" * 5000 + "1") == "(" * 5000 + "1"  # model output never makes a key raise
    arithmetic = get_task("arithmetic").generate(0, 0, 1, "test")
    key = get_task("arithmetic").answer_key
    assert key(arithmetic, " 053") == key(arithmetic, "53") == "53"
    assert key(arithmetic, "-7") == "-7" and key(arithmetic, "-0") == key(arithmetic, "000") == "0"
    assert key(arithmetic, "0" * 5000 + "5") == "5"  # past int()'s digit limit, still the integer
    assert key(arithmetic, "9" * 5000) == "9" * 5000  # no integer the verifier reads: its own text
    sudoku = get_task("sudoku").generate(0, 0, 1, "test")
    assert get_task("sudoku").answer_key(sudoku, f" {sudoku.answer} ") == sudoku.answer


def test_a_text_vote_would_pick_the_wrong_answer():
    """The case below separates the two ways of voting: by text, three answers tie and the best score wins."""
    assert choose(_candidates(), "majority").answer == choose(_candidates(), "weighted").answer == "10"
    assert choose(_candidates(), "majority", COUNTDOWN).answer in ("3 + 4", "4 + 3")
    pick, correct = pick_answer(COUNTDOWN, _candidates(), "majority")
    assert pick.answer in ("3 + 4", "4 + 3") and correct


def _search_cfg(select: str):
    return load_config("experiments/tiny").search.model_copy(update={"select": select})


@pytest.mark.parametrize("select", ["majority", "weighted"])
def test_ponder_search_reward_evaluation_and_rl_distillation_vote_alike(select):
    # ponder search and the demo: what they write for one searched problem
    pick, correct = pick_answer(COUNTDOWN, _candidates(), select)
    assert pick.answer in ("3 + 4", "4 + 3") and correct is True
    searched = Searched(1, COUNTDOWN, _candidates(), tokens=30.0, policy_flops=1.0, scorer_flops=0.0, expansions=3.0)
    record = search_record(searched, SearchSpec(strategy="best_of_n", n=3), _search_cfg(select), 0.1, False)
    assert (record["answer"], record["correct"]) == (pick.answer, True)
    demo_record = row_records(Row("best_of_n/x", "best_of_n", "prm", select, 4), [searched])[0]
    assert (demo_record["answer"], demo_record["correct"]) == (pick.answer, True)

    # reward-model evaluation: the vote over one problem's sampled chains
    task = get_task("countdown")
    records = [RewardRecord(COUNTDOWN, i, text, (), text.removeprefix("Answer: "), (),
                            task.score(COUNTDOWN, text)[0], "none") for i, (text, _) in enumerate(CHAINS)]
    scores = [RecordScores(np.zeros(0), score, score) for _, score in CHAINS]
    metrics = evaluate(records, scores)
    assert metrics["majority" if select == "majority" else "weighted_last"] == 1.0
    assert metrics["best_last"] == 0.0  # the best single score is the wrong `10`: the vote is what differs

    # RL search distillation: the chain it trains on, and whether it counts as found
    vocab = get_vocabulary("byte")
    chains, found = verified_chains([COUNTDOWN], [_candidates()], select, vocab, 64)
    assert found.tolist() == [True]
    assert vocab.decode(chains[0][:-1].tolist()) == f"Answer: {pick.answer}"
