"""Device mesh and logical-axis sharding.

Model code names logical axes only (`batch, length, embed, heads, kv_heads, head_dim, mlp,
vocab, layers`); the rule list from the config maps them to the mesh axes
`(data, fsdp, tensor)`. Everything here is a pure function of (config, devices).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from configs.schema import MESH_AXES, MeshConfig

Rules = tuple[tuple[str, tuple[str, ...]], ...]


class MeshError(ValueError):
    """The mesh asked for does not fit the devices at hand."""


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes for `num_devices` devices, with -1 filled in."""
    sizes = [getattr(cfg, axis) for axis in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    asked = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(f"mesh ({asked}) does not fit {num_devices} devices: {known} does not divide {num_devices}")
        sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
        raise MeshError(f"mesh ({asked}) needs {known} devices but {num_devices} are available")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the `(data, fsdp, tensor)` mesh, hybrid over slices when `dcn_data > 1`.

    Sizes in `cfg` are per slice; with several slices the data axis spans `dcn_data` of
    them over the data-center network. On one slice `dcn_data` is ignored with a warning.
    """
    devices = list(devices if devices is not None else jax.devices())
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if cfg.dcn_data > 1 and num_slices > 1:
        if num_slices != cfg.dcn_data:
            raise MeshError(f"mesh.dcn_data={cfg.dcn_data} but the devices span {num_slices} slices")
        ici = resolve_mesh_shape(cfg, len(devices) // num_slices)
        grid = mesh_utils.create_hybrid_device_mesh(ici, (cfg.dcn_data, 1, 1), devices)
    else:
        if cfg.dcn_data > 1:
            warnings.warn(f"mesh.dcn_data={cfg.dcn_data} ignored: all devices are on one slice", stacklevel=2)
        shape = resolve_mesh_shape(cfg, len(devices))
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (AssertionError, ValueError, NotImplementedError):
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Rules,
    mesh: Mesh | jax.sharding.AbstractMesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    Each dimension takes the mesh axes its rule lists, skipping any an earlier dimension
    of the same array already uses, any the mesh has in manual mode (inside `shard_map`) and
    (when `mesh` and `shape` are given) any that would not divide the dimension evenly, which
    then stays replicated over that axis.
    """
    table = dict(rules)
    used: set[str] = set(getattr(mesh, "manual_axes", ()))  # inside shard_map: those are split by hand
    spec: list[str | tuple[str, ...] | None] = []
    for dim, name in enumerate(logical_axes):
        chosen: list[str] = []
        split = 1
        for axis in table.get(name, ()) if name else ():
            if axis in used:
                continue
            if mesh is not None and shape is not None:
                if shape[dim] % (split * mesh.shape[axis]):
                    continue
                split *= mesh.shape[axis]
            chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names a parameter was created with (empty tuple for scalars)."""
    return tuple(variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """A NamedSharding for each variable of an (abstract) NNX state, from its logical axes."""

    def to_sharding(variable: nnx.Variable):
        spec = logical_to_spec(logical_axes_of(variable), rules, mesh, variable.shape)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules) -> jax.Array:
    """Sharding constraint on an activation by logical axes; a no-op outside `jax.set_mesh`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not rules:
        return x
    spec = logical_to_spec(logical_axes, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, rules: Rules, shape: Sequence[int]) -> NamedSharding:
    """Sharding of a `[batch, length, ...]` input array: batch over the batch axes."""
    axes = ("batch", "length") + (None,) * (len(shape) - 2)
    return NamedSharding(mesh, logical_to_spec(axes[: len(shape)], rules, mesh, shape))


def split_axes_left_to_xla() -> tuple[str, ...]:
    """The current mesh's axes of more than one device that XLA's partitioner handles (not manual).

    Empty outside a mesh, or inside a `shard_map` that makes every such axis manual: only then
    does a custom call without a sharding rule (a `jax.ffi` kernel, a `pallas_call`) run on
    each device's own data; otherwise XLA would gather its operands (a whole page pool) onto
    every device for it.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(name for name, size in mesh.shape.items() if size > 1 and name not in mesh.manual_axes)
