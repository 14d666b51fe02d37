"""Reward models: data files, the resumable reward stream, MC labels, PRM training, incremental scoring, the CLI.

The PRM tests use hand-made chains on arithmetic problems, labelled by the task's exact step
checker: each problem's worked solution, and a chain in which one step (at a random position)
is replaced by a step of another problem and the rest is computed correctly from there (so
every step from the swap on is wrong). Right and wrong steps come at every position, so
position alone says little (the test measures that baseline too). MC labels and the search
use the session's SFT-trained tiny policy (`trained_tiny_policy`).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import ROOT

from configs.load import load_config
from search.sampler import EOS_ID, Sampling, decode_text, encode_prompts
from search.scorers import RewardModelScorer
from search.sharded import run_search
from search.spec import SearchSpec
from search.state import Models
from search.tree import path_nodes, path_tokens
from tasks import get_task, jsonl
from tasks.arithmetic import rewrites
from tasks.expr import Op, evaluate, parse, to_text
from tools import cli
from train.data import DataStateError, get_vocabulary
from train.policy import load_policy
from train.problems import plan_problems
from train.reward import RecordScores, auc, load_reward_model, score_records, train_reward_model, within_problem_auc
from train.reward_data import (
    RewardData,
    RewardDataError,
    held_out,
    read_reward_records,
    record_tokens,
    to_example,
    write_reward_records,
)
from train.reward_labels import (
    Labeller,
    LabelSettings,
    build_reward_data,
    checker_record,
    prompt_width,
)

NEWLINE = 13  # "\n" in the byte vocabulary (byte + 3)


def _solution(steps) -> str:
    return "".join(f"{step}\n" for step in steps)


def swapped_chain(problem, other, position: int) -> str:
    """`problem`'s solution with step `position` replaced by `other`'s step there, continued correctly from it."""
    node = parse(other.steps[min(position, len(other.steps) - 1)], "+-*", negative_literals=True)
    steps = [*problem.steps[:position], to_text(node)]
    while isinstance(node, Op):
        node = rewrites(node)[0]
        steps.append(to_text(node))
    return _solution(steps) + f"Answer: {evaluate(node)}"


def chain_pairs(num: int, split: str, seed: int = 0):
    """[(problem index, problem, completion)]: per arithmetic d1 problem its solution and a swapped chain."""
    task, rng = get_task("arithmetic"), random.Random(seed)
    problems = [task.generate(0, i, 1, split) for i in range(num)]
    out = []
    for i, problem in enumerate(problems):
        good = _solution(problem.steps) + f"Answer: {problem.answer}"
        bad = swapped_chain(problem, problems[(i + 1) % num], rng.randrange(len(problem.steps)))
        out += [(i, problem, good), (i, problem, bad)]
    return out


def checker_records(num: int, split: str = "train"):
    return [checker_record(problem, k % 2, completion) for k, (_, problem, completion) in
            enumerate(chain_pairs(num, split))]


@pytest.fixture(scope="module")
def prm(trained_tiny_policy, tmp_path_factory):
    """A PRM initialised from the tiny policy, trained briefly on 600 problems' chains (30% held out)."""
    _, policy_dir = trained_tiny_policy
    root = tmp_path_factory.mktemp("prm")
    data = write_reward_records(root / "prm.jsonl", checker_records(600))
    result = train_reward_model(data, root / "run", policy=policy_dir, show_progress=False, overrides=(
        "train.steps=200", "optimizer.learning_rate=2e-3", "train.eval_every=100", "train.eval_batches=2",
        "train.checkpoint_every=200", "train.log_every=50", "reward.eval_fraction=0.3"))
    return root / "run", data, result


