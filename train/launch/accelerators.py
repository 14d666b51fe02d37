"""TPU accelerator types: how many hosts (workers) and JAX devices a `--accelerator-type` name stands for.

    shape = tpu_shape("v4-32")      # TpuShape(name='v4-32', chips=16, hosts=4, devices_per_host=4, ...)

The number after the generation counts TensorCores for v4 and v5p (two per chip, one JAX
device per chip) and chips for v5e (`v5litepod-N`) and v6e. Multi-host slices have 4 chips
per host; v5e and v6e slices of up to 8 chips are one host. The preflight checks the
devices JAX sees against `devices`, and the launcher starts `hosts` processes per slice.
"""
from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation: how its type names count, its largest single-host slice, its default runtime."""

    prefix: str
    cores_per_chip: int  # what the number in the name counts per chip
    max_single_host_chips: int
    runtime_version: str
    sizes: tuple[int, ...]  # the numbers the name may carry


GENERATIONS = {
    "v4": Generation("v4", 2, 4, "tpu-ubuntu2204-base", tuple(2**k for k in range(3, 13))),
    "v5p": Generation("v5p", 2, 4, "v2-alpha-tpuv5", tuple(2**k for k in range(3, 14))),
    "v5litepod": Generation("v5litepod", 1, 8, "v2-alpha-tpuv5-lite", (1, 4, 8, 16, 32, 64, 128, 256)),
    "v6e": Generation("v6e", 1, 8, "v2-alpha-tpuv6e", (1, 4, 8, 16, 32, 64, 128, 256)),
}
CHIPS_PER_HOST = 4  # in a multi-host slice


class AcceleratorError(ValueError):
    """An accelerator type name ponder does not know."""


@dataclasses.dataclass(frozen=True)
class TpuShape:
    """One slice of `name`: its chips, hosts and JAX devices per host."""

    name: str
    generation: Generation
    chips: int
    hosts: int
    devices_per_host: int

    @property
    def devices(self) -> int:
        """JAX devices in the slice (one per chip)."""
        return self.hosts * self.devices_per_host


def tpu_shape(name: str) -> TpuShape:
    """The shape of accelerator type `name` (`v4-32`, `v5litepod-16`, `v5p-128`); AcceleratorError if unknown."""
    match = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", name)
    known = ", ".join(f"{g.prefix}-{{{','.join(map(str, g.sizes))}}}" for g in GENERATIONS.values())
    if not match or int(match.group(2)) not in GENERATIONS[match.group(1)].sizes:
        raise AcceleratorError(f"unknown accelerator type {name!r} (known: {known})")
    generation = GENERATIONS[match.group(1)]
    chips = int(match.group(2)) // generation.cores_per_chip
    hosts = 1 if chips <= generation.max_single_host_chips else chips // CHIPS_PER_HOST
    return TpuShape(name, generation, chips, hosts, chips // hosts)
