"""`run_search`: a whole search for a batch of problems in one jittable call, split over the mesh.

Under `jax.set_mesh`, `shard_map` gives each device group its own problems and its own page
pools (no tree or page crosses devices); outside a mesh it is the plain search. `RUNS` maps
each strategy to the loop that grows its trees (`search/best_of_n.py`, `beam.py`, `mcts.py`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from model.paged import pool_spec
from model.sharding import logical_to_spec
from search.beam import beam
from search.best_of_n import best_of_n
from search.mcts import mcts
from search.spec import SearchSpec, resolve
from search.state import Models, init_search

# The loop of each strategy of `search.spec.STRATEGIES` (same keys): (spec, models, params, scorer_params, keys, state)
# -> (state, chosen [B, C]).
RUNS = {"sample": best_of_n, "greedy": best_of_n, "best_of_n": best_of_n, "beam": beam, "dvts": beam, "mcts": mcts}


def run_search(spec: SearchSpec, models: Models, params, scorer_params, prompts: jax.Array, prompt_lengths: jax.Array,
               keys: jax.Array):
    """The whole search for a batch of prompts [B, T] (BOS + prompt, right-padded); keys [B].

    Jit with `spec` and `models` static. Returns (state, chosen [B, C]): the final tree and
    stats, and the candidate leaves the strategy ends with (-1: none).

    Under `jax.set_mesh`, the problems are split over the mesh axes the model's rules give
    the batch (`search_batch_axes`), with `shard_map`: each shard grows the trees of its own
    problems in its own page pool, and no tree or page crosses devices. The parameters enter
    whole over those axes (gathered once per call when FSDP splits them) and keep their
    sharding over the others (tensor; a host-callback scorer makes every axis manual, see below).
    The returned state is the shards' states side by side:
    tree arrays and stats by problem, each pool's pages after the previous shard's (page ids
    in a tree are its shard's own), `iteration` one per shard.
    """
    spec = resolve(spec)
    batch = prompts.shape[0]
    axes = search_batch_axes(models, params, batch)
    if not axes:
        return _search(spec, models, params, scorer_params, prompts, prompt_lengths, keys, jnp.arange(batch))
    split, pages = P(axes), pool_spec(axes)

    def shard(params, scorer_params, prompts, prompt_lengths, keys, rows):
        state, chosen = _search(spec, models, params, scorer_params, prompts, prompt_lengths, keys, rows)
        return dataclasses.replace(state, iteration=state.iteration[None]), chosen

    def out_spec(state):
        per_problem = jax.tree.map(lambda _: split, dataclasses.replace(state, cache=None, scorer_cache=None))
        pools = {name: jax.tree.map(lambda _: pages, getattr(state, name)) for name in ("cache", "scorer_cache")}
        return dataclasses.replace(per_problem, **pools), split

    mesh = jax.sharding.get_abstract_mesh()
    # JAX runs host callbacks (the oracle's, the checker's) only where every mesh axis is manual: the
    # other axes then hold whole replicas of the shard's work instead of splitting its matmuls.
    manual = set(mesh.axis_names) if models.scorer.host_callback else set(axes)
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
    return RUNS[spec.strategy](spec, models, params, scorer_params, keys, state)
