"""`ponder demo`: the inference-time scaling curve, end to end, from nothing but this repository.

    ponder demo                              # configs/experiments/demo.yaml into runs/demo
    ponder demo --fresh                      # start over
    ponder demo --config experiments/demo_rl  # with a long GRPO stage and its learning curve (make demo-rl)
    ponder demo --config experiments/demo_tiny --run-dir /tmp/demo   # toy size (tests)

Stages, each skipped when its output exists (the screen says so):

1. policy      SFT of the config's policy on its task mixture (`ponder train`)    RUN/policy/
   rl          GRPO from that policy for demo.rl_steps steps (`ponder rl`; 0: none) RUN/rl/
   pass@1      both policies' pass@1: demo.pass_samples samples per test problem RUN/rl/pass_at_1.json
2. reward data the policy's samples on train problems, labelled (`ponder reward data`)  RUN/reward/data.jsonl
               and, with demo.reward_eval_problems, on validation problems         RUN/reward/validation.jsonl
3. reward      a PRM and an ORM from the policy's checkpoint (`ponder reward train`) RUN/reward/{prm,orm}/
               (their AUCs on the validation file: RUN/reward/{prm,orm}/validation_eval.json)
4. search      every strategy at budgets of 1x..Nx the tokens of one sample, on
               demo.problems held-out test problems (`ponder search`)              RUN/search/*.jsonl
5. report      the table, what it shows and the coverage on screen; RUN/results.json, RUN/scaling.png,
               RUN/coverage.png and, with RL, RUN/rl_curve.png (pass@1 and completion length by RL step)

A budget multiple B gives each problem about B times the tokens that one sampled chain
costs on the same problems (measured by the `sample` row), and sizes N, the beams or the
simulations from it; every row reports the tokens it really spent. The `greedy` row (one chain
at temperature 0) and the `sample` row are the baselines: what the demo says each search gains
is measured against the better of the two. coverage.png is pass@k of the largest best-of-N
pool against k, beside each selection rule's accuracy over k of those chains (search/coverage.py).
With an RL stage the table also has `rl/...` rows: demo.rl_strategies run on the RL policy
(same problems, same PRM/ORM); `rl/greedy` and `rl/sample` against `greedy` and `sample` are
single answers before and after RL. One sample per problem is noisy (on 200 problems,
reseeding the same policy moved it by up to 11 points), so pass@1 before and after RL is also
measured as the mean over demo.pass_samples.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from configs.fileio import write_atomic
from tools.cli import add_config_arguments

if TYPE_CHECKING:
    from search.scaling import Row

DEFAULT_CONFIG = "experiments/demo"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `ponder demo`."""
    parser = subparsers.add_parser(
        "demo",
        help="train a policy and reward models, then plot accuracy against thinking compute",
        description="The whole pipeline on CPU: SFT the policy of --config (default "
        f"{DEFAULT_CONFIG}), improve it with demo.rl_steps of GRPO (rl.*; 0: no RL stage), sample "
        "and label reward data, train a PRM and an ORM, run every search strategy at budgets of "
        "1x..Nx the tokens of one sample on demo.problems held-out test problems (and "
        "demo.rl_strategies on the RL policy), then print a table and write results.json, "
        "scaling.png, coverage.png (and with RL rl_curve.png) into the run "
        "directory. Stages whose outputs exist are skipped (re-running after an interruption "
        "continues); --fresh starts over. Settings: the config's demo.* keys (documented in "
        "configs/base.yaml), overridable as key=value.",
    )
    add_config_arguments(parser)
    parser.add_argument("--run-dir", default=None, help="where everything goes (default: demo.run_dir)")
    parser.add_argument("--fresh", action="store_true", help="delete the run directory's outputs and start over")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from configs.load import ConfigError, load_config

    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        run_dir = Path(args.run_dir or cfg.demo.run_dir)
        demo = Demo(cfg, run_dir, show_progress=not args.no_progress)
        if cfg.demo.rl_steps:
            demo.rl_config()  # a bad demo.rl_overrides fails now, not after the policy's training
    except ConfigError as err:
        print(f"ponder demo: error: {err}", file=sys.stderr)
        return 2
    if args.fresh and run_dir.exists():
        _clear(run_dir)
    start = time.perf_counter()
    results = demo.run()
    print(f"ponder demo: done in {(time.perf_counter() - start) / 60:.1f} min; {run_dir / 'results.json'}, "
          f"{run_dir / 'scaling.png'}, {run_dir / 'coverage.png'}")
    return 0 if results else 1


