"""`ponder search`: a search strategy over every problem of a file, from a checkpoint; one JSON line per problem.

    ponder search --checkpoint runs/small --problems problems.jsonl --strategy beam --budget 4096 --out results.jsonl

Problems are read line by line (a bad line is reported with its number and skipped),
bucketed by prompt length into `search.prompt_buckets` widths and searched
`search.batch_size` at a time, so the strategy compiles once per bucket, not per problem.
Problem k of the file (1-based line k) samples with fold_in(key(search.seed), k): its
result does not depend on the batch it ran in.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from tools.cli import add_config_arguments


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `ponder search`."""
    parser = subparsers.add_parser(
        "search",
        help="search over reasoning steps for every problem of a file (offline evaluation)",
        description="Runs search.strategy (sample, best_of_n, beam, dvts, mcts) over a problem file "
        "(ponder data export) with the policy of a checkpoint (a run directory, its checkpoints/ "
        "or one step directory) and the scorer search.scorer, and writes one JSON line per problem "
        "to --out as each batch finishes. Without --config, the config.yaml of the checkpoint's run "
        "directory is used; search.* keys can be overridden as key=value. --budget N sizes the "
        "strategy (n, or simulations for mcts) to about N tokens per problem (FLOPs with "
        "search.budget_unit=flops), measured by a pilot `sample` on the first batch.",
    )
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="run dir, checkpoints/ dir or step dir")
    parser.add_argument("--problems", required=True, metavar="JSONL", help="problem file (ponder data export)")
    parser.add_argument("--out", required=True, metavar="JSONL", help="results, one JSON object per problem")
    parser.add_argument("--strategy", help="search.strategy: sample, best_of_n, beam, dvts or mcts")
    parser.add_argument("--budget", type=float, help="search.budget: tokens (or FLOPs) per problem; 0: off")
    parser.add_argument("--keep-candidates", action="store_true", help="also write every candidate chain's answer")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


@dataclasses.dataclass
class Batch:
    """Problems searched in one call: `rows` real ones, then copies of the first up to the batch size."""

    width: int
    rows: list  # [(line number, Problem)]
    tokens: np.ndarray  # [B, width] int32
    lengths: np.ndarray  # [B] int32
    lines: np.ndarray  # [B] int: line numbers (the key of each row)


