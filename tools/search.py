"""`ponder search`: a search strategy over every problem of a file, from a checkpoint; one JSON line per problem.

    ponder search --checkpoint runs/small --problems problems.jsonl --strategy beam --budget 4096 --out results.jsonl
    ponder search --compiled beam.ponder --params runs/small --problems problems.jsonl --out results.jsonl

Problems are read line by line (a bad line is reported with its number and skipped) and
searched in batches by `search/runner.py`; this file parses, loads and prints. With
--compiled the search is a program `ponder export search` wrote (`search/export.py`): its
settings are the artifact's, and the model's Python code is never traced.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tools.cli import add_config_arguments, report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `ponder search`."""
    parser = subparsers.add_parser(
        "search",
        help="search over reasoning steps for every problem of a file (offline evaluation)",
        description="Runs search.strategy (greedy, sample, best_of_n, beam, dvts, mcts) over a problem file "
        "(ponder data export) with the policy of a checkpoint (a run directory, its checkpoints/ "
        "or one step directory) and the scorer search.scorer, and writes one JSON line per problem "
        "to --out as each batch finishes. Without --config, the config.yaml of the checkpoint's run "
        "directory is used; search.* keys can be overridden as key=value. --budget N sizes the "
        "strategy (n, or simulations for mcts) to about N tokens per problem (FLOPs with "
        "search.budget_unit=flops), measured by a pilot `sample` on the first batch. "
        "With --compiled FILE (from `ponder export search`) instead of --checkpoint, the search is that "
        "program with the params of --params: its strategy, sizes, scorer, buckets and batch size are "
        "the artifact's (no --config, overrides, --strategy or --budget), and nothing is traced.",
    )
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", metavar="PATH", help="run dir, checkpoints/ dir or step dir")
    parser.add_argument("--compiled", metavar="FILE", help="a search program from `ponder export search`, "
                        "in place of --checkpoint")
    parser.add_argument("--params", metavar="PATH", help="with --compiled: the policy's params (a run dir, its "
                        "checkpoints/, a step dir or a `ponder export params` directory)")
    parser.add_argument("--problems", required=True, metavar="JSONL", help="problem file (ponder data export)")
    parser.add_argument("--out", required=True, metavar="JSONL", help="results, one JSON object per problem")
    parser.add_argument("--strategy", help="search.strategy: greedy, sample, best_of_n, beam, dvts or mcts")
    parser.add_argument("--budget", type=float, help="search.budget: tokens (or FLOPs) per problem; 0: off")
    parser.add_argument("--keep-candidates", action="store_true", help="also write every candidate chain's answer")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Searches every problem, writes the results, prints a summary."""
    from configs.fileio import run_path
    from train.checkpoint import find_run_config

    if args.compiled:
        return run_compiled(args)
    if args.checkpoint is None:
        return _error("give --checkpoint (a live search) or --compiled (an exported one)")
    if args.params:
        return _error("--params goes with --compiled; a live search reads the params of --checkpoint")
    start = time.perf_counter()
    checkpoint, problems_path = run_path(args.checkpoint), Path(args.problems)
    if not checkpoint.is_dir():
        return _error(f"{checkpoint}: no such checkpoint directory")
    if not problems_path.is_file():
        return _error(f"{problems_path}: no such problem file")
    config_path = args.config or find_run_config(checkpoint)
    if config_path is None:
        return _error(f"no config.yaml in {checkpoint} or the run directory above it; pass --config")
    return _search_live(args, checkpoint, problems_path, search_config(config_path, args), start)


def search_config(config_path, args: argparse.Namespace):
    """The config of a search: `config_path` with the overrides, --strategy and --budget of `args`."""
    from configs.load import load_config

    overrides = list(args.overrides)
    overrides += [f"search.strategy={args.strategy}"] if getattr(args, "strategy", None) else []
    overrides += [f"search.budget={args.budget}"] if getattr(args, "budget", None) is not None else []
    return load_config(config_path, overrides)


def _search_live(args, checkpoint, problems_path: Path, cfg, start: float) -> int:
    from model.sharding import make_mesh
    from search import runner
    from search.spec import spec_from_config
    from search.state import Models
    from train.checkpoint import CheckpointError, load_params
    from train.data import get_vocabulary
    from train.reward import search_scorer
    from train.state import state_layout

    search_cfg = cfg.search
    vocab = get_vocabulary(cfg.data.vocab)
    problems, skipped = _read_problems(problems_path, vocab, search_cfg)
    if not problems:
        return _error(f"{problems_path}: no problem to search")
    mesh = make_mesh(cfg.mesh)
    layout = state_layout(cfg, mesh)
    try:
        params = load_params(checkpoint, layout.abstract["params"])
        scorer, scorer_params = search_scorer(cfg, vocab, mesh)
        scorer.check_problems([problem for _, problem in problems])  # checker: before any search runs
    except CheckpointError as err:
        return _error(str(err))
    except ValueError as err:  # the reward model does not fit the policy, or the scorer cannot score these problems
        return _error(str(err))
    searcher = runner.Searcher(Models(layout.graphdef, cfg.model, scorer), params, scorer_params, mesh)
    spec = spec_from_config(search_cfg, vocab)
    batches = runner.plan_batches(problems, vocab, search_cfg.prompt_buckets, search_cfg.max_len,
                                  min(search_cfg.batch_size, len(problems)), runner.batch_shards(cfg, mesh))
    if search_cfg.budget:
        spec, pilot = runner.size_by_pilot(searcher, spec, batches[0], search_cfg, cfg.model)
        report("\n".join(pilot), flush=True)
    return _search_and_report(args, searcher, spec, batches, vocab, search_cfg, len(problems), len(skipped), start)


def run_compiled(args: argparse.Namespace) -> int:
    """`ponder search --compiled FILE --params DIR`: the exported program over the problems."""
    from configs.fileio import run_path
    from configs.schema import Config
    from model.sharding import make_mesh
    from search import runner
    from search.export import ArtifactError, check_runtime, read_artifact
    from train.checkpoint import CheckpointError
    from train.data import get_vocabulary
    from train.data.vocab import vocab_id

    start = time.perf_counter()
    changes = [name for name, given in (("--checkpoint", args.checkpoint), ("--config", args.config),
                                        ("key=value overrides", args.overrides), ("--strategy", args.strategy),
                                        ("--budget", args.budget is not None)) if given]
    if changes:
        return _error(f"{', '.join(changes)} cannot go with --compiled: the program's settings are fixed when it "
                      "is exported (`ponder export search ... key=value`)")
    if not args.params:
        return _error("--compiled needs --params (the run or params directory to search with)")
    params_path, problems_path = run_path(args.params), Path(args.problems)
    if not problems_path.is_file():
        return _error(f"{problems_path}: no such problem file")
    try:
        artifact = read_artifact(args.compiled)
        cfg = Config.model_validate(artifact.metadata["config"])
        mesh = make_mesh(cfg.mesh)
        check_runtime(artifact, vocab_id(cfg.data.vocab), mesh)
        abstract_params, abstract_scorer = artifact.abstract_params(mesh)
        params = _load_params(artifact, "params", params_path, abstract_params)
        scorer_params = None if abstract_scorer is None else _load_params(
            artifact, "scorer_params", run_path(cfg.search.reward_checkpoint), abstract_scorer)
    except (ArtifactError, CheckpointError) as err:
        return _error(str(err))
    loaded = time.perf_counter() - start
    search_cfg, vocab = cfg.search, get_vocabulary(cfg.data.vocab)
    problems, skipped = _read_problems(problems_path, vocab, search_cfg)
    if not problems:
        return _error(f"{problems_path}: no problem to search")
    searcher = runner.Searcher(None, params, scorer_params, mesh, programs=artifact.program)
    batches = runner.plan_batches(problems, vocab, search_cfg.prompt_buckets, search_cfg.max_len, artifact.batch_size)
    report(f"ponder search: {args.compiled}: exported {artifact.metadata['created']} for "
           f"{', '.join(artifact.metadata['platforms'])}; loaded with the params of {params_path} in {loaded:.1f} s")
    return _search_and_report(args, searcher, artifact.spec, batches, vocab, search_cfg, len(problems), len(skipped),
                              start)


def _load_params(artifact, which: str, path, abstract):
    """The params at `path` onto the program's shardings, refused (ArtifactError naming the first
    misfit) when the checkpoint holds another model's; its shapes are checked before anything is read."""
    from search.export import check_params, param_shapes
    from train.checkpoint import load_params, saved_param_shapes

    try:
        saved = saved_param_shapes(path)
    except (OSError, ValueError, KeyError):  # no metadata to check: load_params says what is wrong
        saved = None
    if saved is not None:  # dtypes may differ: restoring casts to the program's
        check_params(artifact, which, saved, f"the checkpoint {path}", dtypes=False)
    params = load_params(path, abstract)
    check_params(artifact, which, param_shapes(params), f"the params of {path}")
    return params


