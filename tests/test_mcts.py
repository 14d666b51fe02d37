"""MCTS on a toy tree with fixed priors and values: the same visit counts as mctx.muzero_policy; waves."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import mctx
import numpy as np
import pytest

from search.mcts import mcts_loop, select_wave
from search.spec import SearchSpec
from search.tree import Tree, check_invariants, empty_tree

K = 3  # actions (children) per node
BATCH = 4
SIMULATIONS = 40


# -- the toy tree: an implicit infinite K-ary tree, nodes named by a hashed id (root 0) --
# An integer hash instead of jax.random keeps the compiled searches small (threefry is not).


def mix(x: jax.Array) -> jax.Array:
    """lowbias32 integer hash, uint32 -> uint32."""
    x = x.astype(jnp.uint32)
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def unit(h: jax.Array) -> jax.Array:
    """uint32 hash -> float32 in (0, 1)."""
    return ((h >> 8).astype(jnp.float32) + 0.5) / 2**24


def child_id(node_id: jax.Array, action: jax.Array) -> jax.Array:
    """Id (int32 >= 0) of `action`'s child of `node_id`, broadcast; hashed, so any depth fits."""
    return (mix(mix(node_id) + jnp.asarray(action).astype(jnp.uint32) + 1) >> 1).astype(jnp.int32)


def _per_problem(seeds: jax.Array, ids: jax.Array) -> jax.Array:
    """mix(id) keyed by problem: seeds [B] uint32, ids [B, ...]."""
    return mix(ids) ^ seeds.reshape(seeds.shape + (1,) * (ids.ndim - 1))


def node_value(seeds_v: jax.Array, ids: jax.Array) -> jax.Array:
    """[B, ...] value in (0, 1) of each node; seeds_v [B] (one toy tree per problem), ids [B, ...]."""
    return unit(mix(_per_problem(seeds_v, ids)))


def child_logits(seeds_p: jax.Array, ids: jax.Array) -> jax.Array:
    """[B, ..., K] prior logits (standard normal) of each node's children; seeds_p [B], ids [B, ...]."""
    h = _per_problem(seeds_p, ids)[..., None] + jnp.arange(K, dtype=jnp.uint32)
    return jax.scipy.special.ndtri(unit(mix(h)))


def problem_seeds(seed: int) -> tuple[jax.Array, jax.Array]:
    """Value and prior seeds [B] uint32 of BATCH different toy trees."""
    seeds = mix(jnp.arange(2 * BATCH) + 2 * BATCH * seed)
    return seeds[:BATCH], seeds[BATCH:]


# -- mctx --


@functools.partial(jax.jit, static_argnames="simulations")
def run_mctx(seeds_v, seeds_p, c1, c2, *, simulations: int) -> mctx.Tree:
    """mctx.muzero_policy on the toy trees: no Dirichlet noise, raw Q, PUCT constants c1, c2."""
    root_ids = jnp.zeros((BATCH,), jnp.int32)
    root = mctx.RootFnOutput(prior_logits=child_logits(seeds_p, root_ids), value=node_value(seeds_v, root_ids),
                             embedding=root_ids)

    def recurrent_fn(params, rng, action, embedding):
        ids = child_id(embedding, action)
        out = mctx.RecurrentFnOutput(reward=jnp.zeros((BATCH,)), discount=jnp.ones((BATCH,)),
                                     prior_logits=child_logits(seeds_p, ids), value=node_value(seeds_v, ids))
        return out, ids

    output = mctx.muzero_policy(
        None, jax.random.key(0), root, recurrent_fn, simulations, dirichlet_fraction=0.0,
        qtransform=lambda tree, node: tree.qvalues(node),  # raw Q, 0 for unvisited children
        pb_c_init=c1, pb_c_base=c2,
    )
    return output.search_tree


# -- ponder --


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ToyState:
    tree: Tree


