"""What a search is, statically: `SearchSpec` (a jit static argument) and the per-strategy table.

`STRATEGIES` holds one `Strategy` per name: how its spec sizes the tree (children per node,
node budget), how a token budget sizes it (`size_for_budget`), how tools describe and label
it. `ponder search`, the demo, the bench and RL search distillation read this table instead
of switching on strategy names. `spec_from_config` is the one way a `SearchConfig` becomes a
spec. The strategies themselves run in `search/best_of_n.py`, `beam.py` and `mcts.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from search.sampler import Sampling, pages_for

AGGREGATES = ("last", "min", "product")


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """Static shape of one search (hashable: a jit static argument)."""

    strategy: str = "beam"
    n: int = 4  # chains (best_of_n), beams (beam), total width (dvts)
    m: int = 4  # proposals per beam (beam, dvts)
    children: int = 4  # K children per MCTS expansion
    simulations: int = 16  # MCTS leaves visited in all
    wave: int = 4  # MCTS leaves selected per iteration (virtual loss between them)
    c1: float = 1.25  # PUCT constants, as in MuZero / mctx
    c2: float = 19652.0
    max_steps: int = 12  # steps per chain (the answer line counts)
    max_step_tokens: int = 48  # tokens per step
    max_len: int = 512  # context limit: prompt + all steps
    page_size: int = 16
    num_pages: int = 0  # 0: enough for the worst case
    aggregate: str = "last"  # how a path's step scores combine: last, min, product
    sampling: Sampling = Sampling()
    delimiter: int = 13  # the step delimiter token ("\n" in the byte vocabulary)
    eos: int = 1  # the vocabulary's end-of-sequence id: a chain that emits it is finished

    @property
    def groups(self) -> int:
        """Independent beam groups (beam: 1; dvts: n / m subtrees)."""
        return STRATEGIES[self.strategy].beams(self)[0]

    @property
    def width(self) -> int:
        """Beams per group (beam: n; dvts: 1)."""
        return STRATEGIES[self.strategy].beams(self)[1]

    @property
    def max_children(self) -> int:
        return STRATEGIES[self.strategy].max_children(self)

    @property
    def num_nodes(self) -> int:
        return STRATEGIES[self.strategy].num_nodes(self)

    @property
    def pages_per_node(self) -> int:
        return max(pages_for(self.max_step_tokens + 1, self.page_size) + 1, pages_for(self.max_len, self.page_size))

    @property
    def pages_per_path(self) -> int:
        return pages_for(self.max_len, self.page_size)


Sizer = Callable[[SearchSpec], int]


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One strategy's static facts. Sizes are per problem; `knobs` are (SearchSpec field, short label)."""

    name: str
    description: str  # one line, as tools print it
    guided: bool  # the scorer decides which steps go on (else it only scores the finished chains)
    keeps_finished: bool  # its candidates are every finished chain of the tree, not only the chosen leaves
    knobs: tuple[tuple[str, str], ...]  # the fields that size it, printed as field=value (short: label=value)
    max_children: Sizer  # children slots per node
    num_nodes: Sizer  # the tree's node budget
    expansion_rows: Sizer  # steps decoded at once at its widest expansion
    budget: Callable[[SearchSpec, float, float, float], dict[str, int]]  # see `size_for_budget`
    beams: Callable[[SearchSpec], tuple[int, int]] = lambda spec: (1, 1)  # (groups, beams per group)
    canonical: Callable[[SearchSpec], SearchSpec] = lambda spec: spec  # checked, in its one compiled form

    def size(self, spec: SearchSpec, short: bool = False) -> str:
        """The knobs' values, e.g. `n=4 m=4` (short: the demo table's labels, e.g. `beams=4 m=4`)."""
        return " ".join(f"{label if short else field}={getattr(spec, field)}" for field, label in self.knobs)


def _beam_children(spec: SearchSpec) -> int:
    groups, width = spec.groups, spec.width
    return max(groups * width * spec.m, spec.m)


def _dvts_canonical(spec: SearchSpec) -> SearchSpec:
    if spec.n % spec.m:
        raise ValueError(f"dvts: n ({spec.n}) must be a multiple of m ({spec.m})")
    return spec


def _chains(budget_tokens: float, tokens_per_chain: float) -> float:
    """How many sampled chains the budget pays for (at least one)."""
    return max(budget_tokens / max(tokens_per_chain, 1.0), 1.0)


