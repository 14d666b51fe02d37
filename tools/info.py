"""`ponder info`: the software, the devices, the mesh a config builds, and its sharded model.

The model is built abstractly (`nnx.eval_shape`), so even an 8B config is described
instantly without allocating a parameter. Per-device sizes come from the PartitionSpec the
config's logical axis rules give each parameter on that mesh.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from configs.schema import Config
from tools.cli import add_config_arguments, config_from_args

GIB = 1024**3
F32_BYTES = 4


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `ponder info`."""
    parser = subparsers.add_parser(
        "info",
        help="show versions, devices, the mesh and the sharded parameters a config gives",
        description="Show jax/flax versions, the devices, the mesh a config builds, every parameter "
        "with its logical axes and PartitionSpec, and an estimate of per-device training memory.",
    )
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prints the description of the config named in `args` (text or JSON)."""
    cfg = config_from_args(args)
    info = describe(cfg)
    info["config"] = args.config or "base"
    print(json.dumps(info, indent=1) if args.json else render_text(info))
    return 0


def describe(cfg: Config) -> dict[str, Any]:
    """Everything `ponder info` reports about `cfg` on this process's devices, JSON-ready."""
    import flax
    import jax
    from jax.sharding import AbstractMesh, AxisType

    from configs.schema import MESH_AXES
    from model.sharding import MeshError, make_mesh

    devices = jax.devices()
    planned = False
    try:
        mesh = make_mesh(cfg.mesh)
    except MeshError as err:
        if -1 in (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor):
            raise MeshError(
                f"cannot build the mesh: {err}; this process sees {_count(len(devices), 'device')} "
                f"({jax.default_backend()}). Change mesh.data/fsdp/tensor, or simulate N CPU devices "
                "with `ponder --devices N info ...`."
            ) from None
        # Every size is explicit: describe the plan for that many devices, as on the pod.
        sizes = tuple(getattr(cfg.mesh, axis) for axis in MESH_AXES)
        mesh = AbstractMesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
        planned = True
    params = describe_params(cfg, mesh)
    return {
        "versions": {"jax": jax.__version__, "flax": flax.__version__},
        "backend": jax.default_backend(),
        "cpu_kernels": cpu_kernels_info(jax.default_backend()),
        "devices": {
            "count": len(devices),
            "kinds": dict(Counter(d.device_kind for d in devices)),
            "local": [str(d) for d in jax.local_devices()],
            "process_index": jax.process_index(),
            "process_count": jax.process_count(),
        },
        "mesh": {"shape": dict(mesh.shape), "devices": mesh.size, "planned": planned},
        "model": {
            "param_count": sum(p["size"] for p in params),
            "param_dtype": cfg.model.param_dtype,
            "params": params,
        },
        "memory_per_device": memory_estimate(params, master_weights=cfg.optimizer.master_weights),
        "kernels": kernels_info(cfg, jax.default_backend()),
    }


def kernels_info(cfg: Config, backend: str) -> dict[str, dict[str, str]]:
    """Which kernel the config's training attention and paged decode attention use on `backend`, and why."""
    from model.attention import attention_kernel
    from model.pallas_paged import decode_kernel

    attention, attention_why = attention_kernel(cfg.model, backend, cfg.data.seq_len)
    decode, decode_why = decode_kernel(cfg.model, backend, page_size=cfg.search.page_size)
    return {"attention": {"kernel": attention, "detail": attention_why},
            "decode_attention": {"kernel": decode, "detail": decode_why}}


def cpu_kernels_info(backend: str) -> dict[str, Any]:
    """Whether decode attention and matmuls run ponder's native kernels (CPU only; see model/cpu_kernels.py)."""
    if backend != "cpu":
        return {"available": False, "detail": f"not used on {backend}: XLA lowers paged attention there"}
    from model import cpu_kernels

    status = cpu_kernels.status()
    return {"available": status.available, "detail": status.detail}


def _kernels_line(kernels: dict[str, Any]) -> str:
    """One line under 100 columns: the library's file name, or the first line of why there is none."""
    if kernels["available"]:
        return f"kernels:   decode attention and matmuls: native CPU kernels ({Path(kernels['detail']).name})"
    reason = kernels["detail"].splitlines()[0] if kernels["detail"] else ""
    line = f"kernels:   decode attention and matmuls: XLA ops ({reason})"
    return line if len(line) <= 100 else line[:96] + "...)"


def _kernel_line(label: str, kernel: dict[str, str]) -> str:
    """`attention: splash (why)`: the kernel a config gets, and the reason when there is one."""
    return f"{label:<10} {kernel['kernel']}" + (f" ({kernel['detail']})" if kernel["detail"] else "")


