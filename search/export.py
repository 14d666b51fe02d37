"""A compiled search saved with `jax.export`: run later without tracing the model's Python code.

    artifact = export_search(spec, models, abstract_params, abstract_scorer_params, mesh, batch_size, widths,
                             platforms=("cpu", "cuda", "tpu"), info={"config": ..., "vocab": ...})
    write_artifact(artifact, "beam.ponder")
    artifact = read_artifact("beam.ponder")                   # refuses another jax version
    searcher = Searcher(None, params, scorer_params, mesh, programs=artifact.program)

An artifact is a zip file: `metadata.json` (what the program was built with and for: ponder,
jax and jaxlib versions, platforms, the resolved config and vocabulary the caller passes in
`info`, the spec, batch size and widths, devices and mesh, every param's shape, dtype and
partition spec, the native CPU kernels it calls) and `programs/<width>.jax`, one serialized
`jax.export.Exported` per prompt width a problem can get (`prompt_widths`), all for one batch
size. One program per width, not one padded to the widest: a search's cost grows with its
prompt width, and bucketing exists to keep narrow problems cheap.

The program is `run_search` for one (spec, [batch, width]) with the params as inputs (not
constants) and the mesh's shardings in its signature, so it runs on a mesh of the same device
count only. Keys go in as raw key data and the state comes out as plain dicts without its page
pools: a serialized signature holds only arrays, tuples and dicts. Platform choices inside it
are `lax.platform_dependent` (decode layout, small matmuls) or lowered per platform (the paged
decode attention's kernels, `model.pallas_paged`), resolved when the loading machine compiles it;
the GPU's Triton kernel is IR with no stability promise, fine for an artifact that only the jax
version that exported it runs. Two things it cannot hold: the ORACLE scorer's host callback
(refused: there is no Python to call back into) and, on CPU, ponder's native kernels' code:
the program names them (`jax.ffi` custom calls) and the loading process must register the same
kernels (`check_kernels`); exporting with PONDER_CPU_KERNELS=0 leaves XLA's ops in their place.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np

from model import cpu_kernels, pallas_paged
from search.runner import bucket_width
from search.sampler import Sampling
from search.sharded import run_search
from search.spec import SearchSpec, resolve
from search.state import Models, SearchState
from search.tree import Tree

FORMAT = "ponder-search-program/1"
METADATA = "metadata.json"
KERNEL_TARGETS = (cpu_kernels.TARGET, cpu_kernels.MATMUL_TARGET)


class ArtifactError(ValueError):
    """A search artifact cannot be built or run here; the message says why and what would do."""


@dataclasses.dataclass(frozen=True)
class SearchArtifact:
    """An exported search: `metadata` (JSON-ready) and one `Exported` per prompt width."""

    metadata: dict
    exported: dict[int, jax.export.Exported]

    @property
    def spec(self) -> SearchSpec:
        fields = dict(self.metadata["spec"])
        return SearchSpec(**fields | {"sampling": Sampling(**fields["sampling"])})

    @property
    def batch_size(self) -> int:
        return self.metadata["batch_size"]

    @property
    def widths(self) -> list[int]:
        return sorted(self.exported)

    def program(self, spec: SearchSpec, shape: tuple[int, ...]) -> Callable:
        """The search for `spec` on prompts of `shape` [B, width], as `runner.Searcher` calls it (jittable).

        (params, scorer_params, tokens [B, W], lengths [B], keys [B]) -> (state without page pools, chosen).
        """
        if spec != self.spec:
            raise ArtifactError(f"the artifact holds {self.spec}, not {spec}")
        batch, width = shape
        if batch != self.batch_size or width not in self.exported:
            raise ArtifactError(f"no program for prompts of shape [{batch}, {width}]: the artifact holds "
                                f"[{self.batch_size}, W] for W in {self.widths}")
        return functools.partial(_call, self.exported[width])

    def abstract_params(self, mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
        """(params, scorer_params) as ShapeDtypeStructs with their exported shardings on `mesh` (what
        `load_params` restores onto), the tree taken from the program's signature."""
        program = self.exported[self.widths[0]]
        (params, scorer_params, *_), _ = jax.tree.unflatten(program.in_tree, program.in_avals)
        layout = self.metadata["params"]

        def abstract(tree, described):
            leaves, treedef = jax.tree.flatten(tree)
            return jax.tree.unflatten(treedef, [
                jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=jax.NamedSharding(mesh, _spec(d["spec"])))
                for aval, d in zip(leaves, described, strict=True)])

        return abstract(params, layout["params"]), abstract(scorer_params, layout["scorer_params"])


