"""One host's saved stream position: `directory/host-I-of-N/state.json`, written whole or not at all.

The data pipeline, the reward-data stream and the RL prompt stream each save their
position per host next to a checkpoint; this module is the one place that lays out,
writes and finds those files, and says clearly when a run's host count differs from
the one that saved them.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from configs.fileio import atomic_path


class DataStateError(ValueError):
    """A saved stream position that this stream cannot continue from exactly."""


def host_dir(directory: str | Path, shard_index: int, num_shards: int) -> Path:
    """`directory/host-I-of-N`: where host I of N keeps its position."""
    return Path(directory) / f"host-{shard_index}-of-{num_shards}"


def save_host_state(directory: str | Path, shard_index: int, num_shards: int, state: dict[str, Any],
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Writes `state` (plus `num_shards`) as state.json, and whatever `write_extra(staging_dir)` adds, atomically."""
    target = host_dir(directory, shard_index, num_shards)
    with atomic_path(target, directory=True) as staging:
        if write_extra is not None:
            write_extra(staging)
        (staging / "state.json").write_text(json.dumps(state | {"num_shards": num_shards}, indent=1))
    return target


def load_host_state(directory: str | Path, shard_index: int, num_shards: int,
                    what: str = "data position") -> tuple[Path, dict[str, Any]]:
    """(host directory, saved state) of host I of N; a DataStateError names a different saved host count."""
    directory = Path(directory)
    target = host_dir(directory, shard_index, num_shards)
    if not (target / "state.json").is_file():
        saved = sorted(p.name for p in directory.glob("host-*-of-*"))
        if saved and not any(name.endswith(f"-of-{num_shards}") for name in saved):
            hosts = saved[0].rsplit("-of-", 1)[1]
            raise DataStateError(
                f"{directory}: the {what} was saved by {hosts} hosts but this run has {num_shards}; "
                f"continuing would repeat or skip examples. Resume with {hosts} hosts, or start the "
                "stream afresh."
            )
        raise DataStateError(f"{directory}: no saved {what} for host {shard_index}")
    return target, json.loads((target / "state.json").read_text())
