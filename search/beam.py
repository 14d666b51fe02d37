"""Step-level beam search and diverse verifier tree search (DVTS), guided by the scorer.

    beam   N beams; each proposes M next steps; the best N children (by path score) go on
    dvts   N/M independent subtrees, each a greedy beam of width 1 with M proposals

Both are one loop: `groups` independent groups of `width` beams (beam: 1 x N; dvts: N/M x 1),
each beam expanded into M children per iteration and the best `width` per group kept. A
child repeating a sibling's step ranks after every distinct one. Finished chains stay in the
tree as candidates; pruned nodes give their pages back to the pool.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from search.expand import expand
from search.spec import SearchSpec
from search.state import Models, SearchState, path_score
from search.tree import Tree, prune, release


def duplicates(tree: Tree, children: jax.Array, exists: jax.Array) -> jax.Array:
    """[B, G, C] bool: a child whose parent and step tokens equal those of an earlier child in its group.

    children [B, G, C] node ids; exists [B, G, C] bool: the children that count as originals.
    """
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


def _select_beams(spec: SearchSpec, tree: Tree, children: jax.Array, groups: int, width: int):
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


def _prune_dead_branches(spec: SearchSpec, tree: Tree) -> Tree:
    """Prunes expanded, non-terminal nodes none of whose children is alive (repeatedly, up the tree)."""

    def body(_, tree):
        b = jnp.arange(tree.batch)[:, None, None]
        kids = tree.children
        has_children = (kids >= 0).any(axis=2)
        any_alive = ((kids >= 0) & tree.alive[b, kids.clip(0)]).any(axis=2)
        return prune(tree, has_children & ~any_alive & ~tree.terminal)

    return jax.lax.fori_loop(0, spec.max_steps, body, tree)


def beam(spec: SearchSpec, models: Models, params, scorer_params, keys: jax.Array, state: SearchState):
    """(state, the last open beams [B, G * W]) of beam search or DVTS; the candidates are the tree's finished nodes."""
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