def test_prm_trained_briefly_separates_right_from_wrong_steps(prm):
    run_dir, data, result = prm
    metrics = result["eval"]
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()})
    assert metrics == json.loads((run_dir / "reward_eval.json").read_text())
    assert metrics["problems"] > 100 and 0.3 < metrics["step_positive_rate"] < 0.8  # both classes, held out
    assert metrics["step_auc"] >= 0.7
    held = [r for r in read_reward_records(data) if held_out(r.problem.id, 0.3)]
    steps_in = np.concatenate([np.arange(len(r.labels)) for r in held])
    truth = np.array([label for r in held for label in r.labels]) > 0.5
    position_only = max(auc(-steps_in, truth), auc(steps_in, truth))
    assert metrics["step_auc"] > position_only + 0.1, f"no better than the step's position ({position_only:.3f})"
    assert metrics["best_min"] > metrics["single"] + 0.1  # picking the chain with the best step scores helps
    assert metrics["within_pairs"] > 100 and metrics["within_auc_min"] > 0.6  # ... because it ranks a problem's chains
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in record for record in history) and result["train"]["step"] == 200


def test_within_problem_auc_ranks_only_candidates_of_one_problem():
    """Hand case: only pairs of one problem count, and within 'hard' a wrong chain can outscore the right one."""
    problems = plan_problems({"arithmetic_d1_direct": 1.0}, 2, split="test", seed=0)

    def record(problem, outcome):
        return dataclasses.replace(checker_record(problem, 0, _solution(problem.steps)
                                                  + f"Answer: {problem.answer}"), outcome=float(outcome))

    easy, hard = problems
    records = [record(easy, 1), record(easy, 0), record(hard, 1), record(hard, 0), record(hard, 0)]
    # step scores [first, last] and answer score: min / last / product differ on purpose
    scores = [RecordScores(np.array(s), a, a) for s, a in [
        ([0.9, 0.95], 0.9), ([0.9, 0.2], 0.6), ([0.3, 0.4], 0.5), ([0.45, 0.5], 0.5), ([0.3, 0.9], 0.1)]]
    by_problem = {easy.id: [0, 1], hard.id: [2, 3, 4]}
    got = within_problem_auc(records, scores, by_problem)
    # pairs: easy (0 > 1); hard (2 vs 3), (2 vs 4)
    # min:     0.9 > 0.2 win;  0.3 < 0.45 loss; 0.3 > 0.1 win                                   -> 2/3
    # last:    0.9 > 0.6 win;  0.5 == 0.5 half; 0.5 > 0.1 win                                   -> 2.5/3
    # product: 0.7695 > 0.108 win; 0.06 < 0.1125 loss; 0.06 > 0.027 win                          -> 2/3
    assert got == {"within_pairs": 3, "within_auc_min": 2 / 3, "within_auc_last": 2.5 / 3,
                   "within_auc_product": 2 / 3}
    only_right = within_problem_auc(records[:1], scores[:1], {easy.id: [0]})
    assert only_right["within_pairs"] == 0 and np.isnan(only_right["within_auc_min"])


def test_hard_mc_labels_agree_with_the_step_checker(trained_tiny_policy):
    """MC (any of 32 policy rollouts from the step's prefix verifies) vs the exact checker, on both kinds of step."""
    _, policy_dir = trained_tiny_policy
    policy = load_policy(policy_dir)
    samples = chain_pairs(64, "test")
    settings = LabelSettings(samples=1, mc_rollouts=32, labels="hard", label_source="mc", max_new_tokens=16,
                             temperature=0.5, rows=128)
    labeller = Labeller(policy, settings, prompt_width([p for _, p, _ in samples], policy.vocab))
    records = labeller.label([(problem, index, k % 2, completion)
                              for k, (index, problem, completion) in enumerate(samples)])
    mc = np.array([label for r in records for label in r.labels])
    exact = np.array([label for r in records for label in r.checker_labels])
    assert set(np.unique(mc)) <= {0.0, 1.0} and all(r.label_source == "mc" for r in records)
    agreement = float(np.mean((mc > 0) == exact))
    print(f"MC vs checker on {mc.size} steps: agreement {agreement:.3f}, right steps found {np.mean(mc[exact]):.3f}, "
          f"wrong steps rejected {np.mean(mc[~exact] == 0):.3f}")
    assert 0.3 < exact.mean() < 0.8
    assert agreement >= 0.8