def _read_problems(path: Path, vocab, search_cfg) -> tuple[list, list[str]]:
    from search import runner

    problems, skipped = runner.read_problems_for_search(path, vocab, search_cfg)
    for skip in skipped:
        report(f"ponder search: skipped {skip}", file=sys.stderr)
    if problems and search_cfg.scorer == "oracle":
        report("ponder search: ORACLE scorer: steps are scored by the task's own checker and verifier, "
               "which see the reference answer; accuracy is an upper bound, not a result", file=sys.stderr)
    return problems, skipped


def _search_and_report(args, searcher, spec, batches, vocab, search_cfg, problems: int, skipped: int,
                       start: float) -> int:
    """Writes the results of every batch, then the summary; `start`: when the command began its work."""
    import jax
    from tqdm import tqdm

    from configs.fileio import run_path
    from search import runner

    out = run_path(args.out)
    quiet = args.no_progress or jax.process_index() > 0  # one bar per job
    first_result: list[float] = []

    def progress(done: int) -> None:
        if not first_result:
            first_result.append(time.perf_counter() - start)
        bar.update(done)

    with tqdm(total=problems, unit="problem", desc=spec.strategy, disable=quiet, leave=False) as bar:
        totals = runner.write_results(searcher, spec, batches, vocab, search_cfg, out,
                                      keep_candidates=args.keep_candidates, progress=progress)
    _print_summary(totals, skipped, searcher, spec, search_cfg, out, first_result[0])
    return 0


