"""This host's part of the global batch: the data shards it owns, their rows side by side.

The global batch is split into `data.shards` streams (default: one per process). Process p of
P owns shards [p*S/P, (p+1)*S/P) and reads each with its own stream, so the global batch
(processes in order, each its shards in order) is the same for every P that divides S: one
process reading 2 shards sees exactly what 2 processes reading one each see. Each shard saves
its own position, so a run resumes exactly on another host count as long as S stays the same.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import jax
import numpy as np

from train.host_state import DataStateError, check_saved


class Stream(Protocol):
    """One shard's resumable batch stream (train.data.Pipeline, train.reward_data.RewardData)."""

    batches_read: int
    truncated_examples: int

    def __next__(self) -> dict[str, np.ndarray]: ...
    def save(self, directory: str | Path) -> object: ...
    def restore(self, directory: str | Path) -> None: ...


def owned_shards(num_shards: int, process_index: int, process_count: int) -> range:
    """The shards process `process_index` of `process_count` reads: a contiguous block of num_shards / count."""
    if num_shards % process_count:
        raise DataStateError(f"data.shards={num_shards} does not split evenly over {process_count} processes: "
                             "use a multiple of the process count")
    per = num_shards // process_count
    return range(process_index * per, (process_index + 1) * per)


class HostShards:
    """The shards this process owns, read side by side: `next()` is this host's [host_batch, ...] rows."""

    def __init__(self, make: Callable[[int, int], Stream], num_shards: int | None = None, *,
                 process_index: int | None = None, process_count: int | None = None):
        process_count = jax.process_count() if process_count is None else process_count
        process_index = jax.process_index() if process_index is None else process_index
        self.num_shards = num_shards or process_count
        self.shards = owned_shards(self.num_shards, process_index, process_count)
        self.streams = [make(shard, self.num_shards) for shard in self.shards]

    def __iter__(self) -> HostShards:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(stream) for stream in self.streams]
        if len(batches) == 1:
            return batches[0]
        return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}

    @property
    def batches_read(self) -> int:
        return self.streams[0].batches_read

    @property
    def truncated_examples(self) -> int:
        return sum(stream.truncated_examples for stream in self.streams)

    def save(self, directory: str | Path) -> None:
        """Saves every owned shard's position under `directory`."""
        for stream in self.streams:
            stream.save(directory)

    def check(self, directory: str | Path) -> None:
        """FileNotFoundError when an owned shard's saved position is missing (see host_state.check_saved)."""
        for shard in self.shards:
            check_saved(directory, shard, self.num_shards)

    def restore(self, directory: str | Path) -> None:
        """Continues every owned shard from its saved position."""
        for stream in self.streams:
            stream.restore(directory)