def run(args: argparse.Namespace) -> int:
    """Searches every problem, writes the results, prints a summary."""
    from tqdm import tqdm

    from configs.load import load_config
    from model.sharding import make_mesh
    from search.spec import spec_from_config
    from search.state import Models
    from train.checkpoint import CheckpointError, find_run_config, load_params
    from train.data import get_vocabulary
    from train.state import state_layout

    checkpoint, problems_path = Path(args.checkpoint), Path(args.problems)
    if not checkpoint.is_dir():
        return _error(f"{checkpoint}: no such checkpoint directory")
    if not problems_path.is_file():
        return _error(f"{problems_path}: no such problem file")
    config_path = args.config or find_run_config(checkpoint)
    if config_path is None:
        return _error(f"no config.yaml in {checkpoint} or the run directory above it; pass --config")
    overrides = list(args.overrides)
    overrides += [f"search.strategy={args.strategy}"] if args.strategy else []
    overrides += [f"search.budget={args.budget}"] if args.budget is not None else []
    cfg = load_config(config_path, overrides)
    search_cfg = cfg.search
    vocab = get_vocabulary(cfg.data.vocab)

    problems, skipped = read_problem_lines(problems_path)
    problems, too_long = _fitting(problems, vocab, search_cfg, problems_path)
    skipped += too_long
    for report in skipped:
        print(f"ponder search: skipped {report}", file=sys.stderr)
    if not problems:
        return _error(f"{problems_path}: no problem to search")
    if search_cfg.scorer == "oracle":
        print("ponder search: ORACLE scorer: steps are scored by the task's own checker and verifier, "
              "which see the reference answer; accuracy is an upper bound, not a result", file=sys.stderr)

    mesh = make_mesh(cfg.mesh)
    layout = state_layout(cfg, mesh)
    try:
        params = load_params(checkpoint, layout.abstract["params"])
        scorer, scorer_params = _scorer(cfg, vocab, mesh)
    except CheckpointError as err:
        return _error(str(err))
    except ValueError as err:  # the reward model does not fit the policy
        return _error(str(err))
    searcher = Searcher(Models(layout.graphdef, cfg.model, scorer), params, scorer_params, mesh)
    spec = spec_from_config(search_cfg, vocab)
    batches = plan_batches(problems, vocab, search_cfg.prompt_buckets, search_cfg.max_len,
                           min(search_cfg.batch_size, len(problems)), batch_shards(cfg, mesh))
    if search_cfg.budget:
        spec = size_by_pilot(searcher, spec, batches[0], search_cfg, cfg.model)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    totals = {"problems": 0, "answered": 0, "correct": 0, "tokens": 0.0, "flops": 0.0, "seconds": 0.0}
    with open(out, "w", encoding="utf-8") as f, tqdm(total=len(problems), unit="problem", desc=spec.strategy,
                                                     disable=args.no_progress, leave=False) as bar:
        for batch in batches:
            records, seconds = search_batch(searcher, spec, batch, vocab, search_cfg, args.keep_candidates)
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                totals["problems"] += 1
                totals["answered"] += record["correct"] is not None
                totals["correct"] += bool(record["correct"])
                totals["tokens"] += record["tokens"]
                totals["flops"] += record["policy_flops"] + record["scorer_flops"]
            f.flush()  # a crash later loses nothing written so far
            os.fsync(f.fileno())
            totals["seconds"] += seconds
            bar.update(len(batch.rows))
    _print_summary(totals, len(skipped), searcher, spec, search_cfg, out)
    return 0


def batch_shards(cfg, mesh) -> int:
    """How many devices of `mesh` split a batch of problems (the mesh axes the rules give `batch`)."""
    return math.prod(mesh.shape[axis] for axis in dict(cfg.rules()).get("batch", ()))


def read_problem_lines(path: Path) -> tuple[list, list[str]]:
    """[(line number, Problem)] of the file's valid lines, and `file:line: reason` for each bad one."""
    from tasks.base import Problem
    from tasks.files import iter_problem_lines

    problems, bad = [], []
    for number, parsed in iter_problem_lines(path):
        if isinstance(parsed, Problem):
            problems.append((number, parsed))
        else:
            bad.append(parsed)
    return problems, bad


def _prompt_length(vocab, problem) -> int:
    return 1 + len(vocab.encode(problem.prompt))  # BOS, as encode_prompts writes it


def _fitting(problems: list, vocab, search_cfg, path: Path) -> tuple[list, list[str]]:
    """The problems whose prompt leaves room for a step under search.max_len, and reports for the rest."""
    fit, reports = [], []
    for number, problem in problems:
        length = _prompt_length(vocab, problem)
        if length + search_cfg.max_step_tokens + 1 > search_cfg.max_len:
            reports.append(f"{path}:{number}: the prompt has {length} tokens; search.max_len="
                           f"{search_cfg.max_len} leaves no room for a step of {search_cfg.max_step_tokens}")
        else:
            fit.append((number, problem))
    return fit, reports


