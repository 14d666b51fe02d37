"""A trained policy loaded for sampling: its run's config, model structure, params on a mesh and vocabulary.

    policy = load_policy("runs/small")                     # run dir, its checkpoints/ or one step dir
    policy = load_policy("runs/small", overrides=("rl.max_new_tokens=64",), mesh=mesh)

What reward-data labelling, RL evaluation (`train.rl.policy_pass_at_1`) and the demo load
when they sample from a `ponder train` (or `ponder rl`) run: the newest readable params,
restored onto the mesh in the training layout of the run's own config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from configs.fileio import run_path
from configs.load import load_config
from configs.schema import Config
from train.checkpoint import find_run_config, read_params


@dataclasses.dataclass(frozen=True)
class Policy:
    """A loaded policy run: its config, model structure, params (sharded on `mesh`) and vocabulary."""

    checkpoint: Path
    step_dir: Path  # the step read (the newest readable one, unless a step dir was given)
    cfg: Config
    graphdef: Any
    params: Any
    mesh: Any
    vocab: Any


def load_policy(checkpoint: str | Path, config: str | Path | None = None, overrides: tuple[str, ...] = (), *,
                mesh=None) -> Policy:
    """The newest readable params of a run (dir, checkpoints/ or step dir) with its config.yaml (or `config`).

    The params are restored in the training layout of that config on `mesh` (default: the
    config's own mesh.*).
    """
    from model.sharding import make_mesh
    from train.data import get_vocabulary
    from train.state import state_layout

    checkpoint = run_path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint directory")
    config = config or find_run_config(checkpoint)
    if config is None:
        raise FileNotFoundError(f"no config.yaml in {checkpoint} or the run directory above it; pass a config")
    cfg = load_config(config, list(overrides))
    mesh = mesh or make_mesh(cfg.mesh)
    layout = state_layout(cfg, mesh)
    step_dir, params = read_params(checkpoint, layout.abstract["params"])
    return Policy(checkpoint, step_dir, cfg, layout.graphdef, params, mesh, get_vocabulary(cfg.data.vocab))
