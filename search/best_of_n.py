"""`sample`, `greedy` and `best_of_n`: N chains from the root, each extended on its own until it ends.

`sample` is one chain at search.temperature, `greedy` one at temperature 0 (their specs set
n=1; greedy's also the sampling, in `search/spec.py`), best_of_n N chains.

The answer is chosen on the host among the finished chains (`search/candidates.py`: vote,
the scorer's best, or a scorer-weighted vote); the scorer only scores, it steers nothing.
"""

from __future__ import annotations

import jax.numpy as jnp

from search.expand import complete, expand
from search.spec import SearchSpec
from search.state import Models, SearchState


def best_of_n(spec: SearchSpec, models: Models, params, scorer_params, keys, state: SearchState):
    """(state, the chains' ends [B, n]): n first steps under each root, then each chain to its end."""
    root = jnp.zeros((state.tree.batch, 1), jnp.int32)
    state, first = expand(spec, models, params, scorer_params, keys, state, root, spec.n)
    return complete(spec, models, params, scorer_params, keys, state, first.reshape(state.tree.batch, spec.n))
