"""The launch spec: where and how a ponder command runs as a TPU pod job (`ponder launch tpu-vm | queued | xpk`).

    spec = load_launch_spec("v4-32", ["zone=us-central2-b", "max_restarts=3"])

A spec is a YAML file under configs/launch/ (or any path), loaded like a ponder config
(`base:` inheritance, dotted `key=value` overrides, errors naming the file and key). It
says which TPUs (accelerator type, slices, capacity, runtime), which ponder command with
which config, where the run lives (a `gs://` run directory, which every host and every
retry shares), how the code reaches the workers, and how often a preempted job restarts.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from configs.fileio import is_remote
from configs.schema import Strict

LAUNCH_DIR = Path(__file__).resolve().parent / "launch"
Capacity = Literal["on-demand", "spot", "reserved", "best-effort"]


class CodeSpec(Strict):
    """How the code reaches the workers: a tarball or wheel of the current git commit (named by its SHA,
    built once and reused by every retry), or a container image (xpk)."""

    kind: Literal["tarball", "wheel", "image"] = "tarball"
    image: str | None = None  # kind=image: the image every worker runs, e.g. gcr.io/PROJECT/ponder:TAG

    @field_validator("image")
    @classmethod
    def _image_for_image(cls, image: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("kind") == "image" and not image:
            raise ValueError("code.kind=image needs code.image (the container image to run)")
        return image


class XpkSpec(Strict):
    """xpk's own settings: the GKE cluster the workload runs in."""

    cluster: str | None = None
    reservation: str | None = None  # capacity=reserved: the reservation's name


class LaunchSpec(Strict):
    """Launch spec: one pod job, its TPUs, its command, its run directory, its code and its restarts."""

    name: str = Field("ponder", pattern=r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")  # TPU / queued resource / workload
    project: str | None = None  # gcloud's default project when null
    zone: str | None = None  # gcloud's default zone when null
    accelerator: str = "v5litepod-8"  # an accelerator type: v4-32, v5litepod-16, v5p-128, v6e-8, ...
    slices: int = Field(1, gt=0)  # several slices (multislice) become the mesh's dcn_data axis
    capacity: Capacity = "on-demand"
    runtime_version: str | None = None  # the TPU software version; null: the generation's default
    command: list[str] = Field(default_factory=lambda: ["train"], min_length=1)  # the ponder command
    config: str | None = None  # its --config, a path in the repository (it travels with the code)
    overrides: list[str] = Field(default_factory=list)  # key=value overrides of the ponder config
    env: dict[str, str] = Field(default_factory=dict)  # environment of every worker's process
    run_dir: str | None = None  # the run directory: gs://BUCKET/PATH for any multi-host job
    code: CodeSpec = CodeSpec()
    max_restarts: int = Field(0, ge=0)  # how often a preempted job is recreated and relaunched
    delete_at_end: bool | None = None  # remove the TPUs when the job ends; null: queued and xpk yes, tpu-vm no
    xpk: XpkSpec = XpkSpec()

    @field_validator("accelerator")
    @classmethod
    def _known_accelerator(cls, accelerator: str) -> str:
        from train.launch.accelerators import tpu_shape

        tpu_shape(accelerator)  # AcceleratorError (a ValueError) names the known types
        return accelerator

    @field_validator("run_dir")
    @classmethod
    def _shared_run_dir(cls, run_dir: str | None, info: ValidationInfo) -> str | None:
        from train.launch.accelerators import tpu_shape

        accelerator, slices = info.data.get("accelerator"), info.data.get("slices", 1)
        hosts = tpu_shape(accelerator).hosts * slices if accelerator else 1
        if hosts > 1 and not (run_dir and is_remote(run_dir)):
            raise ValueError(f"a job of {hosts} hosts needs a run directory they all see: gs://BUCKET/PATH, "
                             f"got {run_dir!r} (each host would write its own local disk)")
        return run_dir


def resolve_launch_path(path: str | Path) -> Path:
    """The spec file `path` names: as given, else configs/launch/NAME[.yaml]."""
    from configs.load import ConfigError

    for candidate in (Path(path).expanduser(), LAUNCH_DIR / str(path), LAUNCH_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"launch spec not found: {path} (also looked in {LAUNCH_DIR} for {path}[.yaml])")


def load_launch_spec(path: str | Path, overrides: Sequence[str] = ()) -> LaunchSpec:
    """The validated spec of `path` with `overrides`; ConfigError naming the file (or override) and key."""
    from configs.load import load_model

    return load_model(LaunchSpec, resolve_launch_path(path), overrides)