def bucket_width(length: int, buckets: list[int], max_len: int) -> int:
    """The smallest bucket that holds `length` tokens (past the largest: a multiple of it), at most max_len."""
    fitting = [width for width in sorted(buckets) if width >= length]
    width = fitting[0] if fitting else -(-length // max(buckets)) * max(buckets)
    return min(width, max_len)


def plan_batches(problems: list, vocab, buckets: list[int], max_len: int, batch_size: int,
                 shards: int = 1) -> list[Batch]:
    """Batches of `batch_size` problems, each of one bucket width (narrowest first, file order within a bucket).

    Each batch is padded with copies of its first problem to `batch_size` rows, rounded up to
    a multiple of `shards` (the devices the mesh splits a search's problems over).
    """
    from search.sampler import encode_prompts

    by_width: dict[int, list] = {}
    for number, problem in problems:
        by_width.setdefault(bucket_width(_prompt_length(vocab, problem), buckets, max_len), []).append(
            (number, problem))
    batches = []
    for width in sorted(by_width):
        group = by_width[width]
        for start in range(0, len(group), batch_size):
            rows = group[start : start + batch_size]
            padded = rows + [rows[0]] * (-(-batch_size // shards) * shards - len(rows))  # copies' results are dropped
            tokens, lengths = encode_prompts(vocab, [problem.prompt for _, problem in padded], width)
            batches.append(Batch(width, rows, tokens, lengths, np.array([n for n, _ in padded])))
    return batches


@functools.cache
def jit_search():
    """`run_search` under `jax.jit` with the spec and the models static."""
    import jax

    from search.sharded import run_search

    return jax.jit(run_search, static_argnums=(0, 1))


class Searcher:
    """Runs searches on batches, compiling ahead of time once per (spec, batch shape)."""

    def __init__(self, models, params, scorer_params, mesh):
        self.models, self.params, self.scorer_params, self.mesh = models, params, scorer_params, mesh
        self.compiled: dict = {}
        self.compile_seconds = 0.0

    def __call__(self, spec, batch: Batch, seed: int):
        """(state, chosen, seconds) for one batch; seconds excludes compiling."""
        import jax

        keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), batch.lines)
        if self.models.scorer.oracle:
            self.models.scorer.problems = [problem for _, problem in batch.rows]
            self.models.scorer.problems += [batch.rows[0][1]] * (len(batch.lines) - len(batch.rows))
        inputs = (self.params, self.scorer_params, batch.tokens, batch.lengths, keys)
        with jax.set_mesh(self.mesh):
            signature = (spec, batch.tokens.shape)
            if signature not in self.compiled:
                start = time.perf_counter()
                self.compiled[signature] = jit_search().lower(spec, self.models, *inputs).compile()
                self.compile_seconds += time.perf_counter() - start
            start = time.perf_counter()
            state, chosen = jax.block_until_ready(self.compiled[signature](*inputs))
        return state, chosen, time.perf_counter() - start


def size_by_pilot(searcher: Searcher, spec, batch: Batch, search_cfg, model_cfg):
    """`spec` with n (or simulations) set so a problem costs about search.budget, from a pilot `sample`."""
    import jax

    from model.flops import decode_flops
    from search.spec import resolve, size_for_budget

    state, _, _ = searcher(resolve(dataclasses.replace(spec, strategy="sample")), batch, search_cfg.seed)
    real = len(batch.rows)
    tokens, steps, policy, scored = (np.asarray(jax.device_get(x))[:real] for x in
                                     (state.tokens, state.expansions, state.policy_flops, state.scorer_flops))
    prompt_flops = np.asarray(decode_flops(model_cfg, np.zeros(real, np.int32), batch.lengths[:real] - 1))
    chain_flops = float(np.mean(policy + scored - prompt_flops))
    print(f"pilot: sample on {real} problems: {tokens.mean():.1f} tokens, {steps.mean():.1f} steps and "
          f"{chain_flops:.3g} FLOPs per chain (+ {prompt_flops.mean():.3g} FLOPs per prompt)", flush=True)
    if search_cfg.budget_unit == "tokens":
        budget, per_chain = search_cfg.budget, float(tokens.mean())
    else:
        budget, per_chain = search_cfg.budget - float(prompt_flops.mean()), chain_flops
    sized = size_for_budget(spec, budget, per_chain, float(steps.mean()))
    chosen = ", ".join(f"{name}={value}" for name, value in sized.items())
    short = " (less than one chain costs: the smallest search)" if budget < per_chain else ""
    print(f"budget: {search_cfg.budget:g} {search_cfg.budget_unit} per problem -> {spec.strategy} {chosen}{short}",
          flush=True)
    return resolve(dataclasses.replace(spec, **sized))


def search_batch(searcher: Searcher, spec, batch: Batch, vocab, search_cfg, keep_candidates: bool):
    """One JSON-ready record per real problem of the batch, and the batch's search seconds."""
    import jax

    from search.candidates import candidates, pick_answer

    state, chosen, seconds = searcher(spec, batch, search_cfg.seed)
    per_chain = candidates(spec, state, chosen, vocab)
    stats = {name: np.asarray(jax.device_get(getattr(state, name)))
             for name in ("tokens", "policy_flops", "scorer_flops", "expansions")}
    records = []
    for row, (number, problem) in enumerate(batch.rows):
        pick, correct = pick_answer(problem, per_chain[row], search_cfg.select)
        text = pick.text if pick else ""
        record = {
            "id": problem.id, "line": number, "task": problem.task, "strategy": spec.strategy,
            "scorer": search_cfg.scorer, "answer": pick.answer if pick else None, "correct": correct,
            "chain": text, "score": pick.score if pick else None,
            "tokens": int(stats["tokens"][row]), "policy_flops": float(stats["policy_flops"][row]),
            "scorer_flops": float(stats["scorer_flops"][row]), "expansions": int(stats["expansions"][row]),
            "wall_s": seconds / len(batch.rows),
        }
        if keep_candidates:
            record["candidates"] = [{"answer": c.answer, "score": c.score, "logprob": c.logprob,
                                     "finished": c.finished} for c in per_chain[row]]
        records.append(record)
    return records, seconds


def _scorer(cfg, vocab, mesh):
    """(scorer, its params): the reward model is loaded from search.reward_checkpoint."""
    from search.scorers import make_scorer

    if cfg.search.scorer != "reward":
        return make_scorer(cfg.search.scorer, vocab=vocab), None
    from train.reward import load_reward_model

    path = Path(cfg.search.reward_checkpoint)
    try:
        reward = load_reward_model(path, mesh)
    except FileNotFoundError as err:
        raise ValueError(f"search.reward_checkpoint: {err}") from None
    if reward.cfg.data.vocab != cfg.data.vocab or reward.cfg.model.max_seq_len < cfg.search.max_len:
        raise ValueError(f"search.reward_checkpoint {path}: needs the policy's vocabulary ({cfg.data.vocab}) and "
                         f"model.max_seq_len >= search.max_len ({cfg.search.max_len})")
    return make_scorer("reward", reward_graphdef=reward.graphdef, reward_cfg=reward.cfg.model), reward.params


def _print_summary(totals: dict, skipped: int, searcher: Searcher, spec, search_cfg, out: Path) -> None:
    from search.spec import STRATEGIES

    problems = totals["problems"]
    oracle = search_cfg.scorer == "oracle"
    print(f"ponder search: {spec.strategy} {STRATEGIES[spec.strategy].size(spec)}"
          + f", scorer {'ORACLE' if oracle else search_cfg.scorer}, select {search_cfg.select}")
    accuracy = f"{totals['correct'] / totals['answered']:.3f} ({totals['correct']}/{totals['answered']})" \
        if totals["answered"] else "n/a (no reference answers)"
    print(f"  problems: {problems}, skipped lines: {skipped}")
    print(f"  accuracy: {accuracy}" + ("  <- ORACLE scorer: an upper bound, not a result" if oracle else ""))
    print(f"  tokens/problem: {totals['tokens'] / problems:.1f}, FLOPs/problem: {totals['flops'] / problems:.3g}")
    rate = problems / totals["seconds"] if totals["seconds"] else float("inf")
    print(f"  problems/s: {rate:.3g} (search {totals['seconds']:.1f} s)")
    print(f"  compiles: {len(searcher.compiled)} ({searcher.compile_seconds:.1f} s)")
    print(f"  results: {out}")


def _error(message: str) -> int:
    print(f"ponder search: error: {message}", file=sys.stderr)
    return 2
