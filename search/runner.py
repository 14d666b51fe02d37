"""Search over a whole problem list on the host: read, bucket, batch, search, choose, record.

    problems, skipped = read_problems_for_search(path, vocab, search_cfg)
    batches = plan_batches(problems, vocab, search_cfg.prompt_buckets, search_cfg.max_len, batch_size, shards)
    searcher = Searcher(models, params, scorer_params, mesh)
    totals = write_results(searcher, spec, batches, vocab, search_cfg, "results.jsonl")

Problems are bucketed by prompt length into `search.prompt_buckets` widths and searched
`search.batch_size` at a time, so a strategy compiles once per bucket, not per problem.
Problem k of a file (1-based line k) samples with fold_in(key(search.seed), k): its result
does not depend on the batch it ran in. `ponder search` and the demo both run this code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np

from configs.fileio import LineLog
from model.distributed import host_values
from model.flops import decode_flops
from search.candidates import Candidate, candidates, choose
from search.sampler import encode_prompts
from search.sharded import run_search
from search.spec import SearchSpec, resolve, size_for_budget
from search.state import Models
from tasks import get_task
from tasks.base import Problem
from tasks.files import iter_problem_lines

STATS = ("tokens", "policy_flops", "scorer_flops", "expansions")  # per-problem costs a search reports


@dataclasses.dataclass
class Batch:
    """Problems searched in one call: `rows` real ones, then copies of the first up to the batch size."""

    width: int
    rows: list  # [(line number, Problem)]
    tokens: np.ndarray  # [B, width] int32
    lengths: np.ndarray  # [B] int32
    lines: np.ndarray  # [B] int: line numbers (the key of each row)


@dataclasses.dataclass
class Searched:
    """One problem's search: its candidate chains and what they cost (the `STATS`)."""

    line: int
    problem: Problem
    candidates: list[Candidate]
    tokens: float
    policy_flops: float
    scorer_flops: float
    expansions: float


def read_problem_lines(path: Path) -> tuple[list[tuple[int, Problem]], list[str]]:
    """[(line number, Problem)] of the file's valid lines, and `file:line: reason` for each bad one."""
    problems, bad = [], []
    for number, parsed in iter_problem_lines(path):
        if isinstance(parsed, Problem):
            problems.append((number, parsed))
        else:
            bad.append(parsed)
    return problems, bad


def prompt_length(vocab, problem: Problem) -> int:
    """Tokens of the problem's prompt as the search feeds it (BOS, as `encode_prompts` writes it)."""
    return 1 + len(vocab.encode(problem.prompt))


def fitting(problems: list, vocab, search_cfg, path: Path) -> tuple[list, list[str]]:
    """The problems whose prompt leaves room for a step under search.max_len, and reports for the rest."""
    fit, reports = [], []
    for number, problem in problems:
        length = prompt_length(vocab, problem)
        if length + search_cfg.max_step_tokens + 1 > search_cfg.max_len:
            reports.append(f"{path}:{number}: the prompt has {length} tokens; search.max_len="
                           f"{search_cfg.max_len} leaves no room for a step of {search_cfg.max_step_tokens}")
        else:
            fit.append((number, problem))
    return fit, reports


def read_problems_for_search(path: Path, vocab, search_cfg) -> tuple[list[tuple[int, Problem]], list[str]]:
    """The file's problems that can be searched, and a `file:line: reason` for each line skipped."""
    problems, skipped = read_problem_lines(path)
    problems, too_long = fitting(problems, vocab, search_cfg, path)
    return problems, skipped + too_long


