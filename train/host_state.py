"""One data shard's saved stream position: `directory/shard-I-of-N/state.json`, written whole or not at all.

The data pipeline, the reward-data stream and the RL prompt stream each save their position
per shard next to a checkpoint; this module is the one place that lays out, writes and finds
those files, and says clearly when a run's shard count differs from the one that saved them.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from etils import epath

from configs.fileio import atomic_path, run_path, write_atomic


class DataStateError(ValueError):
    """A saved stream position that this stream cannot continue from exactly."""


def shard_dir(directory: str | Path, shard_index: int, num_shards: int) -> epath.Path:
    """`directory/shard-I-of-N`: where shard I of N keeps its position."""
    return run_path(directory) / f"shard-{shard_index}-of-{num_shards}"


def save_host_state(directory: str | Path, shard_index: int, num_shards: int, state: dict[str, Any],
                    write_extra: Callable[[Path], None] | None = None) -> epath.Path:
    """Writes `state` (plus `num_shards`) as shard I's state.json, with what `write_extra(staging)` adds; atomic.

    `write_extra` gets a local directory. On object storage state.json goes up last, so a shard
    whose upload was cut short has none and reads as missing, never as half a position.
    """
    target = shard_dir(directory, shard_index, num_shards)
    with atomic_path(target, directory=True) as staging:
        if write_extra is not None:
            write_extra(staging)
    write_atomic(target / "state.json", json.dumps(state | {"num_shards": num_shards}, indent=1))
    return target


def load_host_state(directory: str | Path, shard_index: int, num_shards: int,
                    what: str = "data position") -> tuple[epath.Path, dict[str, Any]]:
    """(shard directory, saved state) of shard I of N; a DataStateError names a different saved shard count."""
    directory = run_path(directory)
    target = shard_dir(directory, shard_index, num_shards)
    if not (target / "state.json").is_file():
        saved = sorted(p.name for p in directory.glob("shard-*-of-*"))
        if saved and not any(name.endswith(f"-of-{num_shards}") for name in saved):
            shards = saved[0].rsplit("-of-", 1)[1]
            raise DataStateError(
                f"{directory}: the {what} was saved as {shards} data shards but this run reads {num_shards}; "
                f"continuing would repeat or skip examples. Set data.shards={shards} (any process count that "
                f"divides {shards} resumes exactly)"
            )
        raise DataStateError(f"{directory}: no saved {what} for data shard {shard_index}")
    return target, json.loads((target / "state.json").read_text())


def check_saved(directory: str | Path, shard_index: int, num_shards: int) -> None:
    """FileNotFoundError when shard I's position is missing though N shards were saved (damage, not a settings change).

    A position saved with another shard count is left to `load_host_state`, whose DataStateError says so.
    """
    own = shard_dir(directory, shard_index, num_shards)
    saved = [p.name for p in run_path(directory).glob("shard-*-of-*")]
    other_count = saved and not any(name.endswith(f"-of-{num_shards}") for name in saved)
    if not (own / "state.json").is_file() and not other_count:
        raise FileNotFoundError(f"{own}: no data position saved for this shard")