def _print_summary(totals: dict, skipped: int, searcher, spec, search_cfg, out: Path, first_result_s: float) -> None:
    from search.spec import STRATEGIES

    problems, strategy = totals["problems"], STRATEGIES[spec.strategy]
    oracle = search_cfg.scorer == "oracle"
    report(f"ponder search: {spec.strategy} {strategy.size(spec)}"
          + f", scorer {SCORER_LABELS.get(search_cfg.scorer, search_cfg.scorer)}, select {search_cfg.select}")
    report(f"  {spec.strategy}: {strategy.description}" + (" (the scorer steers it)" if strategy.guided else ""))
    accuracy = f"{totals['correct'] / totals['answered']:.3f} ({totals['correct']}/{totals['answered']})" \
        if totals["answered"] else "n/a (no reference answers)"
    report(f"  problems: {problems}, skipped lines: {skipped}")
    report(f"  accuracy: {accuracy}" + ("  <- ORACLE scorer: an upper bound, not a result" if oracle else ""))
    report(f"  tokens/problem: {totals['tokens'] / problems:.1f}, FLOPs/problem: {totals['flops'] / problems:.3g}")
    rate = problems / totals["seconds"] if totals["seconds"] else float("inf")
    report(f"  problems/s: {rate:.3g} (search {totals['seconds']:.1f} s)")
    report(f"  compiles: {len(searcher.compiled)} ({searcher.compile_seconds:.1f} s)")
    report(f"  start-up: {first_result_s:.1f} s to the first batch's results (load, compile, search; "
           f"{first_result_s - searcher.compile_seconds:.1f} s without compiling)")
    report(f"  results: {out}")


SCORER_LABELS = {"oracle": "ORACLE", "checker": "checker (prompt-only verifier)"}  # in the summary


def _error(message: str) -> int:
    print(f"ponder search: error: {message}", file=sys.stderr)
    return 2