def describe_params(cfg: Config, mesh) -> list[dict[str, Any]]:
    """One row per parameter: dotted name, shape, logical axes, spec, total and per-device bytes."""
    from flax import nnx
    from jax.sharding import NamedSharding

    from model.sharding import logical_axes_of, logical_to_spec
    from model.transformer import Transformer

    rules = cfg.rules()
    model = nnx.eval_shape(lambda: Transformer(cfg.model, rules=rules, rngs=nnx.Rngs(0)))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    rows = []
    for path, variable in params.flat_state():
        shape = tuple(variable.shape)
        spec = logical_to_spec(logical_axes_of(variable), rules, mesh, shape)
        shard_shape = NamedSharding(mesh, spec).shard_shape(shape)
        itemsize = variable.dtype.itemsize
        rows.append(
            {
                "name": ".".join(str(p) for p in path),
                "shape": list(shape),
                "dtype": str(variable.dtype),
                "axes": list(logical_axes_of(variable)),
                "spec": [list(s) if isinstance(s, tuple) else s for s in spec],
                "size": math.prod(shape),
                "size_per_device": math.prod(shard_shape),
                "bytes": math.prod(shape) * itemsize,
                "bytes_per_device": math.prod(shard_shape) * itemsize,
            }
        )
    return rows


def memory_estimate(params: list[dict[str, Any]], master_weights: bool = False) -> dict[str, Any]:
    """Per-device bytes for params, AdamW state and grads; no activations.

    AdamW's two moments take each param's dtype, and grads too; with `optimizer.master_weights`
    the optimizer also keeps a float32 master copy, and moments and grads are float32.
    """
    param_bytes = sum(p["bytes_per_device"] for p in params)
    f32_bytes = F32_BYTES * sum(p["size_per_device"] for p in params)
    parts = {
        "params": param_bytes,
        "adamw_state": 3 * f32_bytes if master_weights else 2 * param_bytes,
        "grads": f32_bytes if master_weights else param_bytes,
    }
    largest = max(params, key=lambda p: p["bytes_per_device"])
    return {
        "note": "estimate: params + AdamW state + grads, excluding activations and temporaries",
        "adamw_layout": "float32 master + 2 float32 moments" if master_weights else "2 moments in the params' dtype",
        "bytes": {**parts, "total": sum(parts.values())},
        "gib": {k: round(v / GIB, 3) for k, v in {**parts, "total": sum(parts.values())}.items()},
        "largest_param": {"name": largest["name"], "bytes_per_device": largest["bytes_per_device"]},
    }


def render_text(info: dict[str, Any]) -> str:
    """The human-readable report: sections of aligned plain text, under 100 columns."""
    dev, mesh, model, mem = info["devices"], info["mesh"], info["model"], info["memory_per_device"]
    kinds = ", ".join(f"{n} x {kind}" for kind, n in dev["kinds"].items())
    local = dev["local"]
    local_text = ", ".join(local[:8]) + (f", ... ({len(local)} in all)" if len(local) > 8 else "")
    sizes = " ".join(f"{axis}={size}" for axis, size in mesh["shape"].items())
    lines = [
        f"config:    {info['config']}",
        f"versions:  jax {info['versions']['jax']}, flax {info['versions']['flax']}",
        f"backend:   {info['backend']}",
        _kernels_line(info["cpu_kernels"]),
        _kernel_line("attention:", info["kernels"]["attention"]),
        _kernel_line("decode:", info["kernels"]["decode_attention"]),
        f"devices:   {dev['count']} ({kinds})",
        f"local:     {local_text}",
        f"process:   {dev['process_index']} of {dev['process_count']}",
        f"mesh:      {tuple(mesh['shape'].values())}  {sizes}  ({_count(mesh['devices'], 'device')}"
        + (f"; planned only: this process sees {dev['count']}, try `ponder --devices {mesh['devices']}`)"
           if mesh["planned"] else ")"),
        "",
        f"parameters: {model['param_count']:,} ({_human(model['param_count'])}), {model['param_dtype']}, "
        f"{_bytes(sum(p['bytes'] for p in model['params']))} in all",
        "",
    ]
    header = ("name", "shape", "logical axes", "spec", "per device")
    rows = [
        (
            p["name"],
            "x".join(map(str, p["shape"])) or "scalar",
            " ".join(a or "-" for a in p["axes"]),
            " ".join(_spec_entry(s) for s in p["spec"]),
            _bytes(p["bytes_per_device"]),
        )
        for p in model["params"]
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)] + [row[-1].rjust(widths[-1])]
        lines.append("  ".join(cells).rstrip())
    b, largest = mem["bytes"], mem["largest_param"]
    lines += [
        "",
        "memory per device (estimate; excludes activations and temporaries):",
        f"  params       {_bytes(b['params']):>11}",
        f"  AdamW state  {_bytes(b['adamw_state']):>11}  ({mem['adamw_layout']})",
        f"  grads        {_bytes(b['grads']):>11}",
        f"  total        {_bytes(b['total']):>11}",
        f"  largest param: {largest['name']} ({_bytes(largest['bytes_per_device'])} per device)",
    ]
    return "\n".join(lines)


def _spec_entry(entry: str | list[str] | None) -> str:
    if entry is None:
        return "-"
    return entry if isinstance(entry, str) else "+".join(entry)


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
