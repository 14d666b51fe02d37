"""The train state and where each of its arrays lives on the mesh.

A train state is a plain pytree, which is what gets jitted, donated and checkpointed:

    {"params": nested dict of arrays, "opt_state": optax state, "step": int32 scalar}

The model's structure (its NNX graphdef) stays outside the state and is merged back with
`nnx.merge(graphdef, params)` inside the jitted functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs.schema import Config
from model.sharding import state_shardings
from model.transformer import Transformer
from train.optim import make_optimizer

TrainState = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Everything static about a train state: model structure, optimizer, shapes and shardings."""

    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    abstract: TrainState  # ShapeDtypeStructs that carry their shardings
    shardings: TrainState  # NamedShardings, same tree


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def opt_state_shardings(abstract_opt_state, params_shardings: dict, mesh: Mesh):
    """Shards each optimizer leaf like the parameter it mirrors (Adam's mu/nu); the rest replicated.

    A leaf mirrors a parameter when its tree path ends with that parameter's path.
    """
    by_path = {
        _path_names(path): sharding for path, sharding in jax.tree_util.tree_flatten_with_path(params_shardings)[0]
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding_of(path, leaf):
        names = _path_names(path)
        for start in range(len(names)):
            match = by_path.get(names[start:])
            if match is not None and len(match.spec) <= len(leaf.shape):
                return match
        return replicated

    return jax.tree_util.tree_map_with_path(sharding_of, abstract_opt_state)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the given shardings (what restore and `.lower` take)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def state_layout(cfg: Config, mesh: Mesh) -> StateLayout:
    """Shapes and shardings of the train state for `cfg` on `mesh`, without allocating anything."""
    rules = cfg.rules()
    abstract_model = nnx.eval_shape(lambda: Transformer(cfg.model, rules=rules, rngs=nnx.Rngs(cfg.seed)))
    graphdef, abstract_params = nnx.split(abstract_model)
    params_shardings = state_shardings(abstract_params, mesh, rules).to_pure_dict()
    abstract_params = abstract_params.to_pure_dict()
    optimizer = make_optimizer(cfg.optimizer, cfg.train.steps, abstract_params)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    shardings = {
        "params": params_shardings,
        "opt_state": opt_state_shardings(abstract_opt, params_shardings, mesh),
        "step": NamedSharding(mesh, PartitionSpec()),
    }
    abstract = {"params": abstract_params, "opt_state": abstract_opt, "step": jax.ShapeDtypeStruct((), jnp.int32)}
    return StateLayout(graphdef, optimizer, with_shardings(abstract, shardings), shardings)


def init_state(cfg: Config, layout: StateLayout, mesh: Mesh, params: dict | None = None) -> TrainState:
    """A fresh train state, each array created in its shard; `params` (e.g. from init_from) replaces the init.

    Leaves of `params` that are ShapeDtypeStructs (`load_params(..., allow_missing=True)`: a
    value head the checkpoint lacks) get their fresh initial values.
    """
    partial = params is not None and any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params))

    def fresh_params():
        model = Transformer(cfg.model, rules=cfg.rules(), rngs=nnx.Rngs(cfg.seed))
        return nnx.state(model).to_pure_dict()

    def init(params):
        if params is None:
            params = fresh_params()
        return {"params": params, "opt_state": layout.optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    def init_partial(loaded):
        fresh = fresh_params()
        leaves = [fresh_leaf if loaded_leaf is None else loaded_leaf
                  for fresh_leaf, loaded_leaf in zip(jax.tree.leaves(fresh), loaded, strict=True)]
        return init(jax.tree.unflatten(jax.tree.structure(fresh), leaves))

    with jax.set_mesh(mesh):
        if partial:  # the loaded arrays go in as a flat list, None where the fresh init stays
            loaded = [None if isinstance(leaf, jax.ShapeDtypeStruct) else leaf for leaf in jax.tree.leaves(params)]
            return jax.jit(init_partial, out_shardings=layout.shardings)(loaded)
        return jax.jit(init, out_shardings=layout.shardings)(params)
