"""`ponder reward {data,train,eval}`: reward-model data from a policy, PRM/ORM training, evaluation.

    ponder reward data --checkpoint runs/small --out runs/prm-data.jsonl --problems 400 --samples 8
    ponder reward train --data runs/prm-data.jsonl --policy runs/small --out runs/small-prm train.steps=200
    ponder reward eval --checkpoint runs/small-prm --data runs/prm-test.jsonl
    ponder search ... search.scorer=reward search.reward_checkpoint=runs/small-prm
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from tools.cli import add_config_arguments, report

AGGREGATES = ("min", "last", "product")  # train.reward.AGGREGATES (not imported here: it imports jax)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `ponder reward {data,train,eval}`."""
    parser = subparsers.add_parser(
        "reward", help="process/outcome reward models: label a policy's samples, train, evaluate",
        description="Reward models score reasoning chains: a PRM scores every step (at its newline), an ORM "
        "the whole chain (at its last token). `data` samples a policy and labels the samples, `train` trains "
        "the value head of a ponder transformer on them with the usual trainer, `eval` measures step-label "
        "AUC and best-of-N selection. A trained run directory is what search.reward_checkpoint takes.",
    )
    commands = parser.add_subparsers(dest="reward_command", metavar="SUBCOMMAND", required=True)

    data = commands.add_parser(
        "data", help="sample a policy on train-split problems and label every step (JSONL)",
        description="Samples --samples completions per problem from the policy of --checkpoint (jitted, batched "
        "generation) on --problems problems of --split, shared over the policy config's data.mixture task "
        "components by rate. Each record gets the outcome (the task's verifier) and one label per step: from the "
        "task's step checker (--label-source auto or checker), or by Monte-Carlo (mc, or auto on a task without "
        "a checker): --mc-rollouts completions from the step's prefix, the label being the fraction that verify "
        "(--labels soft) or whether any does (hard). Records are appended to OUT.partial as each chunk of "
        "problems finishes; rerunning the same command resumes there; OUT appears (by rename) when all are done.",
    )
    add_config_arguments(data)
    data.add_argument("--checkpoint", required=True, metavar="RUN", help="the policy: run dir, checkpoints/ or step")
    data.add_argument("--out", required=True, metavar="JSONL", help="the reward data file to write")
    data.add_argument("--problems", type=int, default=200, metavar="N", help="problems to sample (default 200)")
    data.add_argument("--samples", type=int, default=4, metavar="K", help="completions per problem (default 4)")
    data.add_argument("--mc-rollouts", type=int, default=4, metavar="R", help="rollouts per step for MC labels")
    data.add_argument("--labels", choices=("soft", "hard"), default="soft", help="MC label: fraction or any verified")
    data.add_argument("--label-source", choices=("auto", "checker", "mc"), default="auto",
                      help="auto: the step checker where the task has one, else MC (default)")
    data.add_argument("--split", choices=("train", "validation", "test"), default="train")
    data.add_argument("--start", type=int, default=100_000, metavar="I",
                      help="first problem index of each task component (default 100000: past what SFT consumes)")
    data.add_argument("--max-new-tokens", type=int, default=128, help="tokens per completion and rollout")
    data.add_argument("--temperature", type=float, default=1.0)
    data.add_argument("--rows", type=int, default=64, help="rows per jitted generate call")
    data.add_argument("--seed", type=int, default=0, help="sampling seed")
    data.add_argument("--no-progress", action="store_true")
    data.set_defaults(func=run_data)

    train = commands.add_parser(
        "train", help="train a PRM or ORM (the value head) on a reward data file",
        description="Trains the value head (model.value_head) of a ponder transformer with the sharded trainer "
        "(data.objective=reward: binary cross-entropy at label positions; checkpoints, metrics.jsonl, "
        "TensorBoard and resume as for `ponder train`). With --policy the model starts from the policy's params "
        "(the value head fresh) and, without --config, takes the policy run's config; --from-scratch keeps the "
        "config but not the params. reward.eval_fraction of the problems are held out; the evaluation on them "
        "is printed at the end and written to OUT/reward_eval.json. Overrides: e.g. train.steps=200.",
    )
    add_config_arguments(train)
    train.add_argument("--data", required=True, metavar="JSONL", help="reward data (ponder reward data)")
    train.add_argument("--out", required=True, metavar="RUN_DIR", help="the reward model's run directory")
    train.add_argument("--policy", metavar="RUN", help="initialise from this policy run (and take its config)")
    train.add_argument("--from-scratch", action="store_true", help="do not take params from --policy")
    train.add_argument("--kind", choices=("prm", "orm"), default="prm", help="process (per step) or outcome model")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=run_train)

    evaluate = commands.add_parser(
        "eval", help="step-label AUC and best-of-N selection accuracy of a reward model on a data file",
        description="Scores every record of --data with the reward model of --checkpoint and reports step-label "
        "AUC and accuracy, outcome AUC, and per problem (its records are the N candidates) the accuracy of "
        "one sample, majority vote, the best candidate by min/last/product of its step scores and the "
        "score-weighted vote.",
    )
    evaluate.add_argument("--checkpoint", required=True, metavar="RUN", help="a reward model run (ponder reward train)")
    evaluate.add_argument("--data", required=True, metavar="JSONL", help="reward data to evaluate on (held out)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    evaluate.set_defaults(func=run_eval)


def run_data(args: argparse.Namespace) -> int:
    """Samples and labels; prints a summary of the file."""
    if min(args.problems, args.samples, args.rows, args.max_new_tokens) < 1 or args.mc_rollouts < 0:
        return _error("--problems, --samples, --rows and --max-new-tokens must be >= 1, --mc-rollouts >= 0")
    from train.checkpoint import CheckpointError
    from train.policy import load_policy
    from train.problems import plan_problems
    from train.reward_labels import LabelSettings, build_reward_data

    try:
        settings = LabelSettings(args.samples, args.mc_rollouts, args.labels, args.label_source, args.max_new_tokens,
                                 args.temperature, args.rows, args.seed)
        policy = load_policy(args.checkpoint, args.config, tuple(args.overrides))
        problems = plan_problems(policy.cfg.data.mixture, args.problems, split=args.split, seed=policy.cfg.seed,
                                 start=args.start)
        summary = build_reward_data(policy, problems, args.out, settings, show_progress=not args.no_progress)
    except (CheckpointError, ValueError) as err:
        return _error(str(err))
    resumed = f" (resumed after {summary['resumed_problems']} problems)" if summary["resumed_problems"] else ""
    print(f"ponder reward data: wrote {args.out}{resumed}: {summary['records']} records, {summary['problems']} "
          f"problems, {summary['steps']} steps; outcome rate {summary['outcome_rate']:.3f}, step label mean "
          f"{summary['step_label_mean']:.3f}; labels from {', '.join(summary['label_sources'])}")
    if "mc_checker_agreement" in summary:
        print(f"  MC labels (any rollout verified) agree with the step checker on "
              f"{summary['mc_checker_agreement']:.1%} of steps")
    if summary["mc_prefixes_too_long"]:
        print(f"  {summary['mc_prefixes_too_long']} step prefixes were too long to roll out from (labelled 0)")
    return 0


def run_train(args: argparse.Namespace) -> int:
    """Trains the reward model; prints the final metrics and the held-out evaluation."""
    if not args.policy and not args.config:
        return _error("give --policy RUN (start from a policy and its config) or --config C (from scratch)")
    if args.from_scratch and not args.policy:
        return _error("--from-scratch only makes sense with --policy (whose config to use)")
    from train.checkpoint import CheckpointError, find_run_config
    from train.data import DataStateError
    from train.reward import train_reward_model
    from train.reward_data import RewardDataError
    from train.trainer import TrainingError

    config = args.config
    if config is None and args.from_scratch:
        from configs.fileio import run_path

        config = find_run_config(run_path(args.policy))
    try:
        result = train_reward_model(args.data, args.out, policy=None if args.from_scratch else args.policy,
                                    config=config, kind=args.kind, overrides=tuple(args.overrides),
                                    show_progress=not args.no_progress)
    except (TrainingError, DataStateError, CheckpointError, RewardDataError, ValueError) as err:
        return _error(str(err))
    shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in result["train"].items()}
    report("ponder reward train: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    if result["eval"]:
        report(f"held-out evaluation ({args.out}/reward_eval.json):")
        report(format_metrics(result["eval"]))
    report(f"use it in search: search.scorer=reward search.reward_checkpoint={args.out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Evaluates a reward model on a data file; prints a table (or JSON)."""
    from train.checkpoint import CheckpointError
    from train.reward import evaluate_reward_model
    from train.reward_data import RewardDataError

    try:
        metrics = evaluate_reward_model(args.checkpoint, args.data)
    except (CheckpointError, RewardDataError, ValueError) as err:
        return _error(str(err))
    print(json.dumps(metrics) if args.json else format_metrics(metrics))
    return 0


def format_metrics(m: dict) -> str:
    """A short table of `train.reward.evaluate` metrics."""

    def f(x: float) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    n = m["samples_per_problem"]
    lines = [
        f"  {m.get('kind', 'reward model')} on {m['records']} samples of {m['problems']} problems ({n:.3g} each)",
        f"  step labels: AUC {f(m['step_auc'])}, accuracy {f(m['step_accuracy'])} "
        f"({m['steps']} steps, {f(m['step_positive_rate'])} labelled right)",
        f"  outcome at the last token: AUC {f(m['outcome_auc'])}, accuracy {f(m['outcome_accuracy'])}",
        f"  selection accuracy over {n:.3g} candidates:",
        f"    one sample          {f(m['single'])}",
        f"    majority vote       {f(m['majority'])}",
        "    best by min / last / product      " + " / ".join(f(m[f"best_{a}"]) for a in AGGREGATES),
        "    weighted by min / last / product  " + " / ".join(f(m[f"weighted_{a}"]) for a in AGGREGATES),
        f"    pass@{n:.3g} (ceiling)      {f(m['pass_at_n'])}",
        f"  right above wrong, same problem ({m.get('within_pairs', 0)} pairs; 0.5 is chance), by min / last / "
        "product: " + " / ".join(f(m.get(f"within_auc_{a}")) for a in AGGREGATES),
    ]
    return "\n".join(lines)


def _error(message: str) -> int:
    print(f"ponder reward: error: {message}", file=sys.stderr)
    return 2
