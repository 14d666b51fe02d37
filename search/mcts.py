"""MCTS over reasoning steps: PUCT selection in waves, batched expansion, mean backup.

Each iteration selects `spec.wave` leaves per tree one after another (a virtual visit on
each picked path keeps the next pick off it), expands the unvisited ones with K children in
one batched call (priors: the steps' log-probs), and backs up each leaf's score as its value.
The answer is the end of the most visited path, finished one step at a time. Select and
backup follow mctx (`muzero_action_selection`, raw Q, unvisited Q = 0) on the arrays of
`search/tree.py`; `mcts_loop` takes any `expand_fn`, so tests run it on a toy tree.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from search.expand import complete, expand
from search.spec import SearchSpec
from search.state import Models, SearchState
from search.tree import Tree


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
    without children, which `complete` then finishes.
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


def mcts(spec: SearchSpec, models: Models, params, scorer_params, keys: jax.Array, state: SearchState):
    """(state, the answer's end [B, 1]): K children of the root, then the waves, then the most visited path."""
    batch = state.tree.batch
    state, _ = expand(spec, models, params, scorer_params, keys, state, jnp.zeros((batch, 1), jnp.int32),
                      spec.children)

    def expand_fn(state, leaves):
        return expand(spec, models, params, scorer_params, keys, state, leaves, spec.children)[0]

    state = mcts_loop(spec, state, expand_fn, max(spec.simulations // spec.wave, 1))
    end = most_visited_path_end(spec, state.tree)
    return complete(spec, models, params, scorer_params, keys, state, end[:, None])
