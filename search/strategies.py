"""Search strategies over reasoning steps, each one jitted call batched over problems.

    sample      one chain of thought
    best_of_n   N chains; the answer by vote / the scorer's best / scorer-weighted vote (on the host)
    beam        N beams, each proposes M next steps, the best N (by scorer) go on
    dvts        N/M independent subtrees, each a greedy beam of width 1 with M proposals
    mcts        PUCT selection (priors from step log-probs), `wave` leaves expanded per
                iteration with K children each, leaf values from the scorer, mean backup;
                the answer is the end of the most visited path

`run_search(spec, ...)` returns the final tree and per-problem stats (generated tokens,
policy and scorer FLOPs, expansions); `candidates` reads the finished chains off the tree.
Every expansion decodes the children of many leaves of every problem in one batched call
(`expand`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from model.flops import decode_flops
from model.paged import init_cache
from model.sharding import logical_to_spec
from search.sampler import EOS_ID, Sampling, decode_loop, pages_for
from search.scorers import Scorer, Steps
from search.tree import Tree, allocate, copy_pages, empty_tree, prune, release

STRATEGIES = ("sample", "best_of_n", "beam", "dvts", "mcts")


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

    @property
    def groups(self) -> int:
        return 1 if self.strategy == "beam" else max(self.n // self.m, 1)

    @property
    def width(self) -> int:
        return self.n if self.strategy == "beam" else 1

    @property
    def max_children(self) -> int:
        if self.strategy in ("sample", "best_of_n"):
            return self.n  # the root's chains; resolve() makes n = 1 for sample
        if self.strategy == "mcts":
            return self.children
        return max(self.groups * self.width * self.m, self.m)

    @property
    def num_nodes(self) -> int:
        if self.strategy == "sample":
            return 1 + self.max_steps
        if self.strategy == "best_of_n":
            return 1 + self.n * self.max_steps
        if self.strategy == "mcts":
            return 1 + self.children * (1 + self.simulations) + self.max_steps
        return 1 + self.groups * self.width * self.m * self.max_steps

    @property
    def pages_per_node(self) -> int:
        return max(pages_for(self.max_step_tokens + 1, self.page_size) + 1, pages_for(self.max_len, self.page_size))

    @property
    def pages_per_path(self) -> int:
        return pages_for(self.max_len, self.page_size)


def resolve(spec: SearchSpec) -> SearchSpec:
    if spec.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {spec.strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if spec.aggregate not in ("last", "min", "product"):
        raise ValueError(f"search.aggregate must be last, min or product, got {spec.aggregate!r}")
    if spec.strategy == "sample":
        spec = dataclasses.replace(spec, n=1)
    if spec.strategy == "mcts" and spec.wave > spec.simulations:
        # A wave expands `wave` leaves at once: more than `simulations` would overrun the tree's
        # node budget (sized by simulations) and leave no room to finish the chosen path.
        spec = dataclasses.replace(spec, wave=spec.simulations)
    if spec.strategy == "dvts" and spec.n % spec.m:
        raise ValueError(f"dvts: n ({spec.n}) must be a multiple of m ({spec.m})")
    return spec


def default_num_pages(spec: SearchSpec, batch: int) -> int:
    """Worst case: every node keeps all its pages (pruning only ever lowers the use)."""
    per_step = pages_for(spec.max_step_tokens + 1, spec.page_size) + 1
    return batch * (spec.pages_per_path + spec.num_nodes * per_step)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SearchState:
    tree: Tree
    cache: Any  # the policy's page pool
    scorer_cache: Any
    tokens: jax.Array  # [B] generated tokens
    policy_flops: jax.Array  # [B]
    scorer_flops: jax.Array  # [B]
    expansions: jax.Array  # [B] nodes generated
    iteration: jax.Array  # scalar: expansion calls so far (feeds the sampling keys)
    rows: jax.Array  # [B] each tree's problem: its row in the whole batch (the scorer's `tree_index`)


@dataclasses.dataclass(frozen=True)
class Models:
    """What an expansion runs: the policy (graphdef, config) and the scorer, params passed beside."""

    graphdef: nnx.GraphDef
    model_cfg: Any
    scorer: Scorer


def init_search(spec, models: Models, params, scorer_params, prompts, prompt_lengths, rows=None) -> SearchState:
    """Trees holding only their prompts (node 0), prefilled into both page pools.

    rows [B]: each tree's row in the whole batch when this is one shard of it (default 0..B-1).
    """
    batch = prompts.shape[0]
    num_pages = spec.num_pages or default_num_pages(spec, batch)
    tree = empty_tree(batch, spec.num_nodes, spec.max_children, spec.max_step_tokens, spec.pages_per_node,
                      spec.pages_per_path, num_pages)
    counts = -(-prompt_lengths // spec.page_size)  # slots 0..L-1 (the pending token's slot included)
    pages, granted, free = allocate(tree.free, counts, spec.pages_per_node)
    table = pages[:, : spec.pages_per_path]  # pages_per_node >= pages_per_path: the root's pages fit
    model = nnx.merge(models.graphdef, params)
    cache = init_cache(models.model_cfg, num_pages, spec.page_size)
    _, cache = model.prefill(prompts, table, cache, prompt_lengths - 1)
    scorer_cache = models.scorer.init_cache(num_pages, spec.page_size)
    scorer_cache = models.scorer.prefill(scorer_params, scorer_cache, prompts, table, prompt_lengths)
    pending = jnp.take_along_axis(prompts, (prompt_lengths - 1)[:, None], axis=1)[:, 0]
    tree = dataclasses.replace(
        tree,
        alive=tree.alive.at[:, 0].set(True),
        visits=tree.visits.at[:, 0].set(1.0),
        kv_len=tree.kv_len.at[:, 0].set(prompt_lengths - 1),
        pending=tree.pending.at[:, 0].set(pending),
        own_pages=tree.own_pages.at[:, 0].set(pages),
        page_table=tree.page_table.at[:, 0].set(table),
        free=free,
        out_of_room=~granted,
    )
    zeros = jnp.zeros((batch,), jnp.float32)
    prefill_flops = decode_flops(models.model_cfg, jnp.zeros_like(prompt_lengths), prompt_lengths - 1)
    rows = jnp.arange(batch) if rows is None else rows
    return SearchState(tree, cache, scorer_cache, zeros, prefill_flops, zeros, zeros, jnp.zeros((), jnp.int32), rows)


def _ancestors(tree: Tree, b: jax.Array, node: jax.Array, depth: int) -> jax.Array:
    """[R, depth] node ids from the root's child down to `node` (-1 padding in front)."""

    def up(carry, _):
        current = carry
        parent = jnp.where(current > 0, tree.parent[b, jnp.maximum(current, 0)], -1)
        return parent, current

    _, chain = jax.lax.scan(up, node, None, length=depth)  # chain[i] = i-th ancestor (0: node itself)
    chain = jnp.where(chain > 0, chain, -1).T  # [R, depth], node first
    return chain[:, ::-1]