def bucket_width(length: int, buckets: list[int], max_len: int) -> int:
    """The smallest bucket that holds `length` tokens (past the largest: a multiple of it), at most max_len."""
    fitting_widths = [width for width in sorted(buckets) if width >= length]
    width = fitting_widths[0] if fitting_widths else -(-length // max(buckets)) * max(buckets)
    return min(width, max_len)


def batch_shards(cfg, mesh) -> int:
    """How many devices of `mesh` split a batch of problems (the mesh axes `cfg`'s rules give `batch`)."""
    return math.prod(mesh.shape[axis] for axis in dict(cfg.rules()).get("batch", ()))


def plan_batches(problems: list, vocab, buckets: list[int], max_len: int, batch_size: int,
                 shards: int = 1) -> list[Batch]:
    """Batches of `batch_size` problems, each of one bucket width (narrowest first, file order within a bucket).

    Each batch is padded with copies of its first problem to `batch_size` rows, rounded up to
    a multiple of `shards` (the devices the mesh splits a search's problems over).
    """
    by_width: dict[int, list] = {}
    for number, problem in problems:
        by_width.setdefault(bucket_width(prompt_length(vocab, problem), buckets, max_len), []).append(
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
    return jax.jit(run_search, static_argnums=(0, 1))


class Searcher:
    """Runs searches on batches, compiling ahead of time once per (spec, batch shape).

    `compiled` may be shared between searchers whose models differ only in params (they are
    inputs of the program, not constants). `programs(spec, shape)`, when given, is the search
    to compile in place of tracing `run_search` with `models` (None then): a program exported
    beforehand (`search.export.SearchArtifact.program`), with `run_search`'s arguments.
    """

    def __init__(self, models: Models | None, params, scorer_params, mesh,
                 programs: Callable[[SearchSpec, tuple[int, ...]], Callable] | None = None):
        self.models, self.params, self.scorer_params, self.mesh = models, params, scorer_params, mesh
        self.programs = programs
        self.compiled: dict = {}
        self.compile_seconds = 0.0

    def __call__(self, spec: SearchSpec, batch: Batch, seed: int):
        """(state, chosen, seconds) for one batch, as numpy without the page pools; seconds excludes compiling."""
        keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), batch.lines)
        if self.models is not None and self.models.scorer.host_callback:
            padded = [problem for _, problem in batch.rows]
            self.models.scorer.bind(padded + [padded[0]] * (len(batch.lines) - len(batch.rows)))
        inputs = (self.params, self.scorer_params, batch.tokens, batch.lengths, keys)
        with jax.set_mesh(self.mesh):
            signature = (spec, batch.tokens.shape)
            if signature not in self.compiled:
                start = time.perf_counter()
                if self.programs is None:
                    lowered = jit_search().lower(spec, self.models, *inputs)
                else:
                    lowered = jax.jit(self.programs(*signature)).lower(*inputs)
                self.compiled[signature] = lowered.compile()
                self.compile_seconds += time.perf_counter() - start
            start = time.perf_counter()
            state, chosen = jax.block_until_ready(self.compiled[signature](*inputs))
            seconds = time.perf_counter() - start
            # Every host reads every problem's result (gathered on a pod); the page pools stay on device.
            state, chosen = host_values((dataclasses.replace(state, cache=None, scorer_cache=None), chosen))
        return state, chosen, seconds


def size_by_pilot(searcher: Searcher, spec: SearchSpec, batch: Batch, search_cfg,
                  model_cfg) -> tuple[SearchSpec, list[str]]:
    """`spec` sized so a problem costs about search.budget, from a pilot `sample` on `batch`; and what to report."""
    state, _, _ = searcher(resolve(dataclasses.replace(spec, strategy="sample")), batch, search_cfg.seed)
    real = len(batch.rows)
    tokens, steps, policy, scored = (x[:real] for x in
                                     (state.tokens, state.expansions, state.policy_flops, state.scorer_flops))
    prompt_flops = np.asarray(decode_flops(model_cfg, np.zeros(real, np.int32), batch.lengths[:real] - 1))
    chain_flops = float(np.mean(policy + scored - prompt_flops))
    report = [f"pilot: sample on {real} problems: {tokens.mean():.1f} tokens, {steps.mean():.1f} steps and "
              f"{chain_flops:.3g} FLOPs per chain (+ {prompt_flops.mean():.3g} FLOPs per prompt)"]
    if search_cfg.budget_unit == "tokens":
        budget, per_chain = search_cfg.budget, float(tokens.mean())
    else:
        budget, per_chain = search_cfg.budget - float(prompt_flops.mean()), chain_flops
    sized = size_for_budget(spec, budget, per_chain, float(steps.mean()))
    chosen = ", ".join(f"{name}={value}" for name, value in sized.items())
    short = " (less than one chain costs: the smallest search)" if budget < per_chain else ""
    report.append(f"budget: {search_cfg.budget:g} {search_cfg.budget_unit} per problem -> {spec.strategy} "
                  f"{chosen}{short}")
    return resolve(dataclasses.replace(spec, **sized)), report