def test_incremental_scoring_through_pages_equals_a_dense_forward(trained_tiny_policy, prm):
    """The search's PRM scores (incremental, from the tree's pages) equal the dense PRM on the full sequence,
    and the positions training labels are the positions the search reads."""
    _, policy_dir = trained_tiny_policy
    run_dir, _, _ = prm
    policy, reward = load_policy(policy_dir), load_reward_model(run_dir)
    problems = [get_task("arithmetic").generate(0, i, 1, "test") for i in range(6)]
    tokens, lengths = encode_prompts(policy.vocab, [p.prompt for p in problems], 32)
    keys = jnp.stack([jax.random.fold_in(jax.random.key(5), i) for i in range(len(problems))])
    spec = SearchSpec(strategy="beam", n=2, m=2, max_steps=5, max_step_tokens=16, max_len=128, page_size=8,
                      sampling=Sampling(temperature=1.0))
    models = Models(policy.graphdef, policy.cfg.model, RewardModelScorer(reward.graphdef, reward.cfg.model))
    with jax.set_mesh(policy.mesh):
        state, _ = jax.jit(run_search, static_argnums=(0, 1))(spec, models, policy.params, reward.params,
                                                              jnp.asarray(tokens), jnp.asarray(lengths), keys)
    tree = jax.tree.map(np.asarray, state.tree)
    nodes = [(b, n) for b in range(len(problems)) for n in range(1, int(tree.node_count[b]))]
    contexts = [tokens[b, : lengths[b]].tolist() + path_tokens(tree, b, n) for b, n in nodes]
    dense = np.zeros((len(contexts), 128), np.int32)
    for row, context in enumerate(contexts):
        dense[row, : len(context)] = context
    with jax.set_mesh(reward.mesh):
        model = nnx.merge(reward.graphdef, reward.params)
        values = np.asarray(jax.jit(lambda t: jax.nn.sigmoid(model.value(model.hidden(t))))(dense))
    expected = values[np.arange(len(contexts)), [len(c) - 1 for c in contexts]]
    got = np.array([tree.score[b, n] for b, n in nodes])
    assert np.max(np.abs(got - expected)) <= 1e-5

    # finished chains, re-read as reward records: the same tokens, labels at the ends of the path's steps
    matched = 0
    for b, n in nodes:
        context = tokens[b, : lengths[b]].tolist() + path_tokens(tree, b, n)
        if not (tree.terminal[b, n] and context[-1] == EOS_ID):
            continue
        record = checker_record(problems[b], 0, decode_text(policy.vocab, path_tokens(tree, b, n)))
        ids, step_ends, answer_end = record_tokens(record, policy.vocab)
        if ids != context:
            continue  # text that does not re-encode to itself (a blank line, invalid bytes)
        matched += 1
        ends = np.cumsum([tree.step_len[b, m] for m in path_nodes(tree, b, n)]) + lengths[b] - 1
        assert step_ends + answer_end == ends.tolist()
        assert [context[i] for i in step_ends] == [NEWLINE] * len(step_ends)
        scores = score_records(reward, [record])[0]
        path_scores = [tree.score[b, m] for m in path_nodes(tree, b, n)]
        np.testing.assert_allclose([*scores.steps, scores.answer], path_scores, atol=1e-5)
    assert matched >= 3