def prompt_widths(buckets: Sequence[int], max_len: int, max_step_tokens: int) -> list[int]:
    """Every width `runner.plan_batches` gives a prompt that leaves room for a step (`runner.fitting`)."""
    longest = max_len - max_step_tokens - 1
    return sorted({bucket_width(length, list(buckets), max_len) for length in range(1, longest + 1)})


def export_search(spec: SearchSpec, models: Models, abstract_params, abstract_scorer_params, mesh: jax.sharding.Mesh,
                  batch_size: int, widths: Sequence[int], platforms: Sequence[str], info: dict) -> SearchArtifact:
    """`run_search` for `spec` exported for prompts [batch_size, W] for each W in `widths`, on `mesh`.

    abstract_params, abstract_scorer_params: ShapeDtypeStructs with shardings (the scorer's None
    without a model). `info` joins the metadata (the caller's config, vocabulary, versions).
    Lowers for every platform without running; raises ArtifactError for a host-callback scorer (oracle, checker).
    """
    if models.scorer.host_callback:
        label = "ORACLE" if models.scorer.oracle else models.scorer.name
        raise ArtifactError(f"the {label} scorer cannot be exported: it scores steps in a Python host callback "
                            "(jax.pure_callback), which jax.export cannot serialize; export with "
                            "search.scorer=logprob or reward")
    spec = resolve(spec)
    program = jax.jit(functools.partial(_program, spec, models))
    disabled = [jax.export.DisabledSafetyCheck.custom_call(target)
                for target in (*KERNEL_TARGETS, *pallas_paged.UNSTABLE_EXPORT_TARGETS)]
    exported, kernels = {}, set()
    with jax.set_mesh(mesh):
        for width in widths:
            args = (abstract_params, abstract_scorer_params, jax.ShapeDtypeStruct((batch_size, width), np.int32),
                    jax.ShapeDtypeStruct((batch_size,), np.int32),
                    jax.ShapeDtypeStruct((batch_size, *_key_data_shape()), np.uint32))
            exported[width] = jax.export.export(program, platforms=tuple(platforms), disabled_checks=disabled)(*args)
            text = exported[width].mlir_module()
            kernels |= {target for target in KERNEL_TARGETS if f"@{target}(" in text}
    metadata = {
        "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "platforms": list(platforms),
        "spec": dataclasses.asdict(spec), "batch_size": batch_size, "widths": sorted(exported),
        "devices": mesh.size, "mesh": dict(mesh.shape),
        "params": {"params": _describe(abstract_params), "scorer_params": _describe(abstract_scorer_params)},
        "cpu_kernels": {"targets": sorted(kernels), "sources": kernel_sources_digest() if kernels else None},
    } | info
    return SearchArtifact(metadata, exported)


