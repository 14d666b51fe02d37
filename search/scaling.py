"""The inference-time scaling table: accuracy of each strategy against the thinking compute it spends.

A `Row` is a strategy with a scorer and a selection rule at a budget multiple (of the tokens
one sampled chain costs), on one policy. The `BASELINES` (greedy decoding and one sample) are
what thinking compute is measured against: `findings` compares every search with the better of
them. `row_records` turns a row's searched problems into result lines (best-of-N rows keep
every chain's answer, verdict and score for `search/coverage.py`), `row_summary` sums them up;
`TableRunner` runs rows, one search per pool of candidates; `print_table`, `markdown_table` and
`plot_scaling` show the summaries. `ponder demo` (tools/demo.py) wires it to its checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from configs.fileio import atomic_path, write_atomic
from search.candidates import pick_answer
from search.coverage import pool_entries
from search.runner import Batch, Searched, Searcher, search_problems
from search.spec import STRATEGIES, SearchSpec, resolve, size_for_budget, spec_from_config

# One chain per problem at budget x1, each its own row: the model's most likely answer and one sample.
BASELINES = ("greedy", "sample")

# The rows each strategy gives, as (name, scorer, selection rule). One pool of N samples per budget serves
# best_of_n's three (the same chains, so the same tokens). Beam and DVTS answer by a PRM-weighted vote over
# their finished chains (as in Snell et al. 2024 and HF's search-and-learn): the single best-scored chain is
# as good as the PRM's worst mistake. The checker row (tasks checkable from the prompt alone) picks a chain the
# task's prompt-only verifier accepts: legitimate at test time, and what Large Language Monkeys' coverage assumes.
VARIANTS = {
    "best_of_n": [("best_of_n/majority", "prm", "majority"), ("best_of_n/orm-weighted", "orm", "weighted"),
                  ("best_of_n/prm-weighted", "prm", "weighted"), ("best_of_n/checker", "checker", "best")],
    "beam": [("beam/prm", "prm", "weighted")],
    "dvts": [("dvts/prm", "prm", "weighted")],
    "mcts": [("mcts/prm", "prm", "best")],
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: a strategy (with its scorer and selection rule) at a budget multiple."""

    name: str  # e.g. "best_of_n/prm-weighted"
    strategy: str
    scorer: str  # logprob, prm, orm, checker
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

    @property
    def pool_scorer(self) -> str:
        """The scorer its search runs with: ORM and checker rows rescore the chains of the PRM's search afterwards."""
        return "prm" if self.scorer in ("orm", "checker") else self.scorer


def rows_for(budgets: list[int], strategies: list[str], policy: str = "sft", checker: bool = False,
             best_of_n_budgets: list[int] | None = None) -> list[Row]:
    """The table's rows for one policy: the `BASELINES` asked for (x1), then each strategy at each budget above 1
    (best_of_n at `best_of_n_budgets` when given).

    Rows of the RL policy are named `rl/...`; checker rows only with `checker` (every task checkable from its prompt).
    """
    prefix = "" if policy == "sft" else f"{policy}/"
    rows = [Row(prefix + name, name, "logprob", "best", 1, policy) for name in BASELINES if name in strategies]
    for strategy in strategies:
        for name, scorer, select in VARIANTS.get(strategy, []):
            if scorer == "checker" and not checker:
                continue
            sizes = best_of_n_budgets if strategy == "best_of_n" and best_of_n_budgets is not None else budgets
            rows += [Row(prefix + name, strategy, scorer, select, budget, policy) for budget in sizes if budget > 1]
    return rows


def demo_rows(demo, checker: bool = False) -> list[Row]:
    """Every row of a demo config's table: the SFT policy's, then (with an RL stage) the RL policy's.

    checker: add the prompt-only verifier's rows (`checkable_mixture` of the config's data mixture).
    """
    rows = rows_for(demo.budgets, demo.strategies, checker=checker, best_of_n_budgets=demo.best_of_n_budgets)
    if demo.rl_steps:
        rl_budgets = demo.budgets if demo.rl_budgets is None else demo.rl_budgets
        rows += rows_for(rl_budgets, demo.rl_strategies, "rl", checker=checker)
    return rows


def checkable_mixture(mixture: dict[str, float]) -> bool:
    """Whether every task of a data mixture (`task_dN_style` components) is checkable from its prompt alone."""
    from tasks import get_task

    names = {component.split("_d")[0] for component in mixture}
    return "text" not in names and all(get_task(name).checks_from_prompt for name in names)


def pool_rows(rows: list[Row]) -> list[Row]:
    """The best-of-N rows of the SFT policy at their largest budget: the pools `search/coverage.py` reads."""
    pooled = [row for row in rows if row.strategy == "best_of_n" and row.policy == "sft"]
    return [row for row in pooled if row.budget == max(r.budget for r in pooled)]


