"""`ponder rl`: GRPO or expert iteration on verifiable rewards, from a policy checkpoint, on the config's mesh.

    ponder rl --config configs/experiments/rl_tiny.yaml rl.init_from=runs/tiny
    ponder rl --config configs/experiments/rl_tiny.yaml rl.init_from=runs/tiny rl.algorithm=expert_iteration
"""

from __future__ import annotations

import argparse
import sys

from tools.cli import add_config_arguments, config_from_args, report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `ponder rl`."""
    parser = subparsers.add_parser(
        "rl",
        help="reinforcement learning with verifiable rewards (GRPO, expert iteration) from a policy",
        description="Improves a policy (rl.init_from: a `ponder train` run) on the train problems of "
        "data.mixture with rewards from each task's verifier. Every step samples rl.group_size completions "
        "for each of rl.prompts_per_step problems with the jitted sampler on the config's mesh, then "
        "rl.algorithm=grpo takes rl.epochs x rl.minibatches PPO-style clipped optimizer steps on "
        "group-relative advantages with a KL penalty (rl.kl_coef, rl.kl_estimator) to the starting policy, "
        "and rl.algorithm=expert_iteration fine-tunes on the completions that verify (rl.search=beam|dvts|mcts "
        "adds the search's verified chain per problem). Completions that hit rl.max_new_tokens get no reward. "
        "rl.run_dir receives config.yaml, checkpoints/ (params, optimizer state, prompt stream position and "
        "RNG), metrics.jsonl (reward, pass@1 on validation problems, KL, clip fraction, entropy, lengths, "
        "tokens/s, verifier reasons), rollouts.jsonl and tensorboard/; an existing run resumes from its newest "
        "checkpoint with the prompt stream where it was. SIGTERM saves and exits 0. Every rl.* key is "
        "documented in configs/base.yaml.",
    )
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics are still written)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs RL; prints the final metrics."""
    from train.checkpoint import CheckpointError
    from train.data import DataStateError
    from train.rl import RLError, train_rl
    from train.trainer import TrainingError

    cfg = config_from_args(args)
    try:
        result = train_rl(cfg, show_progress=not args.no_progress)
    except (RLError, TrainingError, DataStateError, CheckpointError, ValueError) as err:
        print(f"ponder rl: error: {err}", file=sys.stderr)
        return 2
    keys = ("step", "stopped", "pass_at_1_start", "pass_at_1", "reward_mean", "kl", "clip_fraction", "entropy",
            "completion_length", "rollout_tokens_per_s", "train_tokens_per_s")
    shown = {k: f"{result[k]:.4g}" if isinstance(result[k], float) else result[k] for k in keys if k in result}
    report("ponder rl: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return 0