def test_record_layout_and_file_errors(tmp_path):
    records = checker_records(4)
    path = write_reward_records(tmp_path / "r.jsonl", records)
    assert [r.to_json() for r in read_reward_records(path)] == [r.to_json() for r in records]
    vocab = get_vocabulary("byte")
    record = records[1]
    prm = to_example(record, vocab, "prm")
    assert [int(prm.tokens[i]) for i in prm.positions] == [NEWLINE] * len(record.steps) + [EOS_ID]
    assert prm.labels.tolist() == [*record.labels, record.outcome]
    orm = to_example(record, vocab, "orm")
    assert orm.positions.tolist() == [len(orm.tokens) - 1] and orm.labels.tolist() == [record.outcome]
    soft = dataclasses.replace(record, labels=tuple(0.25 for _ in record.labels), label_source="mc")
    assert to_example(soft, vocab, "prm", hard=True).labels.tolist()[:-1] == [1.0] * len(record.steps)

    lines = path.read_text().splitlines()
    bad = json.loads(lines[2]) | {"labels": [0.5]}
    (tmp_path / "bad.jsonl").write_text("\n".join([lines[0], lines[1], json.dumps(bad), lines[3]]) + "\n")
    with pytest.raises(RewardDataError, match=r"bad\.jsonl:3: 'labels' has 1 entries for 2 steps"):
        read_reward_records(tmp_path / "bad.jsonl")
    (tmp_path / "torn.jsonl").write_text(lines[0] + "\n" + lines[1][:40] + "\n")
    with pytest.raises(RewardDataError, match=r"torn\.jsonl:2: invalid JSON"):
        read_reward_records(tmp_path / "torn.jsonl")
    typo = json.loads(lines[0]) | {"outcom": 1}
    (tmp_path / "typo.jsonl").write_text(json.dumps(typo) + "\n")
    with pytest.raises(RewardDataError, match=r"typo\.jsonl:1: unknown key\(s\) outcom"):
        read_reward_records(tmp_path / "typo.jsonl")


def _record_line(record, **changes) -> bytes:
    """A record's JSON line with `changes` (raw JSON text per key) put in place of those keys' values."""
    values = record.to_json()
    text = json.dumps({key: values[key] for key in values if key not in changes})
    return (text[:-1] + "".join(f', "{key}": {raw}' for key, raw in changes.items()) + "}").encode()


_RECORD = checker_records(1)[0]
_DEEP = "[" * 3000 + "]" * 3000


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (_record_line(_RECORD, steps=_DEEP), "nested too deeply"),
        (b'{"a": ' * 4000 + b"1" + b"}" * 4000, "nested too deeply"),
        (b" " * (jsonl.MAX_LINE_BYTES + 1), f"line longer than {jsonl.MAX_LINE_BYTES} bytes"),
        (bytes(range(256)).replace(b"\n", b""), "not valid UTF-8"),
        (_record_line(_RECORD, completion='"aQb"').replace(b"aQb", b"a\xffb"), "not valid UTF-8"),
        (_record_line(_RECORD, completion='"aQb"').replace(b"aQb", b"a\xed\xa0\x80b"), "not valid UTF-8"),
        (_record_line(_RECORD, completion='"a\x00b"'), "invalid JSON: Invalid control character"),
        (_record_line(_RECORD, completion='"\\udc80"'), "lone surrogate"),
        (_record_line(_RECORD, outcome="NaN"), "NaN is not standard JSON"),
        (_record_line(_RECORD, labels="[1e400, 0]"), "number 1e400 is out of range"),
        (_record_line(_RECORD)[:-1] + b', "sample": 0}', "duplicate key 'sample'"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'"a record"', "expected a JSON object, got str"),
        (_record_line(_RECORD, labels='"0.5"'), "'labels' must be a list of numbers in [0, 1], got '0.5'"),
        (_record_line(_RECORD, sample='"1"'), "'sample' must be an integer, got '1'"),
        (_record_line(_RECORD, outcome="true"), "'outcome' must be 0 or 1, got True"),
        (_record_line(_RECORD, steps='["a\\nb"]', labels="[1]"), "'steps' must be a list of strings without newlines"),
        (_record_line(_RECORD, sample="-1.5"), "'sample' must be an integer, got -1.5"),
        (_record_line(_RECORD, **{"k" * 100_000: "1"}), "unknown key(s) kkkk"),
    ],
)
def test_hostile_reward_lines_raise_naming_file_and_line(tmp_path, bad_line, message):
    good = [json.dumps(r.to_json()).encode() for r in checker_records(2)]
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\n".join([good[0], b"", bad_line, good[1]]) + b"\n")
    with pytest.raises(RewardDataError) as error:
        read_reward_records(path)
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)
    assert "\n" not in str(error.value) and len(str(error.value)) <= len(f"{path}:3: ") + jsonl.MAX_REASON_CHARS