def toy_expand(seeds_v, seeds_p, state: ToyState, leaves: jax.Array) -> ToyState:
    """Creates the K children of each leaf [B, W] (-1: none; a leaf listed twice is expanded once).

    A child's step "tokens" are its canonical id (tokens[b, n, 0]), its prior the logit its
    parent gives it, its score its value.
    """
    tree = state.tree
    rows = jnp.arange(tree.batch)[:, None]
    safe = leaves.clip(0)
    first = jnp.arange(leaves.shape[1])[None, :] == jnp.argmax(leaves[:, :, None] == leaves[:, None, :], axis=2)
    ok = (leaves >= 0) & first & ~(tree.children[rows, safe] >= 0).any(axis=2)  # [B, W]
    slot = jnp.cumsum(ok, axis=1) - ok  # the leaf's place among this call's expansions
    new = tree.node_count[:, None, None] + K * slot[..., None] + jnp.arange(K)  # [B, W, K]
    at = jnp.where(ok[..., None], new, tree.num_nodes)  # out of range: dropped
    parent_id = tree.tokens[rows, safe, 0]  # [B, W]
    ids = child_id(parent_id[..., None], jnp.arange(K))  # [B, W, K]

    def put(array, values):
        return array.at[rows[..., None], at].set(values, mode="drop")

    tree = dataclasses.replace(
        tree,
        parent=put(tree.parent, leaves[..., None]),
        children=tree.children.at[rows, jnp.where(ok, leaves, tree.num_nodes)].set(new, mode="drop"),
        depth=put(tree.depth, tree.depth[rows, safe][..., None] + 1),
        prior=put(tree.prior, child_logits(seeds_p, parent_id)),
        score=put(tree.score, node_value(seeds_v, ids)),
        alive=put(tree.alive, True),
        tokens=tree.tokens.at[rows[..., None], at, 0].set(ids, mode="drop"),
        node_count=tree.node_count + K * ok.sum(axis=1),
    )
    return ToyState(tree)


def toy_root(spec: SearchSpec, seeds_v, seeds_p) -> ToyState:
    """The root (visited once, with its value) and its K children, as ponder's MCTS starts."""
    tree = empty_tree(BATCH, spec.num_nodes, K, 1, 1, 1, 1)
    root_value = node_value(seeds_v, jnp.zeros((BATCH,), jnp.int32))
    tree = dataclasses.replace(
        tree, alive=tree.alive.at[:, 0].set(True), visits=tree.visits.at[:, 0].set(1.0),
        value_sum=tree.value_sum.at[:, 0].set(root_value), score=tree.score.at[:, 0].set(root_value),
    )
    return toy_expand(seeds_v, seeds_p, ToyState(tree), jnp.zeros((BATCH, 1), jnp.int32))


@functools.partial(jax.jit, static_argnames="spec")
def run_ponder(seeds_v, seeds_p, iterations, *, spec: SearchSpec) -> Tree:
    """ponder's mcts_loop on the toy trees, `iterations` waves of `spec.wave` leaves."""
    state = toy_root(spec, seeds_v, seeds_p)
    return mcts_loop(spec, state, functools.partial(toy_expand, seeds_v, seeds_p), iterations).tree


def mcts_spec(simulations: int, **changes) -> SearchSpec:
    """An MCTS spec whose depth limit the toy search never reaches."""
    return SearchSpec(strategy="mcts", children=K, simulations=simulations, max_steps=simulations + 2, **changes)


def visits_by_id(ids: np.ndarray, visits: np.ndarray) -> dict[int, int]:
    """{canonical id: visit count} of the visited nodes; ids, visits [N]."""
    return {int(i): int(v) for i, v in zip(ids, visits, strict=True) if v > 0}


