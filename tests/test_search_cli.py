"""`ponder search` end to end on a freshly initialised tiny checkpoint (its answers are wrong; the plumbing is tested).

The two searching runs share a persistent XLA compilation cache: the second one's pilot
(`sample` on the narrow bucket) is the first one's program, so it compiles only best_of_n.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from test_cli import ROOT

from configs.load import load_config, save_config
from model.sharding import make_mesh
from search.runner import bucket_width, plan_batches
from tasks import get_task
from tasks.files import write_problems
from tools import cli
from train.checkpoint import Checkpoints
from train.data import get_vocabulary
from train.state import init_state, state_layout

# Tiny search sizes: a few steps of a few tokens, so each compile is as small as a search gets.
SIZES = ["search.max_steps=3", "search.max_step_tokens=8", "search.max_len=64", "search.batch_size=2",
         "search.prompt_buckets=[24,48]"]
FIELDS = {"id", "line", "task", "strategy", "scorer", "answer", "correct", "chain", "score", "tokens",
          "policy_flops", "scorer_flops", "expansions", "wall_s"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with config.yaml and one checkpoint of the tiny experiment's initial state."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config("experiments/tiny", [f"train.run_dir={run_dir}"])
    mesh = make_mesh(cfg.mesh)
    layout = state_layout(cfg, mesh)
    save_config(cfg, run_dir)
    checkpoints = Checkpoints(run_dir / "checkpoints", save_every=1, keep=1)
    checkpoints.save(1, init_state(cfg, layout, mesh), config=cfg, force=True)
    checkpoints.close()
    return run_dir


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla-cache")


def ponder_search(compile_cache, *args: str) -> subprocess.CompletedProcess:
    """`ponder search ARGS` in a subprocess on one CPU device, with the module's compilation cache."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices: not ours
    env |= {"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(compile_cache)}
    return subprocess.run([sys.executable, "-m", "tools.cli", "search", "--no-progress", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _problems(task: str, difficulty: int, count: int):
    return [get_task(task).generate(0, index, difficulty, "test") for index in range(count)]


def test_mixed_lengths_bad_line_and_one_compile_per_bucket(run_dir, compile_cache, tmp_path):
    # arithmetic d1 prompts are 20 tokens with BOS (bucket 24), countdown d3 ones 30-32 (bucket 48)
    problems = _problems("arithmetic", 1, 3) + _problems("countdown", 3, 2)
    path = tmp_path / "problems.jsonl"
    write_problems(path, problems)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")  # line 2 is malformed
    out = tmp_path / "results.jsonl"

    result = ponder_search(compile_cache, "--checkpoint", str(run_dir), "--problems", str(path), "--out", str(out),
                           "--strategy", "sample", "--keep-candidates", *SIZES)
    assert result.returncode == 0, result.stderr
    assert f"{path}:2: invalid JSON" in result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(p.id for p in problems)
    assert sorted(r["line"] for r in records) == [1, 3, 4, 5, 6]
    for record in records:
        assert FIELDS <= set(record)
        assert record["strategy"] == "sample" and isinstance(record["correct"], bool)
        assert len(record["candidates"]) == 1
        assert set(record["candidates"][0]) == {"answer", "score", "logprob", "finished"}
        assert 0 < record["tokens"] <= 3 * 8 and record["policy_flops"] > 0 and record["wall_s"] > 0
    assert "problems: 5, skipped lines: 1" in result.stdout
    assert "accuracy:" in result.stdout and "tokens/problem:" in result.stdout and "problems/s:" in result.stdout
    # 3 batches (arithmetic 2 + 1 padded, countdown 2), 2 prompt buckets: 2 compiled programs
    assert re.search(r"compiles: 2 \(", result.stdout), result.stdout


def test_budget_sizes_the_strategy_from_a_pilot(run_dir, compile_cache, tmp_path):
    path = tmp_path / "problems.jsonl"
    write_problems(path, _problems("arithmetic", 1, 2))
    out = tmp_path / "results.jsonl"
    result = ponder_search(compile_cache, "--checkpoint", str(run_dir / "checkpoints"), "--problems", str(path),
                           "--out", str(out), "--strategy", "best_of_n", "--budget", "48", "--keep-candidates", *SIZES)
    assert result.returncode == 0, result.stderr
    pilot = re.search(r"pilot: sample on 2 problems: ([0-9.]+) tokens, ([0-9.]+) steps", result.stdout)
    assert pilot, result.stdout
    sized = re.search(r"budget: 48 tokens per problem -> best_of_n n=(\d+)", result.stdout)
    assert sized, result.stdout
    n = int(sized.group(1))
    assert n == max(round(48 / float(pilot.group(1))), 1)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all(len(r["candidates"]) == n for r in records)
    assert f"best_of_n n={n}," in result.stdout
    assert re.search(r"compiles: 2 \(", result.stdout)  # the pilot's program and the sized one


def test_greedy_is_a_strategy_and_its_summary_says_so(run_dir, compile_cache, tmp_path):
    path = tmp_path / "problems.jsonl"
    write_problems(path, _problems("arithmetic", 1, 2))
    out = tmp_path / "results.jsonl"
    result = ponder_search(compile_cache, "--checkpoint", str(run_dir), "--problems", str(path), "--out", str(out),
                           "--strategy", "greedy", "--keep-candidates", "search.temperature=1.0", "search.n=4", *SIZES)
    assert result.returncode == 0, result.stderr
    assert "ponder search: greedy n=1, scorer logprob" in result.stdout  # n=4 asked: greedy is one chain
    assert "greedy: one chain at temperature 0" in result.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["strategy"] for r in records] == ["greedy"] * 2 and all(len(r["candidates"]) == 1 for r in records)


def test_missing_checkpoint_or_problems_exit_2(run_dir, tmp_path, capsys):
    problems = tmp_path / "problems.jsonl"
    write_problems(problems, _problems("arithmetic", 1, 1))
    cases = [(["--checkpoint", str(tmp_path / "nowhere"), "--problems", str(problems)], "nowhere"),
             (["--checkpoint", str(run_dir), "--problems", str(tmp_path / "none.jsonl")], "none.jsonl")]
    for args, named in cases:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["search", *args, "--out", str(tmp_path / "out.jsonl")])
        assert exit_.value.code == 2
        stderr = capsys.readouterr().err
        assert "ponder search: error:" in stderr and named in stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_buckets_and_padding():
    assert [bucket_width(n, [32, 16], 512) for n in (3, 16, 17, 32, 33, 70)] == [16, 16, 32, 32, 64, 96]
    assert bucket_width(100, [32, 256], 128) == 128
    vocab = get_vocabulary("byte")
    arithmetic, countdown = _problems("arithmetic", 1, 3), _problems("countdown", 3, 1)
    rows = [(1, countdown[0]), (2, arithmetic[0]), (3, arithmetic[1]), (5, arithmetic[2])]
    batches = plan_batches(rows, vocab, [24, 48], 64, 2)
    assert [(b.width, [n for n, _ in b.rows], b.lines.tolist()) for b in batches] == [
        (24, [2, 3], [2, 3]), (24, [5], [5, 5]), (48, [1], [1, 1])]
    assert batches[1].tokens.shape == (2, 24) and (batches[1].tokens[0] == batches[1].tokens[1]).all()