def _mcts_budget(spec: SearchSpec, budget_tokens: float, tokens_per_chain: float, steps_per_chain: float):
    step_tokens = tokens_per_chain / max(steps_per_chain, 1.0)
    expansions = budget_tokens / max(spec.children * step_tokens, 1.0) - steps_per_chain
    return {"simulations": max(int(math.floor(expansions)), 1)}


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy(
        "sample", "one chain of thought", guided=False, keeps_finished=False, knobs=(("n", "n"),),
        max_children=lambda s: s.n, num_nodes=lambda s: 1 + s.max_steps, expansion_rows=lambda s: s.n,
        budget=lambda s, budget, per_chain, steps: {"n": 1},
        canonical=lambda s: dataclasses.replace(s, n=1)),
    Strategy(
        # the model's single most likely chain: the baseline any thinking compute has to beat
        "greedy", "one chain at temperature 0 (the most likely token each time)", guided=False,
        keeps_finished=False, knobs=(("n", "n"),),
        max_children=lambda s: s.n, num_nodes=lambda s: 1 + s.max_steps, expansion_rows=lambda s: s.n,
        budget=lambda s, budget, per_chain, steps: {"n": 1},
        canonical=lambda s: dataclasses.replace(s, n=1, sampling=Sampling(0.0))),
    Strategy(
        "best_of_n", "N chains; the answer by vote, the scorer's best, or a scorer-weighted vote",
        guided=False, keeps_finished=False, knobs=(("n", "n"),),
        max_children=lambda s: s.n, num_nodes=lambda s: 1 + s.n * s.max_steps, expansion_rows=lambda s: s.n,
        budget=lambda s, budget, per_chain, steps: {"n": max(int(round(_chains(budget, per_chain))), 1)}),
    Strategy(
        "beam", "N beams, each proposes M next steps, the best N (by the scorer) go on",
        guided=True, keeps_finished=True, knobs=(("n", "beams"), ("m", "m")),
        max_children=_beam_children, num_nodes=lambda s: 1 + s.groups * s.width * s.m * s.max_steps,
        expansion_rows=lambda s: s.groups * s.width * s.m,
        budget=lambda s, budget, per_chain, steps: {"n": max(int(round(_chains(budget, per_chain) / s.m)), 1)},
        beams=lambda s: (1, s.n)),
    Strategy(
        "dvts", "N/M independent subtrees, each a greedy beam of width 1 with M proposals",
        guided=True, keeps_finished=True, knobs=(("n", "n"), ("m", "m")),
        max_children=_beam_children, num_nodes=lambda s: 1 + s.groups * s.width * s.m * s.max_steps,
        expansion_rows=lambda s: s.groups * s.width * s.m,
        budget=lambda s, budget, per_chain, steps: {"n": max(int(round(_chains(budget, per_chain) / s.m)), 1) * s.m},
        beams=lambda s: (max(s.n // s.m, 1), 1), canonical=_dvts_canonical),
    Strategy(
        "mcts", "PUCT over steps: `wave` leaves expanded per iteration, K children each, scorer values "
        "backed up; the answer ends the most visited path", guided=True, keeps_finished=False,
        knobs=(("simulations", "sims"), ("children", "k"), ("wave", "wave")),
        max_children=lambda s: s.children, num_nodes=lambda s: 1 + s.children * (1 + s.simulations) + s.max_steps,
        expansion_rows=lambda s: s.children * s.wave, budget=_mcts_budget,
        # A wave expands `wave` leaves at once: more than `simulations` would overrun the tree's node
        # budget (sized by simulations) and leave no room to finish the chosen path.
        canonical=lambda s: dataclasses.replace(s, wave=s.simulations) if s.wave > s.simulations else s),
)}


def resolve(spec: SearchSpec) -> SearchSpec:
    """`spec` checked and canonical (sample: n=1; greedy: n=1 at temperature 0), so equal searches share one
    compiled program."""
    if spec.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {spec.strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if spec.aggregate not in AGGREGATES:
        raise ValueError(f"search.aggregate must be last, min or product, got {spec.aggregate!r}")
    return STRATEGIES[spec.strategy].canonical(spec)


def spec_from_config(search_cfg, vocab, **changes) -> SearchSpec:
    """The resolved `SearchSpec` that `search_cfg` (a SearchConfig) describes, with `changes` (e.g. strategy).

    The step delimiter is the vocabulary's newline; `eos` is the vocabulary's EOS id.
    """
    sampling = Sampling(search_cfg.temperature, search_cfg.top_k, search_cfg.top_p)
    fields = {field.name for field in dataclasses.fields(SearchSpec)} - {"sampling", "delimiter", "eos"}
    spec = SearchSpec(**{name: getattr(search_cfg, name) for name in fields}, sampling=sampling,
                      delimiter=int(vocab.encode("\n")[-1]), eos=int(vocab.eos_id))
    return resolve(dataclasses.replace(spec, **changes))


def default_num_pages(spec: SearchSpec, batch: int) -> int:
    """Worst case: every node keeps all its pages (pruning only ever lowers the use)."""
    per_step = pages_for(spec.max_step_tokens + 1, spec.page_size) + 1
    return batch * (spec.pages_per_path + spec.num_nodes * per_step)


def size_for_budget(spec: SearchSpec, budget_tokens: float, tokens_per_chain: float,
                    steps_per_chain: float) -> dict[str, int]:
    """N / beams / simulations that spend about `budget_tokens` generated tokens per problem.

    A chain costs `tokens_per_chain` (measured by a pilot `sample`); beam and dvts generate
    M proposals per kept step; an MCTS expansion generates K steps of tokens_per_chain /
    steps_per_chain tokens.
    """
    return STRATEGIES[spec.strategy].budget(spec, budget_tokens, tokens_per_chain, steps_per_chain)