@pytest.mark.parametrize("c1, c2", [(1.25, 19652.0), (0.6, 4.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_visit_counts_match_mctx_muzero_policy(seed, c1, c2):
    """wave=1: every node's visit count (and mean value) as mctx's, matched by canonical id."""
    simulations = SIMULATIONS
    seeds_v, seeds_p = problem_seeds(seed)
    spec = mcts_spec(simulations, wave=1, c1=c1, c2=c2)
    ours = jax.tree.map(np.asarray, run_ponder(seeds_v, seeds_p, simulations, spec=spec))
    theirs = jax.tree.map(np.asarray, run_mctx(seeds_v, seeds_p, c1, c2, simulations=simulations))

    assert not check_invariants(ours)
    assert (ours.node_count <= spec.num_nodes).all()
    np.testing.assert_array_equal(ours.visits[:, 0], 1 + simulations)
    # mctx's root is node 0 and child action a of the root sits in our root's child slot a.
    np.testing.assert_array_equal(ours.visits[np.arange(BATCH)[:, None], ours.children[:, 0]],
                                  theirs.children_visits[:, 0])
    for b in range(BATCH):
        ids = ours.tokens[b, :, 0]
        assert visits_by_id(ids, ours.visits[b]) == visits_by_id(theirs.embeddings[b], theirs.node_visits[b])
        # Mean values agree too (mctx keeps a running mean, we keep sums).
        ours_q = {int(i): s / v for i, s, v in zip(ids, ours.value_sum[b], ours.visits[b], strict=True) if v > 0}
        theirs_q = dict(zip(theirs.embeddings[b].tolist(), theirs.node_values[b].tolist(), strict=True))
        np.testing.assert_allclose([ours_q[i] for i in sorted(ours_q)], [theirs_q[i] for i in sorted(ours_q)],
                                   rtol=1e-5)
    # The search is not trivially shallow: some node below the root's children got visits.
    assert (ours.depth * (ours.visits > 0)).max() >= 3


@pytest.mark.parametrize("logit_scale", [1.0, 6.0])
def test_wave_picks_distinct_unvisited_leaves(logit_scale):
    """With virtual visits, the `wave` leaves of one selection differ while unvisited ones are left."""
    seeds_v, seeds_p = problem_seeds(7)
    spec = mcts_spec(SIMULATIONS, wave=1)
    tree = run_ponder(seeds_v, seeds_p, 8, spec=spec)
    # Peaked priors (as step log-probs are) are the hard case for virtual visits.
    tree = dataclasses.replace(tree, prior=tree.prior * logit_scale)
    leaves = np.asarray(jax.jit(select_wave, static_argnums=(0, 2))(spec, tree, 4))
    unvisited = np.asarray(tree.alive & (tree.visits == 0))
    assert unvisited.sum(axis=1).min() >= 4
    for b in range(BATCH):
        assert len(set(leaves[b].tolist())) == 4, leaves[b]
        assert unvisited[b, leaves[b]].all(), leaves[b]


def test_wave_backs_up_every_selected_leaf():
    """wave=4: each iteration adds `wave` root visits, and distinct fresh leaves are expanded."""
    iterations, wave = 6, 4
    seeds_v, seeds_p = problem_seeds(3)
    spec = mcts_spec(iterations * wave, wave=wave)
    tree = jax.tree.map(np.asarray, run_ponder(seeds_v, seeds_p, iterations, spec=spec))
    assert not check_invariants(tree)
    np.testing.assert_array_equal(tree.visits[:, 0], 1 + wave * iterations)
    root_kids = tree.children[:, 0]
    np.testing.assert_array_equal(tree.visits[np.arange(BATCH)[:, None], root_kids].sum(axis=1), wave * iterations)
    # Each wave's leaves were distinct and fresh, so each expanded a new node (the first wave
    # has only the root's K children to pick from).
    np.testing.assert_array_equal(tree.node_count, 1 + K * (1 + K + wave * (iterations - 1)))


def test_wave_does_not_pick_a_terminal_leaf_twice_while_open_leaves_remain():
    """A visited terminal leaf that PUCT favours is picked once per wave; the other picks find open leaves."""
    seeds_v, seeds_p = problem_seeds(5)
    spec = mcts_spec(SIMULATIONS, wave=1)
    tree = jax.tree.map(np.asarray, run_ponder(seeds_v, seeds_p, 8, spec=spec))
    terminal, visits, prior = tree.terminal.copy(), tree.visits.copy(), tree.prior.copy()
    favourite = np.argmax(tree.alive & (tree.visits == 0), axis=1)  # an unexpanded leaf per tree
    for b, node in enumerate(favourite):
        terminal[b, node], visits[b, node] = True, 1.0  # as if it had been reached before and ended there
        while node > 0:  # every step towards it all but certain under PUCT
            prior[b, node] = 50.0
            node = tree.parent[b, node]
    tree = dataclasses.replace(tree, terminal=terminal, visits=visits, prior=prior)
    leaves = np.asarray(jax.jit(select_wave, static_argnums=(0, 2))(spec, tree, 4))
    for b in range(BATCH):
        assert (leaves[b] == favourite[b]).sum() == 1, (leaves[b], favourite[b])
        assert len(set(leaves[b].tolist())) == 4, leaves[b]