def _clear(run_dir: Path) -> None:
    """Removes what the demo writes (and nothing else) under run_dir."""
    import shutil

    for name in ("policy", "rl", "reward", "search", "problems.jsonl", "results.json", "scaling.png",
                 "coverage.png", "rl_curve.png", "stage_seconds.json"):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    print(f"ponder demo: --fresh: cleared {run_dir}")


class Demo:
    """The stages, in order; each returns quickly when its output is already there."""

    def __init__(self, cfg, run_dir: Path, *, show_progress: bool = True):
        self.cfg, self.run_dir, self.show_progress = cfg, run_dir, show_progress
        self.policy_dir = run_dir / "policy"
        self.reward_dir = run_dir / "reward"
        self.search_dir = run_dir / "search"
        self.rl_dir = run_dir / "rl"

    def say(self, message: str) -> None:
        print(f"ponder demo: {message}", flush=True)

    def run(self) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Seconds each stage has taken over every run that did its work (a skipped stage adds next to nothing),
        # kept next to the outputs so an interrupted-and-continued demo still reports its real cost.
        timings_path = self.run_dir / "stage_seconds.json"
        timings = _read_json(timings_path)
        stages = [("policy", self.train_policy)]
        if self.cfg.demo.rl_steps:
            stages += [("rl", self.train_rl), ("pass@1", self.pass_at_1)]
        stages += [("reward data", self.reward_data), ("reward models", self.reward_models), ("search", self.search)]
        for name, stage in stages:
            start = time.perf_counter()
            stage()
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
            write_atomic(timings_path, json.dumps(timings) + "\n")
        return self.report(timings)

    # -- 1. policy --

    def policy_config(self):
        train = self.cfg.train.model_copy(update={"run_dir": str(self.policy_dir)})
        return self.cfg.model_copy(update={"train": train})

    def trained(self, stage: str, run_dir: Path, steps: int) -> bool:
        """Whether run_dir has a checkpoint at `steps` or later (then the stage says it skips)."""
        done = _latest_step(run_dir)
        finished = done is not None and done >= steps
        if finished:
            self.say(f"1/4 {stage}: {run_dir} has step {done} of {steps}: skipping")
        return finished

    def train_policy(self) -> None:
        from train.trainer import train

        cfg = self.policy_config()
        if self.trained("policy", self.policy_dir, cfg.train.steps):
            return
        self.say(f"1/4 policy: SFT on {', '.join(cfg.data.mixture)} for {cfg.train.steps} steps -> {self.policy_dir}")
        train(cfg, show_progress=self.show_progress)

    # -- 1b. RL --

    def rl_config(self):
        """The config's rl.* (and demo.rl_overrides) from the SFT policy into RUN/rl for demo.rl_steps steps."""
        from configs.load import with_overrides
        from train.rl import with_policy

        cfg = with_policy(self.cfg, self.policy_dir, self.rl_dir, steps=self.cfg.demo.rl_steps)
        return with_overrides(cfg, self.cfg.demo.rl_overrides, "demo.rl_overrides")

    def train_rl(self) -> None:
        from train.rl import train_rl

        cfg = self.rl_config()
        if self.trained("RL", self.rl_dir, cfg.rl.steps):
            return
        self.say(f"1/4 RL: {cfg.rl.algorithm} from the policy for {cfg.rl.steps} steps, {cfg.rl.prompts_per_step} "
                 f"prompts x {cfg.rl.group_size} samples each -> {self.rl_dir}")
        train_rl(cfg, show_progress=self.show_progress)

    def pass_at_1(self) -> None:
        """pass@1 of the SFT and the RL policy: the verified rate of demo.pass_samples samples per test problem."""
        from tasks.files import read_problems
        from train.rl import policy_pass_at_1

        out = self.rl_dir / "pass_at_1.json"
        samples, temperature, seed = self.cfg.demo.pass_samples, self.cfg.search.temperature, self.cfg.search.seed
        # the checkpoints measured are part of the key: a longer rerun of either stage measures again
        wanted = {"samples": samples, "temperature": temperature, "seed": seed,
                  "sft_step": _latest_step(self.policy_dir), "rl_step": _latest_step(self.rl_dir)}
        if out.exists() and {k: _read_json(out).get(k) for k in wanted} == wanted:
            self.say(f"1/4 pass@1: {out} exists: skipping")
            return
        problems, _ = read_problems(self.test_problems())
        self.say(f"1/4 pass@1: {samples} samples at temperature {temperature} on each of {len(problems)} test "
                 f"problems, SFT and RL policies -> {out}")
        result = wanted | {"problems": len(problems)}
        for policy, run_dir in (("sft", self.policy_dir), ("rl", self.rl_dir)):
            measured = policy_pass_at_1(run_dir, problems, samples=samples, temperature=temperature, seed=seed)
            result[policy] = measured["pass_at_1"]
            result[f"{policy}_skipped"] = int(measured["eval_skipped"])  # prompts wider than rl.max_prompt_len
        write_atomic(out, json.dumps(result) + "\n")

    # -- 2. reward data --

    def reward_data(self) -> None:
        """Labelled samples on train problems (what the reward models learn from) and, with
        demo.reward_eval_problems, on validation problems (what their AUCs are reported on: the train split's
        problems past demo.reward_problem_offset repeat many that the policy's SFT saw, the validation split's none)."""
        demo = self.cfg.demo
        self.label(self.reward_dir / "data.jsonl", "train", demo.reward_problems, demo.reward_problem_offset)
        if demo.reward_eval_problems:
            self.label(self.reward_dir / "validation.jsonl", "validation", demo.reward_eval_problems, 0)

    def label(self, out: Path, split: str, count: int, start: int) -> None:
        from train.policy import load_policy
        from train.problems import plan_problems
        from train.reward_labels import LabelSettings, build_reward_data

        demo = self.cfg.demo
        if out.exists():
            self.say(f"2/4 reward data: {out} exists: skipping")
            return
        problems = plan_problems(self.cfg.data.mixture, count, split=split, seed=self.cfg.seed, start=start)
        self.say(f"2/4 reward data: {demo.reward_samples} samples on each of {len(problems)} {split} problems, "
                 f"labelled -> {out}")
        settings = LabelSettings(samples=demo.reward_samples, mc_rollouts=demo.mc_rollouts,
                                 label_source=demo.label_source, max_new_tokens=self.cfg.search.max_len // 2,
                                 seed=self.cfg.seed)
        summary = build_reward_data(load_policy(self.policy_dir), problems, out, settings,
                                    show_progress=self.show_progress)
        self.say(f"   {json.dumps(summary)}")

    # -- 3. reward models --

    def reward_models(self) -> None:
        from train.reward import evaluate_reward_model, train_reward_model

        demo, validation = self.cfg.demo, self.reward_dir / "validation.jsonl"
        for kind in ("prm", "orm"):
            run_dir = self.reward_dir / kind
            report = run_dir / "reward_eval.json"
            if report.exists():
                self.say(f"3/4 {kind.upper()}: {run_dir} is trained: skipping")
            else:
                steps = demo.orm_steps if kind == "orm" and demo.orm_steps is not None else demo.reward_steps
                self.say(f"3/4 {kind.upper()}: {steps} steps from the policy's checkpoint -> {run_dir}")
                result = train_reward_model(self.reward_dir / "data.jsonl", run_dir, policy=self.policy_dir, kind=kind,
                                            overrides=(f"train.steps={steps}",), show_progress=self.show_progress)
                if not report.exists():  # no held-out records: still mark the stage as done
                    report.write_text(json.dumps(result["eval"]) + "\n")
            validation_report = run_dir / "validation_eval.json"
            if validation.exists() and not validation_report.exists():
                write_atomic(validation_report, json.dumps(evaluate_reward_model(run_dir, validation), indent=1) + "\n")

    # -- 4. search --

    def test_problems(self) -> Path:
        """demo.problems held-out test problems of the mixture, written as a problem file (once)."""
        from train.problems import plan_problems

        path = self.run_dir / "problems.jsonl"
        if not path.exists():
            problems = plan_problems(self.cfg.data.mixture, self.cfg.demo.problems, split="test", seed=self.cfg.seed)
            write_atomic(path, "".join(json.dumps(p.to_json()) + "\n" for p in problems))
        return path

    def search(self) -> None:
        from search.scaling import checkable_mixture, demo_rows

        rows = demo_rows(self.cfg.demo, checkable_mixture(self.cfg.data.mixture))
        todo = [row for row in rows if not (self.search_dir / f"{row.key}.json").exists()]
        if not todo:
            self.say(f"4/4 search: all {len(rows)} rows are in {self.search_dir}: skipping")
            return
        self.say(f"4/4 search: {len(todo)} of {len(rows)} (strategy, budget) rows on "
                 f"{self.cfg.demo.problems} test problems -> {self.search_dir}")
        runner = self.table_runner()
        for row in todo:
            base = self.search_row(runner, row.base, None)
            self.search_row(runner, row, base)

    def search_row(self, runner, row: Row, base: dict | None) -> dict:
        """A row's summary: read back when an earlier run wrote it, else searched now (and printed)."""
        from search.scaling import row_line

        path = self.search_dir / f"{row.key}.json"
        if path.exists():
            return json.loads(path.read_text())
        summary = runner.run(row, self.search_dir, base)
        print(row_line(summary), flush=True)
        return summary

    def table_runner(self):
        """A `TableRunner` on the test problems, its searchers loading each policy and scorer once."""
        from model.sharding import make_mesh
        from search.runner import Searcher, batch_shards, plan_batches, read_problem_lines
        from search.scaling import TableRunner
        from search.state import Models
        from train.checkpoint import load_params
        from train.data import get_vocabulary
        from train.reward import ChainScorer, load_reward_model, search_scorer
        from train.state import state_layout

        cfg, path = self.cfg, self.test_problems()
        vocab, mesh = get_vocabulary(cfg.data.vocab), make_mesh(cfg.mesh)
        layout = state_layout(cfg, mesh)
        problems, bad = read_problem_lines(path)
        if bad:
            raise ValueError(f"{path}: {bad[0]}")
        batches = plan_batches(problems, vocab, cfg.search.prompt_buckets, cfg.search.max_len,
                               min(cfg.search.batch_size, len(problems)), batch_shards(cfg, mesh))
        policies = {"sft": self.policy_dir, "rl": self.rl_dir}
        params = functools.cache(lambda policy: load_params(policies[policy], layout.abstract["params"]))
        compiled: dict = {}  # per scorer, shared by the policies (params are inputs, not constants)

        @functools.cache
        def searcher_for(scorer_name: str, policy: str) -> Searcher:
            update = {"scorer": "logprob"} if scorer_name == "logprob" else {
                "scorer": "reward", "reward_checkpoint": str(self.reward_dir / scorer_name)}
            scorer, scorer_params = search_scorer(
                cfg.model_copy(update={"search": cfg.search.model_copy(update=update)}), vocab, mesh)
            searcher = Searcher(Models(layout.graphdef, cfg.model, scorer), params(policy), scorer_params, mesh)
            searcher.compiled = compiled.setdefault(scorer_name, searcher.compiled)
            return searcher

        orm = functools.cache(lambda: ChainScorer(load_reward_model(self.reward_dir / "orm")))
        return TableRunner(batches, vocab, cfg.search, searcher_for, lambda chains: orm()(chains), self.show_progress)

    # -- 5. report --

    def report(self, timings: dict) -> dict:
        from search.coverage import coverage, coverage_lines, plot_coverage
        from search.scaling import checkable_mixture, demo_rows, findings, plot_scaling, print_table, read_pools
        from train.rl_curve import curve_lines, plot_rl_curve, rl_curve

        rows = demo_rows(self.cfg.demo, checkable_mixture(self.cfg.data.mixture))
        results = [json.loads((self.search_dir / f"{row.key}.json").read_text()) for row in rows]
        reward_eval, reward_validation = ({kind: _read_json(self.reward_dir / kind / name) for kind in ("prm", "orm")}
                                          for name in ("reward_eval.json", "validation_eval.json"))
        print_table(results)
        shows, coverage_table = findings(results), coverage(read_pools(rows, self.search_dir))
        for line in shows:
            self.say(f"shows: {line}")
        if coverage_table:
            self.say(f"coverage: pass@k of the {max(coverage_table)} best-of-N chains per problem, and each rule's "
                     "accuracy choosing among k of them (disjoint groups of k, in order):")
            print("\n".join(f"  {line}" for line in coverage_lines(coverage_table)))
        by_name = {(r["name"], r["budget"]): r for r in results}
        pass_at_1 = _read_json(self.rl_dir / "pass_at_1.json") if self.cfg.demo.rl_steps else {}
        if pass_at_1:
            before, after = pass_at_1["sft"], pass_at_1["rl"]
            self.say(f"RL: pass@1 on the {pass_at_1['problems']} test problems ({pass_at_1['samples']} samples each "
                     f"at temperature {pass_at_1['temperature']}) {100 * before:.1f}% -> {100 * after:.1f}% "
                     f"({100 * (after - before):+.1f} points)")
        if all("compile_seconds" in r for r in results):
            self.say(f"search: compiling its {sum(r['compile_seconds'] > 0 for r in results)} programs took "
                     f"{sum(r['compile_seconds'] for r in results):.0f} s of the stage's time")
        # held-out AUCs, and how often a right chain outscores a wrong one of its own problem: what search needs
        for kind in ("prm", "orm"):
            pooled, aggregate = (("step", self.cfg.search.aggregate) if kind == "prm" else ("outcome", "last"))
            for m, where in ((reward_validation.get(kind, {}), "validation problems (unseen in training)"),
                             (reward_eval[kind], "held-out train problems (the split the policy's SFT drew from)")):
                if m.get("steps"):
                    self.say(f"{kind.upper()}: on {m['problems']} {where}: a right chain above a wrong one of the "
                             f"same problem in {m.get(f'within_auc_{aggregate}', float('nan')):.3f} of "
                             f"{m.get('within_pairs', 0)} pairs ({aggregate} of its scores; 0.5 is chance); {pooled} "
                             f"AUC {m[f'{pooled}_auc']:.3f} over {m['records']} samples")
        curve = rl_curve(self.rl_dir / "metrics.jsonl") if self.cfg.demo.rl_steps else []
        rl = self.rl_config().rl if curve else None  # its evaluation settings name the curve's problems
        if curve:
            self.say(f"RL curve: pass@1 on {rl.eval_problems} validation problems ({rl.eval_samples} samples each) "
                     "and the rollouts' mean completion length, by RL step:")
            print("\n".join(f"  {line}" for line in curve_lines(curve)))
        if ("rl/sample", 1) in by_name and ("sample", 1) in by_name:
            before, after = by_name[("sample", 1)]["accuracy"], by_name[("rl/sample", 1)]["accuracy"]
            self.say(f"    one sample each (the sample rows): {100 * before:.1f}% -> {100 * after:.1f}%")
        summary = {
            "config": self.cfg.model_dump(mode="json"),
            "machine": _machine(),
            "stage_seconds": timings,
            "reward_eval": reward_eval,
            "reward_validation": reward_validation,
            "pass_at_1": pass_at_1,
            "rl_curve": curve,
            "rows": results,
            "findings": shows,
            "coverage": coverage_table,
        }
        write_atomic(self.run_dir / "results.json", json.dumps(summary, indent=1) + "\n")
        plot_scaling(results, self.run_dir / "scaling.png", title=_plot_title(self.cfg))
        if coverage_table:
            greedy = {r["name"]: r["accuracy"] for r in results if r["strategy"] == "greedy" and r["policy"] == "sft"}
            plot_coverage(coverage_table, self.run_dir / "coverage.png", _plot_title(self.cfg, "coverage"), greedy)
        if curve:
            plot_rl_curve(curve, self.run_dir / "rl_curve.png", _plot_title(
                self.cfg, "GRPO learning curve", f"{rl.eval_problems} validation problems x {rl.eval_samples} samples"))
        return summary


def _plot_title(cfg, what: str = "accuracy vs thinking compute", problems: str | None = None) -> str:
    tasks = ", ".join(cfg.data.mixture)
    return (f"ponder: {what}\n{tasks}; {problems or f'{cfg.demo.problems} test problems'}; "
            f"{cfg.model.num_layers}-layer, width-{cfg.model.embed_dim} policy")


def _machine() -> dict:
    import platform

    import jax

    return {"platform": jax.devices()[0].platform, "devices": jax.device_count(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "jax": jax.__version__}


def _latest_step(run_dir: Path) -> int | None:
    """The newest checkpoint step of a training run (None: none yet)."""
    from train.checkpoint import Checkpoints

    return Checkpoints(run_dir / "checkpoints", save_every=1, keep=1).latest_step()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
