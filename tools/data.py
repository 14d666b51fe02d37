"""`ponder data`: export problem files, check them, and show what the training pipeline feeds the model."""

from __future__ import annotations

import argparse
import sys

from tools.cli import add_config_arguments, config_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `ponder data {export,check,show}`."""
    parser = subparsers.add_parser("data", help="export and check problem files; show pipeline batches")
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    export = commands.add_parser(
        "export",
        help="write generated problems to a JSON-lines file",
        description="Write NUM problems of TASK at DIFFICULTY from SPLIT, one JSON object per line "
        "(id, task, difficulty, split, prompt, answer, steps, meta). Deterministic: the same "
        "arguments always write the same file. Used by offline search and RL.",
    )
    export.add_argument("--task", required=True, help="arithmetic, countdown or sudoku")
    export.add_argument("--difficulty", type=int, required=True)
    export.add_argument("--split", default="test", choices=("train", "validation", "test"))
    export.add_argument("--num", type=int, required=True, help="number of problems")
    export.add_argument("--start", type=int, default=0, help="index of the first problem (default 0)")
    export.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    export.add_argument("--out", required=True, help="output .jsonl path (written atomically)")
    export.set_defaults(func=run_export)

    check = commands.add_parser(
        "check",
        help="validate a problem file line by line",
        description="Validate each line of a problem file. A bad line (invalid JSON or fields, not UTF-8, "
        "too long, nested too deeply, NaN or Infinity, a duplicate key) is named by file, line and reason; "
        "without --skip-bad-lines the first one is an error (exit 2), with it each is reported and skipped "
        "(exit 1).",
    )
    check.add_argument("path")
    check.add_argument("--skip-bad-lines", action="store_true", help="report malformed lines instead of failing")
    check.set_defaults(func=run_check)

    show = commands.add_parser(
        "show",
        help="print decoded examples from the training pipeline a config builds",
        description="Decode the first rows of the pipeline's first batch; solution tokens (loss "
        "on) are wrapped in [[ ]] so the loss mask is visible.",
    )
    add_config_arguments(show)
    show.add_argument("--rows", type=int, default=2)
    show.add_argument("--split", default="train", choices=("train", "validation", "test"))
    show.set_defaults(func=run_show)


def run_export(args: argparse.Namespace) -> int:
    """Generates and writes the problems; prints where they went."""
    from tqdm import tqdm

    from tasks import get_task
    from tasks.files import write_problems

    task = get_task(args.task)
    indices = range(args.start, args.start + args.num)
    problems = [
        task.generate(args.seed, index, args.difficulty, args.split)
        for index in tqdm(indices, desc=f"{args.task} d{args.difficulty} {args.split}", unit="problem", leave=False)
    ]
    write_problems(args.out, problems)
    print(f"wrote {len(problems)} {args.task} problems (difficulty {args.difficulty}, {args.split}) to {args.out}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Reads a problem file; prints a summary and any skipped lines."""
    from tasks.files import read_problems

    problems, bad = read_problems(args.path, skip_bad_lines=args.skip_bad_lines)
    for report in bad:
        print(f"skipped {report}", file=sys.stderr)
    print(f"{args.path}: {len(problems)} problems" + (f", {len(bad)} bad lines skipped" if bad else ""))
    return 1 if bad else 0


def run_show(args: argparse.Namespace) -> int:
    """Prints decoded rows of one pipeline batch, segment by segment."""
    import numpy as np

    from train.data import Pipeline

    cfg = config_from_args(args)
    pipeline = Pipeline(cfg.data, seed=cfg.seed, split=args.split, shard_index=0, num_shards=1)
    batch = next(pipeline)
    for row in range(min(args.rows, pipeline.host_batch_size)):
        print(f"--- row {row}")
        for segment in np.unique(batch["segment_ids"][row]):
            if segment == 0:
                continue
            where = batch["segment_ids"][row] == segment
            targets, mask = batch["targets"][row][where], batch["loss_mask"][row][where]
            print(f"[segment {segment}, {where.sum()} tokens]")
            print(_render(pipeline.vocab, targets, mask))
    return 0


def _render(vocab, tokens, mask) -> str:
    """Decoded text with the loss-bearing stretches wrapped in [[ ]]."""
    pieces, start = [], 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or mask[i] != mask[start]:
            text = vocab.decode([int(t) for t in tokens[start:i] if t > 1])
            pieces.append(f"[[{text}]]" if mask[start] else text)
            start = i
    return "".join(pieces)