def read_pools(rows: list[Row], out_dir: Path) -> dict[str, tuple[str, list[list[dict]]]]:
    """Per `pool_rows` row, its label (the name after `best_of_n/`), selection rule and per-problem pools, read
    from out_dir/<key>.jsonl (as `search.coverage.coverage` takes them); {} when a row's lines predate pools."""
    pools = {}
    for row in pool_rows(rows):
        records = [json.loads(line) for line in (out_dir / f"{row.key}.jsonl").read_text().splitlines()]
        if not all("pool" in record for record in records):
            return {}
        pools[row.name.split("/", 1)[1]] = (row.select, [record["pool"] for record in records])
    return pools


def row_records(row: Row, searched: list[Searched], scores: list[list[float]] | None = None) -> list[dict]:
    """One result line per problem: the answer the row's rule picks (votes by the task's answer key).

    `scores`: per problem, a score for each candidate replacing the search's (an ORM's). A
    best-of-N row's lines also hold its `pool` (`search.coverage.pool_entries`: every chain).
    """
    records = []
    for index, entry in enumerate(searched):
        cands = entry.candidates
        if scores is not None:
            cands = [dataclasses.replace(c, score=score) for c, score in zip(cands, scores[index], strict=True)]
        pick, correct = pick_answer(entry.problem, cands, row.select)
        records.append({
            "id": entry.problem.id, "line": entry.line, "answer": pick.answer if pick else None, "correct": correct,
            "chain": pick.text if pick else "", "score": pick.score if pick else None, "candidates": len(cands),
            "tokens": entry.tokens, "expansions": entry.expansions, "policy_flops": entry.policy_flops,
            "scorer_flops": entry.scorer_flops,
        })
        if row.strategy == "best_of_n":
            records[-1]["pool"] = pool_entries(entry.problem, cands)
    return records


def row_summary(row: Row, records: list[dict], spec: SearchSpec, seconds: float, compile_seconds: float) -> dict:
    """The row's line of the table: accuracy and cost per problem, speed, and the seconds compiling."""
    count = len(records)
    return {
        "name": row.name, "policy": row.policy, "strategy": row.strategy, "scorer": row.scorer,
        "select": row.select, "budget": row.budget, "size": STRATEGIES[spec.strategy].size(spec, short=True),
        "problems": count,
        "accuracy": sum(r["correct"] for r in records) / count,
        "tokens_per_problem": sum(r["tokens"] for r in records) / count,
        "steps_per_problem": sum(r["expansions"] for r in records) / count,
        "flops_per_problem": sum(r["policy_flops"] + r["scorer_flops"] for r in records) / count,
        "problems_per_s": count / seconds if seconds else float("inf"),
        "search_seconds": seconds,
        "compile_seconds": compile_seconds,
    }


