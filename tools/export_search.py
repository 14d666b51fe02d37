"""`ponder export search`: the compiled search program as a `jax.export` artifact (see search/export.py).

    ponder export search --checkpoint runs/small --out beam.ponder search.strategy=beam search.n=8
    ponder search --compiled beam.ponder --params runs/small --problems problems.jsonl --out results.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time

from tools.cli import add_config_arguments, report

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Registers `ponder export search` under `ponder export`."""
    parser = commands.add_parser(
        "search", help="the compiled search program, serialized with jax.export",
        description="Exports the whole search `ponder search` would run with these settings (search.strategy, "
        "its sizes, search.scorer, search.batch_size, search.prompt_buckets up to search.max_len) as "
        "one zip file: a jax.export program per prompt width, lowered for every --platforms entry "
        "(without running on any), and the versions, config, vocabulary, mesh and parameter shapes "
        "it was built with, for the devices this process sees (`ponder --devices N` simulates a "
        "target's N on CPU). `ponder search --compiled FILE --params DIR` runs it without tracing "
        "the model, on the same number of devices, with the same jax, and gives the results of "
        "the live search. The params are inputs, not part of the file. Refused: the oracle and checker scorers "
        "(Python host callbacks) and search.budget (its pilot run sizes the strategy: set n or "
        "simulations instead). On CPU the program calls ponder's native decode kernels, which "
        "the loading process registers; PONDER_CPU_KERNELS=0 exports XLA's ops in their place.")
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="run dir, checkpoints/ dir or step dir whose config (unless --config) is exported; "
                        "its params are not read (they are the program's inputs)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the artifact (a zip file), written atomically")
    parser.add_argument("--platforms", default="cpu", metavar="LIST",
                        help=f"comma-separated platforms to lower for, of {', '.join(PLATFORMS)} (default: cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Exports the search program."""
    from configs.fileio import atomic_path, run_path
    from model.distributed import ponder_version
    from model.sharding import make_mesh
    from search import runner
    from search.export import ArtifactError, export_search, prompt_widths, write_artifact
    from search.spec import STRATEGIES, spec_from_config
    from search.state import Models
    from tools.search import search_config
    from train.checkpoint import find_run_config
    from train.data import get_vocabulary
    from train.data.vocab import vocab_id
    from train.reward import search_scorer
    from train.state import state_layout

    start = time.perf_counter()
    platforms = [name.strip() for name in args.platforms.split(",") if name.strip()]
    if not platforms or set(platforms) - set(PLATFORMS):
        return _error(f"--platforms {args.platforms}: expected a comma-separated list of {', '.join(PLATFORMS)}")
    checkpoint = run_path(args.checkpoint)
    config_path = args.config or find_run_config(checkpoint)
    if config_path is None:
        return _error(f"no config.yaml in {checkpoint} or the run directory above it; pass --config")
    cfg = search_config(config_path, args)
    search_cfg = cfg.search
    if search_cfg.budget:
        return _error(f"search.budget={search_cfg.budget:g} sizes the strategy from a pilot search at run time, "
                      "which an exported program cannot do: set its size (search.n, or search.simulations for "
                      "mcts) instead")
    vocab = get_vocabulary(cfg.data.vocab)
    mesh = make_mesh(cfg.mesh)
    layout = state_layout(cfg, mesh)
    try:
        scorer, scorer_params = search_scorer(cfg, vocab, mesh)
        spec = spec_from_config(search_cfg, vocab)
        shards = runner.batch_shards(cfg, mesh)
        batch_size = -(-search_cfg.batch_size // shards) * shards
        widths = prompt_widths(search_cfg.prompt_buckets, search_cfg.max_len, search_cfg.max_step_tokens)
        info = {"ponder": ponder_version(), "config": cfg.model_dump(mode="json"),
                "vocab": vocab_id(cfg.data.vocab), "checkpoint": str(checkpoint)}
        artifact = export_search(spec, Models(layout.graphdef, cfg.model, scorer), layout.abstract["params"],
                                 scorer_params, mesh, batch_size, widths, platforms, info)
    except (ArtifactError, ValueError) as err:
        return _error(str(err))
    with atomic_path(run_path(args.out)) as tmp:
        write_artifact(artifact, tmp)
    kernels = artifact.metadata["cpu_kernels"]["targets"]
    report(f"ponder export search: {spec.strategy} {STRATEGIES[spec.strategy].size(spec)}, scorer "
           f"{search_cfg.scorer}, batch {batch_size}, prompt widths {', '.join(map(str, widths))}")
    report(f"  platforms: {', '.join(platforms)}; {mesh.size} devices ("
           + " ".join(f"{axis}={size}" for axis, size in mesh.shape.items()) + ")"
           + (f"; calls ponder's CPU kernels {', '.join(kernels)}" if kernels else ""))
    report(f"  written: {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def _error(message: str) -> int:
    print(f"ponder export search: error: {message}", file=sys.stderr)
    return 2
