"""`ponder bench`: throughput benchmarks that print ratios against a reference measured in the same run."""

from __future__ import annotations

import argparse
import time

from tools.cli import add_config_arguments, config_from_args

# One stream per task and trace style, at a difficulty a small model trains on.
DATA_COMPONENTS = (
    "arithmetic_d3_direct",
    "countdown_d3_direct",
    "countdown_d3_search",
    "sudoku_d1_direct",
    "sudoku_d3_direct",
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `ponder bench {data}`."""
    parser = subparsers.add_parser("bench", help="measure throughput (data pipeline, ...)")
    commands = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    data = commands.add_parser(
        "data",
        help="examples/s and tokens/s of each task's input pipeline",
        description="Reads BATCHES batches (after 2 warm-up batches) from the pipeline of each "
        "task component with the config's data settings (seq_len, batch_size, packing) and "
        "prints examples/s and tokens/s. Compare tokens/s with the trainer's.",
    )
    add_config_arguments(data)
    data.add_argument("--batches", type=int, default=20)
    data.add_argument("--components", nargs="+", default=list(DATA_COMPONENTS), metavar="NAME")
    data.set_defaults(func=run_data)


def measure_pipeline(data_cfg, seed: int, batches: int) -> dict[str, float]:
    """Examples/s and (non-padding) tokens/s of one host's pipeline over `batches` batches."""
    import numpy as np

    from train.data import Pipeline

    pipeline = Pipeline(data_cfg, seed=seed, shard_index=0, num_shards=1)
    for _ in range(2):
        next(pipeline)
    examples = tokens = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(pipeline)
        segments = batch["segment_ids"]
        examples += int(sum(len(np.unique(row[row > 0])) for row in segments))
        tokens += int((segments > 0).sum())
    seconds = time.perf_counter() - start
    return {"examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds}


def run_data(args: argparse.Namespace) -> int:
    """Prints one row per component."""
    cfg = config_from_args(args)
    print(f"seq_len {cfg.data.seq_len}, batch {cfg.data.batch_size}, pack {cfg.data.pack}, {args.batches} batches")
    print(f"{'component':<24} {'examples/s':>12} {'tokens/s':>12}")
    for name in args.components:
        data_cfg = cfg.data.model_copy(update={"mixture": {name: 1.0}})
        result = measure_pipeline(data_cfg, cfg.seed, args.batches)
        print(f"{name:<24} {result['examples_per_s']:>12,.0f} {result['tokens_per_s']:>12,.0f}")
    return 0
