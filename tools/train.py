"""`ponder train`: pretraining and SFT of the decoder on the config's mesh."""

from __future__ import annotations

import argparse
import sys

from tools.cli import add_config_arguments, config_from_args, report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `ponder train`."""
    parser = subparsers.add_parser(
        "train",
        help="pretrain or fine-tune (SFT) the model; resumes a run directory with checkpoints",
        description="Train with one ahead-of-time compiled, sharded step on the config's mesh. "
        "data.objective picks pretraining (loss on every token) or SFT (loss on solutions). "
        "train.run_dir receives config.yaml, checkpoints/, metrics.jsonl and tensorboard/; "
        "if it already has checkpoints the run resumes from the newest good one. SIGTERM "
        "saves a checkpoint and exits 0. train.init_from=DIR starts from another run's params.",
    )
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics are still written)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Trains; prints the final metrics."""
    from train.checkpoint import CheckpointError
    from train.data import DataStateError
    from train.reward_data import RewardDataError
    from train.trainer import TrainingError, train

    cfg = config_from_args(args)
    try:
        result = train(cfg, show_progress=not args.no_progress)
    except (TrainingError, DataStateError, CheckpointError, RewardDataError) as err:
        print(f"ponder train: error: {err}", file=sys.stderr)
        return 2
    shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in result.items()}
    report("ponder train: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return 0