def test_reward_lines_are_read_in_bounded_chunks(tmp_path):
    import tracemalloc

    from train.reward_data import RewardRecord

    cap, good = jsonl.MAX_LINE_BYTES, [json.dumps(r.to_json()).encode() for r in checker_records(1)]
    path = tmp_path / "r.jsonl"
    path.write_bytes(good[0] + b"\n" + b"[" * (16 * cap) + b"\n" + good[1] + b"\n")
    tracemalloc.start()
    try:
        with pytest.raises(RewardDataError, match=rf"r\.jsonl:2: line longer than {cap} bytes"):
            read_reward_records(path)
        lines = list(jsonl.iter_json_lines(path, RewardRecord.from_json))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * cap  # the 16 MiB line was read in bounded pieces and dropped, never held whole
    assert [number for number, _ in lines] == [1, 2, 3] and isinstance(lines[1][1], jsonl.BadLine)
    assert [r.to_json() for _, r in (lines[0], lines[2])] == [r.to_json() for r in checker_records(1)]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(st.one_of(
    st.integers(0, 3).map(lambda k: ("good", k)),
    st.binary(max_size=200).map(lambda b: ("junk", b.replace(b"\n", b""))),
    st.sampled_from([b"[" * 5000, b'{"a": ' * 70 + b"1" + b"}" * 70, b"\x00", b"NaN"]).map(lambda b: ("junk", b)),
), max_size=8))
def test_fuzz_reward_files_of_arbitrary_lines(lines):
    """Good lines come back as their records; the first non-blank other line raises RewardDataError naming it."""
    import tempfile

    records = checker_records(2)
    good = [json.dumps(r.to_json()).encode() for r in records]
    with tempfile.TemporaryDirectory() as directory, pytest.MonkeyPatch.context() as patch:
        patch.setattr(jsonl, "MAX_LINE_BYTES", 2 * max(map(len, good)))
        path = f"{directory}/r.jsonl"
        with open(path, "wb") as f:
            f.write(b"\n".join(good[k] if kind == "good" else k for kind, k in lines))
        bad = [n for n, (kind, line) in enumerate(lines, 1) if kind == "junk" and not _blank(line)]
        if bad:
            with pytest.raises(RewardDataError, match=rf"^{re.escape(path)}:{bad[0]}: "):
                read_reward_records(path)
        elif not any(kind == "good" for kind, _ in lines):
            with pytest.raises(RewardDataError, match="no records"):
                read_reward_records(path)
        else:
            got = read_reward_records(path)
            assert [r.to_json() for r in got] == [records[k].to_json() for kind, k in lines if kind == "good"]


def _blank(line: bytes) -> bool:
    try:
        return not line.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False


def test_reward_stream_packs_labels_and_resumes_exactly(tmp_path):
    data = write_reward_records(tmp_path / "r.jsonl", checker_records(40))
    cfg = load_config("experiments/tiny", ["data.objective=reward", "model.value_head=true", f"reward.data={data}",
                                           "data.batch_size=4", "data.seq_len=96", "reward.eval_fraction=0.2"])
    stream = RewardData(cfg, shard_index=0, num_shards=1)
    first = [next(stream) for _ in range(3)]
    mask = first[0]["label_mask"] > 0
    assert set(first[0]["tokens"][mask].tolist()) <= {NEWLINE, EOS_ID}
    assert (first[0]["segment_ids"][mask] > 0).all() and first[0]["segment_ids"].max() > 1  # packed
    stream.save(tmp_path / "data")
    expected = [next(stream) for _ in range(12)]  # past the end of an epoch
    resumed = RewardData(cfg, shard_index=0, num_shards=1)
    resumed.restore(tmp_path / "data")
    for want, got in zip(expected, (next(resumed) for _ in range(12)), strict=True):
        for name in want:
            np.testing.assert_array_equal(want[name], got[name])
    validation = RewardData(cfg, split="validation", shard_index=0, num_shards=1)
    assert validation.examples and len(validation.examples) + len(stream.examples) == 80  # problems held out whole
    write_reward_records(data, checker_records(41))
    with pytest.raises(DataStateError, match="the content of reward.data"):
        RewardData(cfg, shard_index=0, num_shards=1).restore(tmp_path / "data")