def search_problems(searcher: Searcher, spec: SearchSpec, batch: Batch, vocab,
                    seed: int) -> tuple[list[Searched], float]:
    """Each real problem of the batch with its candidates and costs, and the batch's search seconds."""
    state, chosen, seconds = searcher(spec, batch, seed)
    per_chain = candidates(spec, state, chosen, vocab)
    stats = {name: getattr(state, name) for name in STATS}
    searched = [Searched(number, problem, per_chain[row], **{name: float(stats[name][row]) for name in STATS})
                for row, (number, problem) in enumerate(batch.rows)]
    return searched, seconds


def answer(problem: Problem, cands: list[Candidate], select: str) -> tuple[Candidate | None, bool | None]:
    """The chosen candidate (votes counted by the task's answer key), and whether it is right (None: no reference)."""
    pick = choose(cands, select, problem)
    correct = get_task(problem.task).score(problem, pick.text if pick else "")[0] == 1.0 if problem.answer else None
    return pick, correct


def search_record(searched: Searched, spec: SearchSpec, search_cfg, wall_s: float, keep_candidates: bool) -> dict:
    """The JSON-ready result line `ponder search` writes for one problem."""
    pick, correct = answer(searched.problem, searched.candidates, search_cfg.select)
    problem = searched.problem
    record = {
        "id": problem.id, "line": searched.line, "task": problem.task, "strategy": spec.strategy,
        "scorer": search_cfg.scorer, "answer": pick.answer if pick else None, "correct": correct,
        "chain": pick.text if pick else "", "score": pick.score if pick else None,
        "tokens": int(searched.tokens), "policy_flops": searched.policy_flops,
        "scorer_flops": searched.scorer_flops, "expansions": int(searched.expansions), "wall_s": wall_s,
    }
    if keep_candidates:
        record["candidates"] = [{"answer": c.answer, "score": c.score, "logprob": c.logprob,
                                 "finished": c.finished} for c in searched.candidates]
    return record


def search_batches(searcher: Searcher, spec: SearchSpec, batches: list[Batch], vocab, search_cfg,
                   keep_candidates: bool = False) -> Iterator[tuple[Batch, list[dict], float]]:
    """Per batch, in order: the batch, one record per real problem (`search_record`), its search seconds."""
    for batch in batches:
        searched, seconds = search_problems(searcher, spec, batch, vocab, search_cfg.seed)
        yield batch, [search_record(s, spec, search_cfg, seconds / len(batch.rows), keep_candidates)
                      for s in searched], seconds


def write_results(searcher: Searcher, spec: SearchSpec, batches: list[Batch], vocab, search_cfg, out: Path, *,
                  keep_candidates: bool = False, progress: Callable[[int], object] = lambda done: None) -> dict:
    """Searches every batch and writes one JSON line per problem to `out` as each batch finishes.

    Each batch is synced (on a bucket, `gs://...`, uploaded at most every LineLog.upload_every_s
    and at the end), so a crash later loses nothing synced so far. On several processes every
    one searches (its devices' share of each batch) and process 0 alone writes. Returns the
    totals: problems, answered (with a reference answer), correct, tokens, flops, seconds.
    `progress(n)` is told the problems each batch finished.
    """
    log = LineLog(out, fresh=True) if jax.process_index() == 0 else None
    totals = {"problems": 0, "answered": 0, "correct": 0, "tokens": 0.0, "flops": 0.0, "seconds": 0.0}
    try:
        for batch, records, seconds in search_batches(searcher, spec, batches, vocab, search_cfg, keep_candidates):
            for record in records:
                if log is not None:
                    log.write(json.dumps(record, ensure_ascii=False))
                totals["problems"] += 1
                totals["answered"] += record["correct"] is not None
                totals["correct"] += bool(record["correct"])
                totals["tokens"] += record["tokens"]
                totals["flops"] += record["policy_flops"] + record["scorer_flops"]
            if log is not None and not log.remote:
                log.sync()
            totals["seconds"] += seconds
            progress(len(batch.rows))
    finally:
        if log is not None:
            log.close()
    return totals