class TableRunner:
    """Runs rows over planned batches with `search.runner`: one search per pool, shared by the rows reading it.

    `searcher_for(scorer, policy)` gives the Searcher of a pool's scorer (logprob, prm) on a
    policy (sft, rl); `rescore(chains)` gives an ORM row's (score of each (problem, chain),
    seconds, seconds compiling). A row's results go to out_dir/<key>.jsonl and <key>.json.
    """

    def __init__(self, batches: list[Batch], vocab, search_cfg, searcher_for: Callable[[str, str], Searcher],
                 rescore: Callable[[list], tuple[list[float], float, float]], show_progress: bool = True):
        self.batches, self.vocab, self.search_cfg = batches, vocab, search_cfg
        self.searcher_for, self.rescore, self.show_progress = searcher_for, rescore, show_progress
        self.pools: dict = {}

    def spec_for(self, row: Row, base: dict | None) -> SearchSpec:
        """The row's SearchSpec, sized to its budget from the `sample` row's (`base`) tokens and steps."""
        spec = spec_from_config(self.search_cfg, self.vocab, strategy=row.strategy)
        if base is not None and row.budget > 1:
            sized = size_for_budget(spec, row.budget * base["tokens_per_problem"], base["tokens_per_problem"],
                                    base["steps_per_problem"])
            spec = resolve(dataclasses.replace(spec, **sized))
        return spec

    def pool(self, row: Row, base: dict | None) -> tuple[list[Searched], float, SearchSpec, float]:
        """Every problem searched as the row searches: the `Searched`, the seconds searching, the spec, and the
        seconds compiling (0 when an earlier row compiled the program). Best-of-N's three rules read one pool."""
        from tqdm import tqdm

        spec = self.spec_for(row, base)
        key = (row.policy, row.strategy, row.budget, row.pool_scorer)
        if key in self.pools:  # its program's compile time went to the row that ran it
            problems, seconds, spec, _ = self.pools[key]
            return problems, seconds, spec, 0.0
        searcher = self.searcher_for(row.pool_scorer, row.policy)
        problems, seconds, compiled_before = [], 0.0, searcher.compile_seconds
        with tqdm(total=sum(len(b.rows) for b in self.batches), unit="problem", desc=f"{row.name} x{row.budget}",
                  disable=not self.show_progress, leave=False) as bar:
            for batch in self.batches:
                searched, batch_seconds = search_problems(searcher, spec, batch, self.vocab, self.search_cfg.seed)
                problems += searched
                seconds += batch_seconds
                bar.update(len(batch.rows))
        self.pools[key] = (problems, seconds, spec, searcher.compile_seconds - compiled_before)
        return self.pools[key]

    def run(self, row: Row, out_dir: Path, base: dict | None) -> dict:
        """The row's summary (`row_summary`), its per-problem records written beside it."""
        problems, seconds, spec, compile_seconds = self.pool(row, base)
        scores = None
        if row.scorer == "checker":
            scores, seconds = checker_scores(problems, seconds)
        if row.scorer == "orm":
            flat, rescore_seconds, rescore_compile = self.rescore([(p.problem, c.text) for p in problems
                                                                   for c in p.candidates])
            seconds, compile_seconds = seconds + rescore_seconds, compile_seconds + rescore_compile
            ends = np.cumsum([len(p.candidates) for p in problems])
            scores = [flat[end - len(p.candidates) : end] for p, end in zip(problems, ends, strict=True)]
        records = row_records(row, problems, scores)
        write_atomic(out_dir / f"{row.key}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        summary = row_summary(row, records, spec, seconds, compile_seconds)
        write_atomic(out_dir / f"{row.key}.json", json.dumps(summary) + "\n")
        return summary


def checker_scores(problems: list[Searched], seconds: float) -> tuple[list[list[float]], float]:
    """Each chain's verdict by its task's prompt-only verifier (1.0 or 0.0; never the reference answer),
    and `seconds` plus the time it took."""
    import time

    from tasks import get_task

    start = time.perf_counter()
    scores = [[get_task(p.problem.task).score_from_prompt(p.problem.prompt, c.text)[0] for c in p.candidates]
              for p in problems]
    return scores, seconds + time.perf_counter() - start


def row_line(summary: dict) -> str:
    """A row's summary on one line, as the demo prints each row it runs."""
    return (f"  {summary['name']:<28} x{summary['budget']:<3} {summary['size']:<28} accuracy "
            f"{summary['accuracy']:.3f}  {summary['tokens_per_problem']:>8.0f} tokens/problem  "
            f"{summary['problems_per_s']:.2f} problems/s")


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
    """Accuracy against tokens per problem (log x), one line per strategy; written to `path` (PNG) whole.

    Each policy's one sample starts its lines; its greedy chain is a marker and a dotted horizontal line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = {r.get("policy", "sft"): r for r in results if r["strategy"] == "sample"}
    lines: dict[str, list[dict]] = {}
    for r in results:
        if r["strategy"] not in BASELINES:
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
    for greedy in (r for r in results if r["strategy"] == "greedy"):
        sft = greedy.get("policy", "sft") == "sft"
        ax.axhline(100 * greedy["accuracy"], color="gray", linestyle=":" if sft else "-.", linewidth=1.2)
        ax.scatter([greedy["tokens_per_problem"]], [100 * greedy["accuracy"]], color="gray", zorder=5,
                   marker="D" if sft else "d", label=f"{greedy['name']} (temperature 0)")
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem (log scale)")
    ax.set_ylabel("accuracy on held-out problems (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # beside the curves
    fig.tight_layout()
    with atomic_path(path, mode=0o644) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def findings(results: list[dict]) -> list[str]:
    """What the table shows, per policy: its best search against the better of its `BASELINES` (one line each).

    A gain over one sample alone would count the noise of sampling as a gain of thinking; the
    better of greedy decoding and one sample is the model's best single answer.
    """
    lines = []
    for policy in dict.fromkeys(r.get("policy", "sft") for r in results):
        rows = [r for r in results if r.get("policy", "sft") == policy]
        baselines = [r for r in rows if r["strategy"] in BASELINES]
        searches = [r for r in rows if r["strategy"] not in BASELINES]
        if not baselines or not searches:
            continue
        rank = lambda r: (r["accuracy"], -r["tokens_per_problem"])  # noqa: E731 (ties: the cheaper)
        base, best = max(baselines, key=rank), max(searches, key=rank)
        singles = ", ".join(f"{r['name']} {100 * r['accuracy']:.1f}% at {r['tokens_per_problem']:.0f} tokens"
                            for r in baselines)
        beating = sum(r["accuracy"] > base["accuracy"] for r in searches)
        lines.append(f"{policy}: best single answer {base['name']} ({singles}); best search {best['name']} "
                     f"x{best['budget']} {100 * best['accuracy']:.1f}% at {best['tokens_per_problem']:.0f} tokens: "
                     f"{100 * (best['accuracy'] - base['accuracy']):+.1f} points over {base['name']}; "
                     f"{beating} of {len(searches)} search rows beat it")
    return lines