def test_reward_data_build_resumes_after_an_interruption(trained_tiny_policy, tmp_path, monkeypatch):
    _, policy_dir = trained_tiny_policy
    policy = load_policy(policy_dir)
    problems = plan_problems(policy.cfg.data.mixture, 6, start=100_000)
    settings = LabelSettings(samples=2, mc_rollouts=2, label_source="mc", max_new_tokens=32, rows=4)
    whole = build_reward_data(policy, problems, tmp_path / "whole.jsonl", settings, show_progress=False)
    assert whole["records"] == 12 and whole["problems"] == 6 and "mc_checker_agreement" in whole

    calls = {"n": 0}
    original = Labeller.__call__

    def dies_on_second_chunk(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Labeller, "__call__", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        build_reward_data(policy, problems, tmp_path / "cut.jsonl", settings, show_progress=False)
    assert not (tmp_path / "cut.jsonl").exists()
    partial = tmp_path / "cut.jsonl.partial"
    with open(partial, "a") as f:
        f.write('{"problem_id": "torn')  # the run died mid-line
    monkeypatch.setattr(Labeller, "__call__", original)
    resumed = build_reward_data(policy, problems, tmp_path / "cut.jsonl", settings, show_progress=False)
    assert resumed["resumed_problems"] == 2 and not partial.exists()
    assert (tmp_path / "cut.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()


def test_cli_help_and_a_tiny_end_to_end_run(trained_tiny_policy, tmp_path, capsys):
    _, policy_dir = trained_tiny_policy
    done = subprocess.run([sys.executable, "-m", "tools.cli", "reward", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "usage: ponder reward" in done.stdout and "eval" in done.stdout
    parser = cli.build_parser()
    for command in ("data", "train", "eval"):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["reward", command, "--help"])
        assert exit_.value.code == 0 and f"usage: ponder reward {command}" in capsys.readouterr().out

    def ponder(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)

    data = tmp_path / "d.jsonl"
    assert ponder("reward", "data", "--checkpoint", str(policy_dir), "--out", str(data), "--problems", "4",
                  "--samples", "2", "--mc-rollouts", "2", "--label-source", "mc", "--max-new-tokens", "32",
                  "--rows", "8", "--no-progress") == 0
    assert "4 problems" in capsys.readouterr().out and len(read_reward_records(data)) == 8
    run = tmp_path / "orm"
    assert ponder("reward", "train", "--data", str(data), "--policy", str(policy_dir), "--out", str(run), "--kind",
                  "orm", "--no-progress", "train.steps=4", "train.checkpoint_every=4", "train.eval_every=0",
                  "train.log_every=2", "reward.eval_fraction=0.0") == 0
    out = capsys.readouterr().out
    assert "step=4" in out and f"search.reward_checkpoint={run}" in out
    assert load_config(run / "config.yaml").reward.kind == "orm"
    assert ponder("reward", "eval", "--checkpoint", str(run), "--data", str(data), "--json") == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["kind"] == "orm" and metrics["records"] == 8 and 0 <= metrics["majority"] <= 1

    lines = data.read_text().splitlines()
    (tmp_path / "bad.jsonl").write_text("\n".join([lines[0], "{not json", *lines[2:]]) + "\n")
    assert ponder("reward", "eval", "--checkpoint", str(run), "--data", str(tmp_path / "bad.jsonl")) == 2
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
