"""`ponder search`: a search strategy over every problem of a file, from a checkpoint; one JSON line per problem.

    ponder search --checkpoint runs/small --problems problems.jsonl --strategy beam --budget 4096 --out results.jsonl

Problems are read line by line (a bad line is reported with its number and skipped) and
searched in batches by `search/runner.py`; this file parses, loads and prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.cli import add_config_arguments, report


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


def run(args: argparse.Namespace) -> int:
    """Searches every problem, writes the results, prints a summary."""
    import jax
    from tqdm import tqdm

    from configs.fileio import run_path
    from configs.load import load_config
    from model.sharding import make_mesh
    from search import runner
    from search.spec import spec_from_config
    from search.state import Models
    from train.checkpoint import CheckpointError, find_run_config, load_params
    from train.data import get_vocabulary
    from train.reward import search_scorer
    from train.state import state_layout

    checkpoint, problems_path = run_path(args.checkpoint), Path(args.problems)
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

    problems, skipped = runner.read_problems_for_search(problems_path, vocab, search_cfg)
    for skip in skipped:
        report(f"ponder search: skipped {skip}", file=sys.stderr)
    if not problems:
        return _error(f"{problems_path}: no problem to search")
    if search_cfg.scorer == "oracle":
        report("ponder search: ORACLE scorer: steps are scored by the task's own checker and verifier, "
              "which see the reference answer; accuracy is an upper bound, not a result", file=sys.stderr)

    mesh = make_mesh(cfg.mesh)
    layout = state_layout(cfg, mesh)
    try:
        params = load_params(checkpoint, layout.abstract["params"])
        scorer, scorer_params = search_scorer(cfg, vocab, mesh)
    except CheckpointError as err:
        return _error(str(err))
    except ValueError as err:  # the reward model does not fit the policy
        return _error(str(err))
    searcher = runner.Searcher(Models(layout.graphdef, cfg.model, scorer), params, scorer_params, mesh)
    spec = spec_from_config(search_cfg, vocab)
    batches = runner.plan_batches(problems, vocab, search_cfg.prompt_buckets, search_cfg.max_len,
                                  min(search_cfg.batch_size, len(problems)), runner.batch_shards(cfg, mesh))
    if search_cfg.budget:
        spec, pilot = runner.size_by_pilot(searcher, spec, batches[0], search_cfg, cfg.model)
        report("\n".join(pilot), flush=True)

    out = run_path(args.out)
    quiet = args.no_progress or jax.process_index() > 0  # one bar per job
    with tqdm(total=len(problems), unit="problem", desc=spec.strategy, disable=quiet, leave=False) as bar:
        totals = runner.write_results(searcher, spec, batches, vocab, search_cfg, out,
                                      keep_candidates=args.keep_candidates, progress=bar.update)
    _print_summary(totals, len(skipped), searcher, spec, search_cfg, out)
    return 0


def _print_summary(totals: dict, skipped: int, searcher, spec, search_cfg, out: Path) -> None:
    from search.spec import STRATEGIES

    problems, strategy = totals["problems"], STRATEGIES[spec.strategy]
    oracle = search_cfg.scorer == "oracle"
    report(f"ponder search: {spec.strategy} {strategy.size(spec)}"
          + f", scorer {'ORACLE' if oracle else search_cfg.scorer}, select {search_cfg.select}")
    report(f"  {spec.strategy}: {strategy.description}" + (" (the scorer steers it)" if strategy.guided else ""))
    accuracy = f"{totals['correct'] / totals['answered']:.3f} ({totals['correct']}/{totals['answered']})" \
        if totals["answered"] else "n/a (no reference answers)"
    report(f"  problems: {problems}, skipped lines: {skipped}")
    report(f"  accuracy: {accuracy}" + ("  <- ORACLE scorer: an upper bound, not a result" if oracle else ""))
    report(f"  tokens/problem: {totals['tokens'] / problems:.1f}, FLOPs/problem: {totals['flops'] / problems:.3g}")
    rate = problems / totals["seconds"] if totals["seconds"] else float("inf")
    report(f"  problems/s: {rate:.3g} (search {totals['seconds']:.1f} s)")
    report(f"  compiles: {len(searcher.compiled)} ({searcher.compile_seconds:.1f} s)")
    report(f"  results: {out}")


def _error(message: str) -> int:
    print(f"ponder search: error: {message}", file=sys.stderr)
    return 2
