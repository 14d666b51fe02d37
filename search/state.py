"""A search in flight: the trees of a batch of problems, both page pools and the cost counters.

`SearchState` is what every strategy's `lax` loop carries; `init_search` makes it from the
prompts (node 0 of each tree, prefilled into the policy's and the scorer's pools); `Models`
is what an expansion runs (static, like the spec); `path_score` reads a node's path score
under the spec's aggregation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from model.flops import decode_flops
from model.paged import init_cache
from search.scorers import Scorer
from search.spec import SearchSpec, default_num_pages
from search.tree import Tree, allocate, empty_tree


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


def init_search(spec: SearchSpec, models: Models, params, scorer_params, prompts: jax.Array,
                prompt_lengths: jax.Array, rows: jax.Array | None = None) -> SearchState:
    """Trees holding only their prompts (node 0), prefilled into both page pools.

    prompts [B, T] (BOS + prompt, right-padded), prompt_lengths [B]; rows [B]: each tree's row
    in the whole batch when this is one shard of it (default 0..B-1).
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


def path_score(spec: SearchSpec, tree: Tree) -> jax.Array:
    """[B, N] each node's path score under the spec's aggregation."""
    return {"last": tree.score, "min": tree.path_min, "product": tree.path_prod}[spec.aggregate]
