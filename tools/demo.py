"""`ponder demo`: the inference-time scaling curve, end to end, from nothing but this repository.

    ponder demo                              # configs/experiments/demo.yaml into runs/demo
    ponder demo --fresh                      # start over
    ponder demo --config experiments/demo_tiny --run-dir /tmp/demo   # toy size (tests)

Stages, each skipped when its output exists (the screen says so):

1. policy      SFT of the config's policy on its task mixture (`ponder train`)    RUN/policy/
   rl          GRPO from that policy for demo.rl_steps steps (`ponder rl`; 0: none) RUN/rl/
   pass@1      both policies' pass@1: demo.pass_samples samples per test problem RUN/rl/pass_at_1.json
2. reward data the policy's samples on train problems, labelled (`ponder reward data`)  RUN/reward/data.jsonl
3. reward      a PRM and an ORM from the policy's checkpoint (`ponder reward train`) RUN/reward/{prm,orm}/
4. search      every strategy at budgets of 1x..Nx the tokens of one sample, on
               demo.problems held-out test problems (`ponder search`)              RUN/search/*.jsonl
5. report      the table on screen, RUN/results.json and RUN/scaling.png

A budget multiple B gives each problem about B times the tokens that one sampled chain
costs on the same problems (measured by the `sample` row), and sizes N, the beams or the
simulations from it; every row reports the tokens it really spent. With an RL stage the table
also has `rl/...` rows: demo.rl_strategies run on the RL policy (same problems, same PRM/ORM),
and the `rl/sample` row against `sample` is one sample's accuracy before and after RL. One
sample per problem is noisy (on 200 problems, reseeding the same policy moved it by up to 11
points), so pass@1 before and after RL is also measured as the mean over demo.pass_samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from configs.fileio import write_atomic
from tools.cli import add_config_arguments

DEFAULT_CONFIG = "experiments/demo"


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: a strategy (with its scorer and selection rule) at a budget multiple."""

    name: str  # e.g. "best_of_n/prm-weighted"
    strategy: str
    scorer: str  # logprob, prm, orm
    select: str  # majority, best, weighted
    budget: int  # multiple of one sample's tokens
    policy: str = "sft"  # sft: the SFT policy; rl: the policy after the RL stage

    @property
    def key(self) -> str:
        return f"{self.name.replace('/', '_')}_x{self.budget}"

    @property
    def base(self) -> Row:
        """The `sample` row of the same policy (whose tokens size this row's budget)."""
        return rows_for([1], ["sample"], self.policy)[0]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `ponder demo`."""
    parser = subparsers.add_parser(
        "demo",
        help="train a policy and reward models, then plot accuracy against thinking compute",
        description="The whole pipeline on CPU: SFT the policy of --config (default "
        f"{DEFAULT_CONFIG}), improve it with demo.rl_steps of GRPO (rl.*; 0: no RL stage), sample "
        "and label reward data, train a PRM and an ORM, run every search strategy at budgets of "
        "1x..Nx the tokens of one sample on demo.problems held-out test problems (and "
        "demo.rl_strategies on the RL policy), then print a table and write results.json and "
        "scaling.png into the run "
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
          f"{run_dir / 'scaling.png'}")
    return 0 if results else 1


def _clear(run_dir: Path) -> None:
    """Removes what the demo writes (and nothing else) under run_dir."""
    import shutil

    for name in ("policy", "rl", "reward", "search", "problems.jsonl", "results.json", "scaling.png",
                 "stage_seconds.json"):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    print(f"ponder demo: --fresh: cleared {run_dir}")


def rows_for(budgets: list[int], strategies: list[str], policy: str = "sft") -> list[Row]:
    """The table's rows for one policy: `sample` once, then each strategy at each budget multiple above 1.

    Rows of the RL policy are named `rl/...`.
    """
    variants = {
        # One pool of N samples per budget serves all three (the same chains, so the same tokens).
        "best_of_n": [("best_of_n/majority", "prm", "majority"), ("best_of_n/orm-weighted", "orm", "weighted"),
                      ("best_of_n/prm-weighted", "prm", "weighted")],
        # Beam and DVTS answer by a PRM-weighted vote over their finished chains (as in Snell et al. 2024 and
        # HF's search-and-learn): the single best-scored chain is as good as the PRM's worst mistake.
        "beam": [("beam/prm", "prm", "weighted")],
        "dvts": [("dvts/prm", "prm", "weighted")],
        "mcts": [("mcts/prm", "prm", "best")],
    }
    prefix = "" if policy == "sft" else f"{policy}/"
    rows = [Row(f"{prefix}sample", "sample", "logprob", "best", 1, policy)] if "sample" in strategies else []
    for strategy in strategies:
        for name, scorer, select in variants.get(strategy, []):
            rows += [Row(prefix + name, strategy, scorer, select, budget, policy) for budget in budgets if budget > 1]
    return rows


def demo_rows(demo) -> list[Row]:
    """Every row of a demo config's table: the SFT policy's, then (with an RL stage) the RL policy's."""
    rows = rows_for(demo.budgets, demo.strategies)
    if demo.rl_steps:
        rows += rows_for(demo.budgets if demo.rl_budgets is None else demo.rl_budgets, demo.rl_strategies, "rl")
    return rows


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
        from train.reward_labels import LabelSettings, build_reward_data, load_policy, plan_problems

        demo = self.cfg.demo
        out = self.reward_dir / "data.jsonl"
        if out.exists():
            self.say(f"2/4 reward data: {out} exists: skipping")
            return
        problems = plan_problems(self.cfg.data.mixture, demo.reward_problems, split="train", seed=self.cfg.seed,
                                 start=demo.reward_problem_offset)
        self.say(f"2/4 reward data: {demo.reward_samples} samples on each of {len(problems)} train problems, "
                 f"labelled -> {out}")
        settings = LabelSettings(samples=demo.reward_samples, mc_rollouts=demo.mc_rollouts,
                                 max_new_tokens=self.cfg.search.max_len // 2, seed=self.cfg.seed)
        summary = build_reward_data(load_policy(self.policy_dir), problems, out, settings,
                                    show_progress=self.show_progress)
        self.say(f"   {json.dumps(summary)}")

    # -- 3. reward models --

    def reward_models(self) -> None:
        from train.reward import train_reward_model

        for kind in ("prm", "orm"):
            run_dir = self.reward_dir / kind
            report = run_dir / "reward_eval.json"
            if report.exists():
                self.say(f"3/4 {kind.upper()}: {run_dir} is trained: skipping")
                continue
            steps = self.cfg.demo.reward_steps
            self.say(f"3/4 {kind.upper()}: {steps} steps from the policy's checkpoint -> {run_dir}")
            result = train_reward_model(self.reward_dir / "data.jsonl", run_dir, policy=self.policy_dir, kind=kind,
                                        overrides=(f"train.steps={self.cfg.demo.reward_steps}",),
                                        show_progress=self.show_progress)
            if not report.exists():  # no held-out records: still mark the stage as done
                report.write_text(json.dumps(result["eval"]) + "\n")

    # -- 4. search --

    def test_problems(self) -> Path:
        """demo.problems held-out test problems of the mixture, written as a problem file (once)."""
        from train.reward_labels import plan_problems

        path = self.run_dir / "problems.jsonl"
        if not path.exists():
            problems = plan_problems(self.cfg.data.mixture, self.cfg.demo.problems, split="test", seed=self.cfg.seed)
            write_atomic(path, "".join(json.dumps(p.to_json()) + "\n" for p in problems))
        return path

    def search(self) -> None:
        rows = demo_rows(self.cfg.demo)
        todo = [row for row in rows if not (self.search_dir / f"{row.key}.json").exists()]
        if not todo:
            self.say(f"4/4 search: all {len(rows)} rows are in {self.search_dir}: skipping")
            return
        self.say(f"4/4 search: {len(todo)} of {len(rows)} (strategy, budget) rows on "
                 f"{self.cfg.demo.problems} test problems -> {self.search_dir}")
        policies = {"sft": self.policy_dir, "rl": self.rl_dir}
        runner = SearchRunner(self.cfg, policies, self.reward_dir, self.test_problems(), self.show_progress)
        for row in todo:
            base = runner.run(row.base, self.search_dir, None)
            runner.run(row, self.search_dir, base)

    # -- 5. report --

    def report(self, timings: dict) -> dict:
        rows = demo_rows(self.cfg.demo)
        results = [json.loads((self.search_dir / f"{row.key}.json").read_text()) for row in rows]
        reward_eval = {kind: _read_json(self.reward_dir / kind / "reward_eval.json") for kind in ("prm", "orm")}
        print_table(results)
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
        for kind, m in reward_eval.items():
            if not m.get("steps"):
                continue
            pooled, aggregate = (("step", self.cfg.search.aggregate) if kind == "prm" else ("outcome", "last"))
            self.say(f"{kind.upper()}: {pooled} AUC {m[f'{pooled}_auc']:.3f} over {m['records']} held-out samples; "
                     f"a right chain above a wrong one of the same problem in "
                     f"{m.get(f'within_auc_{aggregate}', float('nan')):.3f} of {m.get('within_pairs', 0)} pairs "
                     f"({aggregate} of its scores; 0.5 is chance)")
        if ("rl/sample", 1) in by_name and ("sample", 1) in by_name:
            before, after = by_name[("sample", 1)]["accuracy"], by_name[("rl/sample", 1)]["accuracy"]
            self.say(f"    one sample each (the sample rows): {100 * before:.1f}% -> {100 * after:.1f}%")
        summary = {
            "config": self.cfg.model_dump(mode="json"),
            "machine": _machine(),
            "stage_seconds": timings,
            "reward_eval": reward_eval,
            "pass_at_1": pass_at_1,
            "rows": results,
        }
        write_atomic(self.run_dir / "results.json", json.dumps(summary, indent=1) + "\n")
        plot_scaling(results, self.run_dir / "scaling.png", title=_plot_title(self.cfg))
        return summary


class SearchRunner:
    """Runs one table row over the problem file with the shared `ponder search` machinery."""

    def __init__(self, cfg, policies: dict[str, Path], reward_dir: Path, problems_path: Path, show_progress: bool):
        from model.sharding import make_mesh
        from tools.search import batch_shards, plan_batches, read_problem_lines
        from train.data import get_vocabulary
        from train.state import state_layout

        self.cfg, self.policies, self.reward_dir, self.show_progress = cfg, policies, reward_dir, show_progress
        self.vocab = get_vocabulary(cfg.data.vocab)
        self.mesh = make_mesh(cfg.mesh)
        self.layout = state_layout(cfg, self.mesh)
        problems, bad = read_problem_lines(problems_path)
        if bad:
            raise ValueError(f"{problems_path}: {bad[0]}")
        self.problems = problems
        self.batches = plan_batches(problems, self.vocab, cfg.search.prompt_buckets, cfg.search.max_len,
                                    min(cfg.search.batch_size, len(problems)), batch_shards(cfg, self.mesh))
        self.params: dict = {}
        self.searchers: dict = {}
        self.compiled: dict = {}  # per scorer, shared by the policies (params are inputs, not constants)
        self.pools: dict = {}
        self.orm = None
        self.orm_widths: set[int] = set()  # padded widths (in 64s) the ORM's forward was compiled for

    def searcher(self, scorer_name: str, policy: str):
        """A Searcher per (scorer, policy); the policies' searchers share compiled programs."""
        from search.scorers import make_scorer
        from search.state import Models
        from tools.search import Searcher, _scorer
        from train.checkpoint import load_params

        if (scorer_name, policy) not in self.searchers:
            if policy not in self.params:
                self.params[policy] = load_params(self.policies[policy], self.layout.abstract["params"])
            if scorer_name == "logprob":
                scorer, scorer_params = make_scorer("logprob"), None
            else:
                search_cfg = self.cfg.search.model_copy(
                    update={"scorer": "reward", "reward_checkpoint": str(self.reward_dir / scorer_name)})
                scorer, scorer_params = _scorer(self.cfg.model_copy(update={"search": search_cfg}), self.vocab,
                                                self.mesh)
            searcher = Searcher(Models(self.layout.graphdef, self.cfg.model, scorer), self.params[policy],
                                scorer_params, self.mesh)
            searcher.compiled = self.compiled.setdefault(scorer_name, searcher.compiled)
            self.searchers[scorer_name, policy] = searcher
        return self.searchers[scorer_name, policy]

    def spec_for(self, row: Row, base: dict | None):
        """(search config, SearchSpec) of a row, sized to its budget from the `sample` row's tokens and steps."""
        from search.spec import resolve, size_for_budget, spec_from_config

        update = {"strategy": row.strategy, "select": row.select}
        search_cfg = self.cfg.search.model_copy(update=update)
        spec = spec_from_config(search_cfg, self.vocab)
        if base is not None and row.budget > 1:
            sized = size_for_budget(spec, row.budget * base["tokens_per_problem"], base["tokens_per_problem"],
                                    base["steps_per_problem"])
            spec = resolve(dataclasses.replace(spec, **sized))
        return search_cfg, spec

    def pool(self, row: Row, base: dict | None) -> tuple[list[dict], float, object, float]:
        """Per problem: its candidate chains and costs under the row's search (PRM-scored); the seconds
        searching, the spec, and the seconds compiling (0 when the program was compiled for an earlier row).

        Cached per (strategy, budget): best-of-N's three selection rules read one pool of samples.
        """
        import jax
        from tqdm import tqdm

        from search.candidates import candidates

        search_cfg, spec = self.spec_for(row, base)
        key = (row.policy, row.strategy, row.budget, row.scorer if row.strategy != "best_of_n" else "prm")
        if key in self.pools:  # its program's compile time went to the row that ran it
            problems, seconds, spec, _ = self.pools[key]
            return problems, seconds, spec, 0.0
        searcher = self.searcher(key[3], row.policy)
        problems, seconds, compiled_before = [], 0.0, searcher.compile_seconds
        with tqdm(total=len(self.problems), unit="problem", desc=f"{row.name} x{row.budget}",
                  disable=not self.show_progress, leave=False) as bar:
            for batch in self.batches:
                state, chosen, batch_seconds = searcher(spec, batch, search_cfg.seed)
                per_chain = candidates(spec, state, chosen, self.vocab)
                stats = {name: np.asarray(jax.device_get(getattr(state, name)))
                         for name in ("tokens", "policy_flops", "scorer_flops", "expansions")}
                for row_index, (number, problem) in enumerate(batch.rows):
                    problems.append({"line": number, "problem": problem, "candidates": per_chain[row_index],
                                     **{name: float(values[row_index]) for name, values in stats.items()}})
                seconds += batch_seconds
                bar.update(len(batch.rows))
        self.pools[key] = (problems, seconds, spec, searcher.compile_seconds - compiled_before)
        return self.pools[key]

    def orm_scores(self, problems: list[dict]) -> tuple[list[list[float]], float, float]:
        """The ORM's score of every candidate chain (a dense forward pass each); the seconds scoring, and the
        seconds compiling the forward (0 when an earlier row compiled it for this width)."""
        from tasks.base import completion_steps, final_answer
        from train.reward import load_reward_model, score_records
        from train.reward_data import RewardRecord, record_tokens

        if self.orm is None:
            self.orm = load_reward_model(self.reward_dir / "orm")
        records = [RewardRecord(p["problem"], i, c.text, tuple(completion_steps(c.text)), final_answer(c.text), (),
                                0.0, "none") for p in problems for i, c in enumerate(p["candidates"])]
        compile_seconds = 0.0
        if records:
            lengths = [len(record_tokens(r, self.orm.vocab)[0]) for r in records]
            longest = int(np.argmax(lengths))
            width = -(-lengths[longest] // 64)  # score_records' padded width, in 64s
            if width not in self.orm_widths:  # the first call at a width compiles: time it apart
                start = time.perf_counter()
                score_records(self.orm, [records[longest]], rows=64)
                compile_seconds = time.perf_counter() - start
                self.orm_widths.add(width)
        start = time.perf_counter()
        scores = score_records(self.orm, records, rows=64) if records else []
        seconds = time.perf_counter() - start
        flat = [s.answer if s.answer is not None else (s.final or 0.0) for s in scores]
        out, at = [], 0
        for p in problems:
            out.append(flat[at : at + len(p["candidates"])])
            at += len(p["candidates"])
        return out, seconds, compile_seconds

    def run(self, row: Row, out_dir: Path, base: dict | None) -> dict:
        """The row's summary (also RUN/search/<key>.json, with per-problem lines in <key>.jsonl)."""
        from search.candidates import choose
        from tasks import get_task

        summary_path = out_dir / f"{row.key}.json"
        if summary_path.exists():
            return json.loads(summary_path.read_text())
        problems, seconds, spec, compile_seconds = self.pool(row, base)
        orm = None
        if row.scorer == "orm":
            orm, orm_seconds, orm_compile_seconds = self.orm_scores(problems)
            seconds, compile_seconds = seconds + orm_seconds, compile_seconds + orm_compile_seconds
        records = []
        for index, entry in enumerate(problems):
            problem, cands = entry["problem"], entry["candidates"]
            if orm is not None:
                cands = [dataclasses.replace(c, score=score) for c, score in zip(cands, orm[index], strict=True)]
            pick = choose(cands, row.select, problem)
            text = pick.text if pick else ""
            records.append({
                "id": problem.id, "line": entry["line"], "answer": pick.answer if pick else None,
                "correct": get_task(problem.task).score(problem, text)[0] == 1.0, "chain": text,
                "score": pick.score if pick else None, "candidates": len(cands), "tokens": entry["tokens"],
                "expansions": entry["expansions"], "policy_flops": entry["policy_flops"],
                "scorer_flops": entry["scorer_flops"],
            })
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / f"{row.key}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        count = len(records)
        summary = {
            "name": row.name, "policy": row.policy, "strategy": row.strategy, "scorer": row.scorer,
            "select": row.select, "budget": row.budget, "size": _size(spec), "problems": count,
            "accuracy": sum(r["correct"] for r in records) / count,
            "tokens_per_problem": sum(r["tokens"] for r in records) / count,
            "steps_per_problem": sum(r["expansions"] for r in records) / count,
            "flops_per_problem": sum(r["policy_flops"] + r["scorer_flops"] for r in records) / count,
            "problems_per_s": count / seconds if seconds else float("inf"),
            "search_seconds": seconds,
            "compile_seconds": compile_seconds,
        }
        write_atomic(summary_path, json.dumps(summary) + "\n")
        print(f"  {row.name:<28} x{row.budget:<3} {summary['size']:<28} accuracy {summary['accuracy']:.3f}  "
              f"{summary['tokens_per_problem']:>8.0f} tokens/problem  {summary['problems_per_s']:.2f} problems/s",
              flush=True)
        return summary


def _size(spec) -> str:
    return {"sample": "n=1", "best_of_n": f"n={spec.n}", "beam": f"beams={spec.n} m={spec.m}",
            "dvts": f"n={spec.n} m={spec.m}",
            "mcts": f"sims={spec.simulations} k={spec.children} wave={spec.wave}"}[spec.strategy]


def print_table(results: list[dict]) -> None:
    header = f"{'strategy':<28} {'budget':>6} {'size':<28} {'accuracy':>8} {'tokens/problem':>14} {'problems/s':>10}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['name']:<28} {'x' + str(r['budget']):>6} {r['size']:<28} {r['accuracy']:>8.3f} "
              f"{r['tokens_per_problem']:>14.0f} {r['problems_per_s']:>10.2f}")


def markdown_table(results: list[dict]) -> str:
    """The table as markdown (for the README)."""
    lines = ["| strategy | budget | size | accuracy | tokens/problem | problems/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | x{r['budget']} | {r['size']} | {r['accuracy']:.3f} | {r['tokens_per_problem']:.0f} | "
              f"{r['problems_per_s']:.2f} |" for r in results]
    return "\n".join(lines)


def plot_scaling(results: list[dict], path: Path, title: str) -> None:
    """Accuracy against tokens per problem (log x), one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = {r.get("policy", "sft"): r for r in results if r["strategy"] == "sample"}
    lines: dict[str, list[dict]] = {}
    for r in results:
        if r["strategy"] != "sample":
            lines.setdefault(r["name"], []).append(r)
    fig, ax = plt.subplots(figsize=(10.5, 5.5), dpi=120)
    for name, points in lines.items():
        policy = points[0].get("policy", "sft")
        points = sorted([samples[policy]] * (policy in samples) + points, key=lambda r: r["tokens_per_problem"])
        ax.plot([p["tokens_per_problem"] for p in points], [100 * p["accuracy"] for p in points], marker="o",
                label=name, linestyle="-" if policy == "sft" else "--")
    for policy, sample in samples.items():
        ax.scatter([sample["tokens_per_problem"]], [100 * sample["accuracy"]], color="black", zorder=5,
                   marker="o" if policy == "sft" else "s", label=sample["name"].replace("sample", "one sample"))
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem (log scale)")
    ax.set_ylabel("accuracy on held-out problems (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # beside the curves
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _plot_title(cfg) -> str:
    tasks = ", ".join(cfg.data.mixture)
    return (f"ponder: accuracy vs thinking compute\n{tasks}; {cfg.demo.problems} test problems; "
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