def write_artifact(artifact: SearchArtifact, path: str | Path) -> None:
    """Writes the zip file (to a path the caller makes atomic)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(METADATA, json.dumps(artifact.metadata, indent=1))
        for width, exported in sorted(artifact.exported.items()):
            archive.writestr(f"programs/{width}.jax", bytes(exported.serialize()))


def read_artifact(path: str | Path) -> SearchArtifact:
    """The artifact at `path`; ArtifactError if it is not one or was built with another jax."""
    try:
        with zipfile.ZipFile(path) as archive:
            metadata = json.loads(archive.read(METADATA))
            if metadata.get("format") != FORMAT:
                raise ArtifactError(f"{path}: not a ponder search program (format {metadata.get('format')!r}, "
                                    f"expected {FORMAT!r})")
            if (metadata["jax"], metadata["jaxlib"]) != (jax.__version__, jaxlib.__version__):
                raise ArtifactError(f"{path} was exported with jax {metadata['jax']} (jaxlib {metadata['jaxlib']}); "
                                    f"this is jax {jax.__version__} (jaxlib {jaxlib.__version__}): export it again "
                                    "with this jax")
            blobs = {width: archive.read(f"programs/{width}.jax") for width in metadata["widths"]}
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path}: not a readable ponder search program ({err})") from None
    return SearchArtifact(metadata, {width: jax.export.deserialize(bytearray(blob)) for width, blob in blobs.items()})


def check_runtime(artifact: SearchArtifact, vocab: str, mesh: jax.sharding.Mesh) -> None:
    """ArtifactError unless the problems' vocabulary (an id, `train.data.vocab.vocab_id`), the devices and
    `mesh` are the ones the program was built for, and the CPU kernels it calls are registered here."""
    metadata = artifact.metadata
    if vocab != metadata["vocab"]:
        raise ArtifactError(f"the program was built for vocabulary {metadata['vocab']}; the problems would be "
                            f"encoded with {vocab} (data.vocab={metadata['config']['data']['vocab']} has changed?)")
    if mesh.size != metadata["devices"] or dict(mesh.shape) != metadata["mesh"]:
        raise ArtifactError(f"the program was built for {metadata['devices']} devices in the mesh "
                            f"{_mesh_text(metadata['mesh'])}; here the mesh is {_mesh_text(mesh.shape)} of "
                            f"{mesh.size} devices (export it again on this machine's device count)")
    check_kernels(metadata)


def check_kernels(metadata: dict) -> None:
    """ArtifactError unless every native CPU kernel the program calls is registered here, from the same sources."""
    kernels = metadata["cpu_kernels"]
    if not kernels["targets"] or jax.default_backend() != "cpu":
        return
    status = cpu_kernels.status()
    if not status.available:
        raise ArtifactError(f"the program calls ponder's native CPU kernels ({', '.join(kernels['targets'])}), "
                            f"unavailable here: {status.detail}; export it with PONDER_CPU_KERNELS=0 for XLA's ops")
    if kernels["sources"] != kernel_sources_digest():
        raise ArtifactError("the program calls ponder's native CPU kernels as they were when it was exported; "
                            "model/kernels/ has changed since: export it again")


def check_params(artifact: SearchArtifact, which: str, given: dict[str, tuple[tuple[int, ...], str]], source: str,
                 *, dtypes: bool = True) -> None:
    """ArtifactError naming the first of the program's `which` ("params" or "scorer_params") that `given`
    ({dotted name: (shape, dtype)}, `param_shapes`) lacks or has in another shape (or dtype); `source` names it."""
    for d in artifact.metadata["params"][which]:
        if d["name"] not in given:
            raise ArtifactError(f"{source} has no {d['name']}, which the program takes ({d['dtype']}{d['shape']})")
        shape, dtype = given[d["name"]]
        if list(shape) != d["shape"] or (dtypes and dtype != d["dtype"]):
            raise ArtifactError(f"{source}: {d['name']} is {dtype}{list(shape)}, the program takes "
                                f"{d['dtype']}{d['shape']} (params of another model config?)")


def param_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """{dotted name: (shape, dtype)} of the leaves of a params tree (arrays or ShapeDtypeStructs)."""
    return {_path_name(path): (tuple(leaf.shape), str(leaf.dtype))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def kernel_sources_digest() -> str:
    """sha256 of the native CPU kernels' sources: what fixes their calling convention."""
    return hashlib.sha256(b"\0".join(path.read_bytes() for path in cpu_kernels.SOURCES)).hexdigest()[:16]


def _program(spec, models, params, scorer_params, tokens, lengths, key_data):
    """`run_search` with raw key data in, and the state out as dicts of arrays without its page pools."""
    keys = jax.random.wrap_key_data(key_data)
    state, chosen = run_search(spec, models, params, scorer_params, tokens, lengths, keys)
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
              if f.name not in ("cache", "scorer_cache")}
    fields["tree"] = {f.name: getattr(state.tree, f.name) for f in dataclasses.fields(state.tree)}
    return fields, chosen


def _call(exported: jax.export.Exported, params, scorer_params, tokens, lengths, keys):
    """`exported`'s program called as `run_search` is: keys [B] typed, the state a `SearchState` (pools None)."""
    fields, chosen = exported.call(params, scorer_params, tokens, lengths, jax.random.key_data(keys))
    state = SearchState(**fields | {"tree": Tree(**fields["tree"]), "cache": None, "scorer_cache": None})
    return state, chosen


def _key_data_shape() -> tuple[int, ...]:
    return jax.random.key_data(jax.random.key(0)).shape


def _describe(tree) -> list[dict]:
    """Each leaf's dotted name, shape, dtype and partition spec, in flattening order."""
    return [{"name": _path_name(path), "shape": list(leaf.shape), "dtype": str(leaf.dtype),
             "spec": _spec_json(getattr(leaf, "sharding", None))}
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _path_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _spec_json(sharding) -> list:
    spec = getattr(sharding, "spec", None) or ()
    return [list(axis) if isinstance(axis, tuple) else axis for axis in spec]


def _spec(described: list) -> jax.sharding.PartitionSpec:
    return jax.sharding.PartitionSpec(*(tuple(axis) if isinstance(axis, list) else axis for axis in described))


def _mesh_text(shape) -> str:
    return " ".join(f"{axis}={size}" for axis, size in dict(shape).items())