def expand(spec: SearchSpec, models: Models, params, scorer_params, keys, state: SearchState, leaves: jax.Array,
           num_children: int) -> tuple[SearchState, jax.Array]:
    """Generates `num_children` next steps under each leaf [B, E] (-1: none) in one batched decode.

    Returns the new state and the new node ids [B, E, num_children] (-1 where nothing was
    made: no leaf, a terminal leaf, or no room for nodes or pages, which sets `out_of_room`).
    """
    tree = state.tree
    batch, leaves_per_tree = leaves.shape
    k = num_children
    ps, width = spec.page_size, spec.pages_per_node
    b_idx = jnp.broadcast_to(jnp.arange(batch)[:, None, None], (batch, leaves_per_tree, k)).reshape(-1)
    parent = jnp.broadcast_to(leaves[:, :, None], (batch, leaves_per_tree, k)).reshape(-1)
    safe_parent = jnp.maximum(parent, 0)
    first_of_leaf = jnp.arange(leaves_per_tree)[None, :, None] == jnp.argmax(
        leaves[:, :, None] == leaves[:, None, :], axis=2
    )[:, :, None]  # a leaf listed twice is expanded once
    unexpanded = ~(tree.children[b_idx, safe_parent] >= 0).any(axis=1)
    wanted = ((parent >= 0) & tree.alive[b_idx, safe_parent] & ~tree.terminal[b_idx, safe_parent] & unexpanded
              & jnp.broadcast_to(first_of_leaf, (batch, leaves_per_tree, k)).reshape(-1))

    start = tree.kv_len[b_idx, safe_parent]
    first_page = start // ps
    counts = jnp.where(wanted, (start + spec.max_step_tokens) // ps - first_page + 1, 0)
    pages, granted, free = allocate(tree.free, counts, width)
    valid = wanted & granted
    per_tree = valid.reshape(batch, -1)
    new_id = (tree.node_count[:, None] + jnp.cumsum(per_tree, axis=1) - 1).reshape(-1)
    fits = new_id < spec.num_nodes
    free = release(free, jnp.where((valid & ~fits)[:, None], pages, -1))
    pages = jnp.where((valid & fits)[:, None], pages, -1)
    out_of_room = tree.out_of_room | (wanted & ~(granted & fits)).reshape(batch, -1).any(axis=1)
    valid = valid & fits
    new_id = jnp.where(valid, new_id, -1)

    slots = first_page[:, None] + jnp.arange(width)[None, :]
    in_table = (pages >= 0) & (slots < spec.pages_per_path)
    parent_table = tree.page_table[b_idx, safe_parent]
    rows = jnp.arange(parent.shape[0])[:, None]
    table = parent_table.at[rows, jnp.where(in_table, slots, spec.pages_per_path)].set(pages, mode="drop")
    shares_page = (start % ps != 0) & valid
    parent_first = parent_table[jnp.arange(parent.shape[0]), first_page.clip(0, spec.pages_per_path - 1)]
    source = jnp.where(shares_page, parent_first, -1)
    cache = copy_pages(state.cache, source, jnp.where(shares_page, pages[:, 0], -1))
    scorer_cache = models.scorer.copy(state.scorer_cache, source, jnp.where(shares_page, pages[:, 0], -1))

    row_keys = jax.vmap(lambda key, r: jax.random.fold_in(jax.random.fold_in(key, state.iteration), r))(
        keys[b_idx], jnp.tile(jnp.arange(leaves_per_tree * k), batch)
    )
    parent_pending = tree.pending[b_idx, safe_parent]
    generated = decode_loop(
        models.graphdef, params, cache, table, start, parent_pending, valid, row_keys,
        max_new=spec.max_step_tokens, stop_ids=(spec.delimiter, EOS_ID), sampling=spec.sampling,
    )
    num = generated.num
    last_token = jnp.take_along_axis(generated.tokens, (num - 1).clip(0)[:, None], axis=1)[:, 0]

    # Keep the pages covering slots start..start+num (the new pending token's slot too); free the rest.
    keep = valid[:, None] & (slots <= (start + num)[:, None] // ps) & (pages >= 0)
    free = release(free, jnp.where(keep, -1, pages))
    pages = jnp.where(keep, pages, -1)
    table = jnp.where(jnp.arange(spec.pages_per_path)[None, :] <= ((start + num) // ps)[:, None], table, -1)

    steps = Steps(table, start, parent_pending, generated.tokens, generated.logprobs, num, valid, state.rows[b_idx])
    path = None
    if models.scorer.needs_path:
        chain = _ancestors(tree, b_idx, jnp.where(valid, parent, 0), spec.max_steps)
        path = (tree.tokens[b_idx[:, None], chain.clip(0)] * (chain >= 0)[..., None],
                jnp.where(chain >= 0, tree.step_len[b_idx[:, None], chain.clip(0)], 0))
    scores, scorer_cache = models.scorer.score(scorer_params, scorer_cache, steps, path)
    scores = jnp.where(valid, scores, 0.0)

    depth = tree.depth[b_idx, safe_parent] + 1
    kv_len = start + num
    terminal = (last_token == EOS_ID) | (depth >= spec.max_steps) | (kv_len + spec.max_step_tokens + 1 > spec.max_len)
    slot = jnp.tile(jnp.repeat(jnp.arange(k)[None, :], leaves_per_tree, axis=0).reshape(-1), batch)
    node = jnp.where(valid, new_id, spec.num_nodes)  # out of range -> dropped
    parent_min = tree.path_min[b_idx, safe_parent]
    parent_prod = tree.path_prod[b_idx, safe_parent]

    def put(array, values):
        return array.at[b_idx, node].set(values, mode="drop")

    tree = dataclasses.replace(
        tree,
        parent=put(tree.parent, parent),
        children=tree.children.at[b_idx, jnp.where(valid, parent, spec.num_nodes), slot].set(new_id, mode="drop"),
        depth=put(tree.depth, depth),
        prior=put(tree.prior, jnp.sum(generated.logprobs, axis=1)),
        score=put(tree.score, scores),
        path_min=put(tree.path_min, jnp.minimum(parent_min, scores)),
        path_prod=put(tree.path_prod, parent_prod * scores),
        terminal=put(tree.terminal, terminal),
        alive=put(tree.alive, True),
        tokens=tree.tokens.at[b_idx, node].set(generated.tokens, mode="drop"),
        step_len=put(tree.step_len, num),
        kv_len=put(tree.kv_len, kv_len),
        pending=put(tree.pending, last_token),
        own_pages=tree.own_pages.at[b_idx, node].set(pages, mode="drop"),
        page_table=tree.page_table.at[b_idx, node].set(table, mode="drop"),
        node_count=tree.node_count + valid.reshape(batch, -1).sum(axis=1),
        free=free,
        out_of_room=out_of_room,
    )
    per_row = lambda x: jnp.zeros((batch,), jnp.float32).at[b_idx].add(jnp.where(valid, x, 0))  # noqa: E731
    state = SearchState(
        tree, generated.cache, scorer_cache,
        tokens=state.tokens + per_row(num.astype(jnp.float32)),
        policy_flops=state.policy_flops + per_row(decode_flops(models.model_cfg, start, num)),
        scorer_flops=state.scorer_flops + per_row(models.scorer.flops(start, num)),
        expansions=state.expansions + per_row(jnp.ones_like(start, jnp.float32)),
        iteration=state.iteration + 1,
        rows=state.rows,
    )
    return state, new_id.reshape(batch, leaves_per_tree, k)


def path_score(spec: SearchSpec, tree: Tree) -> jax.Array:
    """[B, N] each node's path score under the spec's aggregation."""
    return {"last": tree.score, "min": tree.path_min, "product": tree.path_prod}[spec.aggregate]


def _complete(spec, models, params, scorer_params, keys, state, leaves):
    """Extends every non-terminal leaf [B, E] one step at a time until all are terminal (or stuck)."""

    def cond(carry):
        state, leaves, steps = carry
        tree = state.tree
        b = jnp.arange(leaves.shape[0])[:, None]
        open_ = (leaves >= 0) & ~tree.terminal[b, leaves.clip(0)] & tree.alive[b, leaves.clip(0)]
        return jnp.any(open_) & (steps < spec.max_steps)

    def body(carry):
        state, leaves, steps = carry
        state, new = expand(spec, models, params, scorer_params, keys, state, leaves, 1)
        new = new[:, :, 0]
        return state, jnp.where(new >= 0, new, leaves), steps + 1

    state, leaves, _ = jax.lax.while_loop(cond, body, (state, leaves, jnp.zeros((), jnp.int32)))
    return state, leaves


def _best_of_n(spec, models, params, scorer_params, keys, state):
    root = jnp.zeros((state.tree.batch, 1), jnp.int32)
    state, first = expand(spec, models, params, scorer_params, keys, state, root, spec.n)
    return _complete(spec, models, params, scorer_params, keys, state, first.reshape(state.tree.batch, spec.n))


def duplicates(tree, children, exists) -> jax.Array:
    """[B, G, C] bool: a child whose parent and step tokens equal those of an earlier child in its group."""
    b = jnp.arange(children.shape[0])[:, None, None]
    safe = children.clip(0)
    parent, length, tokens = tree.parent[b, safe], tree.step_len[b, safe], tree.tokens[b, safe]  # tokens [B,G,C,S]
    width = tokens.shape[-1]
    same_tokens = jnp.all((tokens[:, :, :, None] == tokens[:, :, None, :])
                          | (jnp.arange(width) >= length[:, :, :, None, None]), axis=-1)  # [B, G, C, C']
    same = (same_tokens & (parent[:, :, :, None] == parent[:, :, None, :])
            & (length[:, :, :, None] == length[:, :, None, :]) & exists[:, :, None, :])
    earlier = jnp.arange(children.shape[2])[None, :] < jnp.arange(children.shape[2])[:, None]  # [C, C']: c' < c
    return jnp.any(same & earlier, axis=-1)


def beam_order(scores: jax.Array, repeat: jax.Array, open_: jax.Array) -> jax.Array:
    """Indices along the last axis: open distinct children by score, then open repeats by score, then the rest."""
    return jnp.lexsort((-scores, repeat, ~open_), axis=-1)


def _select_beams(spec, tree, children, groups, width):
    """Per group, the `width` best non-terminal children [B, G, C] by path score; prunes the rest.

    A child that repeats an earlier sibling's step (same parent, same tokens) ranks after every
    distinct child: otherwise a likely step sampled M times fills M beams with one path, and
    more beams would add copies rather than alternatives. Terminal children stay (they are
    finished candidates) but give their pages back.
    """
    batch = children.shape[0]
    b = jnp.arange(batch)[:, None, None]
    safe = children.clip(0)
    exists = (children >= 0) & tree.alive[b, safe]
    open_ = exists & ~tree.terminal[b, safe]
    scores = jnp.where(open_, path_score(spec, tree)[b, safe], -jnp.inf)
    top = beam_order(scores, duplicates(tree, children, open_), open_)[..., :width]  # [B, G, W]
    chosen = jnp.where(jnp.take_along_axis(open_, top, axis=2), jnp.take_along_axis(children, top, axis=2), -1)
    keep = jnp.zeros((batch, tree.num_nodes), bool).at[jnp.arange(batch)[:, None], chosen.reshape(batch, -1).clip(0)
                                                       ].set(chosen.reshape(batch, -1) >= 0)
    created = jnp.zeros((batch, tree.num_nodes), bool).at[jnp.arange(batch)[:, None], safe.reshape(batch, -1)].set(
        exists.reshape(batch, -1))
    finished = created & tree.terminal
    tree = prune(tree, created & ~keep & ~finished)
    # finished nodes are never extended: their pages go back to the pool, the node stays a candidate
    tree = dataclasses.replace(tree, free=release(tree.free, jnp.where(finished[..., None], tree.own_pages, -1)),
                               own_pages=jnp.where(finished[..., None], -1, tree.own_pages))
    return tree, chosen.reshape(batch, groups * width)


def _prune_dead_branches(spec, tree):
    """Prunes expanded, non-terminal nodes none of whose children is alive (repeatedly, up the tree)."""

    def body(_, tree):
        b = jnp.arange(tree.batch)[:, None, None]
        kids = tree.children
        has_children = (kids >= 0).any(axis=2)
        any_alive = ((kids >= 0) & tree.alive[b, kids.clip(0)]).any(axis=2)
        return prune(tree, has_children & ~any_alive & ~tree.terminal)

    return jax.lax.fori_loop(0, spec.max_steps, body, tree)


def _beam(spec, models, params, scorer_params, keys, state):
    groups, width = spec.groups, spec.width
    batch = state.tree.batch
    root = jnp.zeros((batch, 1), jnp.int32)
    state, first = expand(spec, models, params, scorer_params, keys, state, root, groups * width * spec.m)
    tree, leaves = _select_beams(spec, state.tree, first.reshape(batch, groups, width * spec.m), groups, width)
    state = dataclasses.replace(state, tree=tree)

    def cond(carry):
        state, leaves, steps = carry
        return jnp.any(leaves >= 0) & (steps < spec.max_steps)

    def body(carry):
        state, leaves, steps = carry
        state, new = expand(spec, models, params, scorer_params, keys, state, leaves, spec.m)
        tree, leaves = _select_beams(spec, state.tree, new.reshape(batch, groups, width * spec.m), groups, width)
        tree = _prune_dead_branches(spec, tree)
        return dataclasses.replace(state, tree=tree), leaves, steps + 1

    state, leaves, _ = jax.lax.while_loop(cond, body, (state, leaves, jnp.ones((), jnp.int32)))
    return state, leaves


# -- MCTS --


def puct_scores(tree: Tree, b, node, spec: SearchSpec, visits=None, value_sum=None) -> jax.Array:
    """PUCT of node's children [K] as in mctx.muzero_action_selection (raw Q; unvisited Q = 0)."""
    visits = tree.visits if visits is None else visits
    value_sum = tree.value_sum if value_sum is None else value_sum
    kids = tree.children[b, node]
    safe = kids.clip(0)
    exists = (kids >= 0) & tree.alive[b, safe]
    child_visits = jnp.where(exists, visits[b, safe], 0.0)
    q = jnp.where(child_visits > 0, value_sum[b, safe] / jnp.maximum(child_visits, 1.0), 0.0)
    prior = jax.nn.softmax(jnp.where(exists, tree.prior[b, safe], -jnp.inf))
    node_visits = visits[b, node]
    pb_c = spec.c1 + jnp.log((node_visits + spec.c2 + 1.0) / spec.c2)
    score = q + jnp.sqrt(node_visits) * pb_c * prior / (child_visits + 1.0)
    return jnp.where(exists, score, -jnp.inf)


def _select_leaf(spec, tree, b, visits, value_sum, blocked=None):
    """Descends from the root by PUCT to the first unvisited (or terminal, or childless) node.

    blocked: [N] bool, children not to enter while another child of the node is open (the
    leaves already picked in this wave, and nodes with nothing but such leaves below).
    """

    def cond(carry):
        node, done, _ = carry
        return ~done

    def body(carry):
        node, _, depth = carry
        kids = tree.children[b, node]
        has_kids = ((kids >= 0) & tree.alive[b, kids.clip(0)]).any()
        scores = puct_scores(tree, b, node, spec, visits, value_sum)
        if blocked is not None:
            open_scores = jnp.where(blocked[kids.clip(0)], -jnp.inf, scores)
            scores = jnp.where(jnp.isfinite(open_scores).any(), open_scores, scores)
        child = kids[jnp.argmax(scores)]
        stop_here = ~has_kids
        nxt = jnp.where(stop_here, node, child)
        done = stop_here | (visits[b, nxt] == 0) | tree.terminal[b, nxt] | (depth >= spec.max_steps)
        return nxt, done, depth + 1

    zero = jnp.zeros((), jnp.int32)
    node, _, _ = jax.lax.while_loop(cond, body, (zero, jnp.zeros((), bool), zero))
    return node


def _path_mask(tree: Tree, b, node, max_depth: int) -> jax.Array:
    """[N] bool: the nodes on the root-to-node path (root included)."""

    def body(_, carry):
        mask, current = carry
        mask = mask.at[jnp.maximum(current, 0)].set(mask[jnp.maximum(current, 0)] | (current >= 0))
        return mask, jnp.where(current >= 0, tree.parent[b, jnp.maximum(current, 0)], -1)

    mask, _ = jax.lax.fori_loop(0, max_depth + 2, body, (jnp.zeros((tree.num_nodes,), bool), node))
    return mask


def select_wave(spec: SearchSpec, tree: Tree, wave: int) -> jax.Array:
    """[B, wave] leaves picked one after another, each path getting a virtual visit (value 0).

    A picked unvisited or terminal leaf is not picked again in the wave while other open
    leaves are reachable: a virtual visit alone does not keep PUCT off it when its prior
    dominates, and a terminal leaf picked twice would leave a second row of the expansion
    idle. (Once a terminal leaf is the only choice it is picked again; it expands nothing
    and its value is backed up once per pick, as in sequential MCTS.)
    """

    def per_tree(b):
        def block(blocked, leaf):
            """Blocks leaf [N] and each ancestor whose live children are now all blocked."""

            def up(_, carry):
                blocked, node = carry
                parent = jnp.where(node > 0, tree.parent[b, node.clip(0)], -1)
                kids = tree.children[b, parent.clip(0)]
                live = (kids >= 0) & tree.alive[b, kids.clip(0)]
                full = (parent >= 0) & jnp.all(~live | blocked[kids.clip(0)])
                return blocked.at[parent.clip(0)].set(blocked[parent.clip(0)] | full), jnp.where(full, parent, -1)

            return jax.lax.fori_loop(0, spec.max_steps + 1, up, (blocked.at[leaf].set(True), leaf))[0]

        def pick(i, carry):
            visits, blocked, leaves = carry
            leaf = _select_leaf(spec, tree, b, visits, tree.value_sum, blocked)
            visits = visits.at[b].add(_path_mask(tree, b, leaf, spec.max_steps).astype(jnp.float32))
            closed = (tree.visits[b, leaf] == 0) | tree.terminal[b, leaf]  # nothing gained by a second pick
            blocked = jnp.where(closed, block(blocked, leaf), blocked)
            return visits, blocked, leaves.at[i].set(leaf)

        carry = (tree.visits, jnp.zeros((tree.num_nodes,), bool), jnp.zeros((wave,), jnp.int32))
        return jax.lax.fori_loop(0, wave, pick, carry)[2]

    return jax.vmap(per_tree)(jnp.arange(tree.batch))


def backup(spec: SearchSpec, tree: Tree, leaves: jax.Array) -> Tree:
    """Each selected leaf [B, W] adds one visit and its value (its score) along its path."""
    batch = tree.batch

    def per_tree(b, leaves):
        def add(i, carry):
            visits, value_sum = carry
            leaf = leaves[i]
            mask = _path_mask(tree, b, leaf, spec.max_steps).astype(jnp.float32)
            return visits + mask, value_sum + mask * tree.score[b, leaf]

        return jax.lax.fori_loop(0, leaves.shape[0], add, (tree.visits[b], tree.value_sum[b]))

    visits, value_sum = jax.vmap(per_tree)(jnp.arange(batch), leaves)
    return dataclasses.replace(tree, visits=visits, value_sum=value_sum)


def mcts_loop(spec: SearchSpec, state, expand_fn, iterations: int):
    """`iterations` rounds of: select `spec.wave` leaves, expand the unvisited ones, back up.

    `expand_fn(state, leaves [B, W]) -> state` creates the leaves' children (the LM in
    search, a fixed toy tree in tests).
    """

    def body(_, state):
        leaves = select_wave(spec, state.tree, spec.wave)
        b = jnp.arange(state.tree.batch)[:, None]
        fresh = (state.tree.visits[b, leaves] == 0) & ~state.tree.terminal[b, leaves]
        state = expand_fn(state, jnp.where(fresh, leaves, -1))
        return dataclasses.replace(state, tree=backup(spec, state.tree, leaves))

    return jax.lax.fori_loop(0, iterations, body, state)


def most_visited_path_end(spec: SearchSpec, tree: Tree) -> jax.Array:
    """[B] the node reached from the root by always taking the most visited child.

    Ties (and children never visited) go to the higher score; the walk ends at a node
    without children, which `_complete` then finishes.
    """

    def per_tree(b):
        def cond(carry):
            node, depth = carry
            kids = tree.children[b, node]
            return ((kids >= 0) & tree.alive[b, kids.clip(0)]).any() & (depth <= spec.max_steps)

        def body(carry):
            node, depth = carry
            kids = tree.children[b, node]
            safe = kids.clip(0)
            key = jnp.where((kids >= 0) & tree.alive[b, safe], tree.visits[b, safe] + 0.5 * tree.score[b, safe], -1.0)
            return kids[jnp.argmax(key)], depth + 1

        node, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)))
        return node

    return jax.vmap(per_tree)(jnp.arange(tree.batch))


def _mcts(spec, models, params, scorer_params, keys, state):
    batch = state.tree.batch
    state, _ = expand(spec, models, params, scorer_params, keys, state, jnp.zeros((batch, 1), jnp.int32),
                      spec.children)

    def expand_fn(state, leaves):
        return expand(spec, models, params, scorer_params, keys, state, leaves, spec.children)[0]

    state = mcts_loop(spec, state, expand_fn, max(spec.simulations // spec.wave, 1))
    end = most_visited_path_end(spec, state.tree)
    return _complete(spec, models, params, scorer_params, keys, state, end[:, None])


def run_search(spec: SearchSpec, models: Models, params, scorer_params, prompts, prompt_lengths, keys):
    """The whole search for a batch of prompts [B, T] (BOS + prompt, right-padded); keys [B].

    Jit with `spec` and `models` static. Returns (state, chosen [B, C]): the final tree and
    stats, and the candidate leaves the strategy ends with (-1: none).

    Under `jax.set_mesh`, the problems are split over the mesh axes the model's rules give
    the batch (`search_batch_axes`), with `shard_map`: each shard grows the trees of its own
    problems in its own page pool, and no tree or page crosses devices. The parameters enter
    whole over those axes (gathered once per call when FSDP splits them) and keep their
    sharding over the others (tensor; the oracle scorer makes every axis manual, see below).
    The returned state is the shards' states side by side:
    tree arrays and stats by problem, each pool's pages after the previous shard's (page ids
    in a tree are its shard's own), `iteration` one per shard.
    """
    spec = resolve(spec)
    batch = prompts.shape[0]
    axes = search_batch_axes(models, params, batch)
    if not axes:
        return _search(spec, models, params, scorer_params, prompts, prompt_lengths, keys, jnp.arange(batch))
    split, pages = P(axes), P(None, axes)

    def shard(params, scorer_params, prompts, prompt_lengths, keys, rows):
        state, chosen = _search(spec, models, params, scorer_params, prompts, prompt_lengths, keys, rows)
        return dataclasses.replace(state, iteration=state.iteration[None]), chosen

    def out_spec(state):
        per_problem = jax.tree.map(lambda _: split, dataclasses.replace(state, cache=None, scorer_cache=None))
        pools = {name: jax.tree.map(lambda _: pages, getattr(state, name)) for name in ("cache", "scorer_cache")}
        return dataclasses.replace(per_problem, **pools), split

    mesh = jax.sharding.get_abstract_mesh()
    # JAX runs host callbacks (the oracle's) only where every mesh axis is manual: the other
    # axes then hold whole replicas of the shard's work instead of splitting its matmuls.
    manual = set(mesh.axis_names) if models.scorer.oracle else set(axes)
    shapes = jax.eval_shape(shard, params, scorer_params, prompts, prompt_lengths, keys, jnp.arange(batch))
    run = jax.shard_map(shard, mesh=mesh, in_specs=(P(), P(), split, split, split, split),
                        out_specs=out_spec(shapes[0]), axis_names=manual, check_vma=False)
    return run(params, scorer_params, prompts, prompt_lengths, keys, jnp.arange(batch))


def search_batch_axes(models: Models, params, batch: int) -> tuple[str, ...]:
    """The mesh axes (of the current `jax.set_mesh`, with more than one device) that split a search's problems.

    Those the model's rules give the batch and that divide `batch`; none outside a mesh.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    rules = nnx.merge(models.graphdef, params).rules
    spec = logical_to_spec(("batch",), rules, mesh, (batch,))[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return tuple(axis for axis in axes if mesh.shape[axis] > 1)


def _search(spec, models, params, scorer_params, prompts, prompt_lengths, keys, rows):
    state = init_search(spec, models, params, scorer_params, prompts, prompt_lengths, rows)
    run = {"sample": _best_of_n, "best_of_n": _best_of_n, "beam": _beam, "dvts": _beam, "mcts": _mcts}[spec.strategy]
    return run(spec, models, params, scorer_params, keys, state)


# -- on the host: candidates and the answer --


@dataclasses.dataclass
class Candidate:
    node: int
    text: str
    answer: str | None
    score: float  # path score under the spec's aggregation
    logprob: float  # sum of the path's step log-probs
    finished: bool


def candidates(spec: SearchSpec, state: SearchState, chosen: jax.Array, vocab) -> list[list[Candidate]]:
    """Per problem, its finished chains (every terminal node for beam/dvts; the chosen leaves otherwise)."""
    from search.sampler import decode_text
    from search.tree import path_nodes, path_tokens
    from tasks.base import final_answer

    tree = jax.tree.map(np.asarray, state.tree)
    scores = np.asarray(path_score(spec, state.tree))
    out = []
    for b in range(tree.parent.shape[0]):
        if spec.strategy in ("beam", "dvts"):
            count = int(tree.node_count[b])
            nodes = [n for n in range(1, count) if tree.terminal[b, n]]
            nodes += [int(n) for n in np.asarray(chosen[b]) if n >= 0 and not tree.terminal[b, n]]
        else:
            nodes = [int(n) for n in np.asarray(chosen[b]) if n >= 0]
        row = []
        for n in nodes:
            text = decode_text(vocab, path_tokens(tree, b, n))
            logprob = float(sum(tree.prior[b, m] for m in path_nodes(tree, b, n)))
            row.append(Candidate(n, text, final_answer(text), float(scores[b, n]), logprob, bool(tree.terminal[b, n])))
        out.append(row)
    return out


def choose(cands: list[Candidate], rule: str, canonical=lambda answer: answer) -> Candidate | None:
    """The answer: `majority` (self-consistency), `best` (highest score) or `weighted` (score-weighted vote).

    Candidates without an answer never win a vote; ties go to the higher total score.
    `canonical` maps an answer to the form votes are counted in.
    """
    answered = [c for c in cands if c.answer is not None]
    if not answered:
        return cands[0] if cands else None
    if rule == "best":
        return max(answered, key=lambda c: c.score)
    weights: dict[str, float] = {}
    totals: dict[str, float] = {}
    for c in answered:
        key = canonical(c.answer)
        weights[key] = weights.get(key, 0.0) + (1.0 if rule == "majority" else c.score)
        totals[key] = totals.get(key, 0.0) + c.score
    if rule not in ("majority", "weighted"):
        raise ValueError(f"unknown selection rule {rule!r}; expected majority, best or weighted")
    winner = max(weights, key=lambda key: (weights[key], totals[key]))
    return max((c for c in answered if canonical(c.answer) == winner), key=lambda c: c.score)


def size_for_budget(strategy: str, budget_tokens: float, tokens_per_chain: float, steps_per_chain: float,
                    m: int, children: int) -> dict[str, int]:
    """N / beams / simulations that spend about `budget_tokens` generated tokens per problem.

    A chain costs `tokens_per_chain` (measured by a pilot `sample`); beam and dvts generate
    M proposals per kept step; an MCTS expansion generates K steps of tokens_per_chain /
    steps_per_chain tokens.
    """
    chains = max(budget_tokens / max(tokens_per_chain, 1.0), 1.0)
    if strategy == "sample":
        return {"n": 1}
    if strategy == "best_of_n":
        return {"n": max(int(round(chains)), 1)}
    if strategy == "beam":
        return {"n": max(int(round(chains / m)), 1)}
    if strategy == "dvts":
        return {"n": max(int(round(chains / m)), 1) * m}
    step_tokens = tokens_per_chain / max(steps_per_chain, 1.0)
    expansions = budget_tokens / max(children * step_tokens, 1.0) - steps_per_chain
    return {"simulations": max(int(math.floor(expansions)), 1)}
