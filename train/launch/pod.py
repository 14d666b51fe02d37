"""What a TPU pod launch runs, in order: the plan of `ponder launch tpu-vm | queued | xpk`.

    plan = tpu_vm_plan(spec, sha)     # [Step(what, argv=...), Step(what, file=(path, text)), ...]
    print(render(plan))               # `--dry-run`: every command and generated file, in order

A plan is data, so `--dry-run` prints exactly what a launch would run and the tests compare
it with checked-in golden files. The code of one git commit (`sha`) reaches the workers as
a tarball or a wheel built once under build/launch/ and reused by every retry, or as a
container image (xpk). Each worker runs one generated script: install that code, run
`ponder launch preflight` (free the TPU, compare versions, count devices), then the ponder
command with the spec's config, overrides and run directory, the slices as `mesh.dcn_data`.
Multislice jobs get their MEGASCALE_* variables from the queued resource or xpk, never from
here.
"""
from __future__ import annotations

import dataclasses
import shlex

from configs.launch_spec import LaunchSpec
from train.launch.accelerators import TpuShape, tpu_shape

BUILD_DIR = "build/launch"  # relative to the repository root
RUN_DIR_KEYS = {"train": "train.run_dir", "rl": "rl.run_dir"}


class LaunchError(ValueError):
    """A spec that this backend cannot run; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Step:
    """One thing a launch does: run `argv` here, or write `file` = (path, text)."""

    what: str
    argv: tuple[str, ...] | None = None
    file: tuple[str, str] | None = None
    worker: tuple[int, int] | None = None  # (slice, worker) this command runs on, for the job's own commands
    phase: str = ""  # what the launcher does with it: build, file, exists, create, wait, copy, run, await, delete


def render(plan: list[Step]) -> str:
    """The dry-run text: `# what` then `$ command` (shell-quoted) or the file between markers."""
    out = []
    for step in plan:
        out.append(f"# {step.what}")
        if step.argv is not None:
            out.append("$ " + shlex.join(step.argv))
        if step.file is not None:
            path, text = step.file
            out += [f"--- {path}", text.rstrip("\n"), f"--- end of {path}"]
    return "\n".join(out) + "\n"


def check_backend(spec: LaunchSpec, backend: str) -> TpuShape:
    """The slice shape, or LaunchError when `backend` cannot give what the spec asks for."""
    shape = tpu_shape(spec.accelerator)
    if spec.command[0] not in RUN_DIR_KEYS:
        raise LaunchError(f"command: a pod job runs `ponder train` or `ponder rl`, got {shlex.join(spec.command)!r}")
    if backend == "tpu-vm" and spec.slices > 1:
        raise LaunchError(f"slices: {spec.slices} slices need queued resources (`ponder launch queued`) or xpk")
    if backend == "tpu-vm" and spec.capacity == "best-effort":
        raise LaunchError("capacity: best-effort needs queued resources (`ponder launch queued`)")
    if backend == "xpk":
        if spec.code.kind != "image":
            raise LaunchError("code.kind: xpk runs a container image: set code.kind=image and code.image")
        if not spec.xpk.cluster:
            raise LaunchError("xpk.cluster: name the GKE cluster the workload runs in")
        if spec.capacity in ("reserved", "best-effort") and not spec.xpk.reservation:
            raise LaunchError(f"capacity: {spec.capacity} on xpk needs xpk.reservation (the reservation's name)")
    elif spec.code.kind == "image":
        raise LaunchError(f"code.kind: {backend} copies a tarball or wheel of the commit; images are for xpk")
    return shape


def job_argv(spec: LaunchSpec, installed: bool = False) -> list[str]:
    """The ponder command every worker runs: the spec's command, config, overrides, run directory and slices.

    `installed` (a wheel): the config is found among the installed package's configs.
    """
    config = spec.config
    if config is not None and installed and config.startswith("configs/"):
        config = config.removeprefix("configs/")
    argv = ["python3", "-m", "tools.cli", *spec.command, "--no-progress"]
    argv += ["--config", config] if config else []
    argv += list(spec.overrides)
    argv += [f"{RUN_DIR_KEYS[spec.command[0]]}={spec.run_dir}"] if spec.run_dir else []
    argv += [f"mesh.dcn_data={spec.slices}"] if spec.slices > 1 else []
    return argv


def artifact(spec: LaunchSpec, sha: str) -> str:
    """The local path of the commit's code: build/launch/ponder-SHA.tar.gz or build/launch/ponder-SHA/ (a wheel)."""
    return f"{BUILD_DIR}/ponder-{sha}.tar.gz" if spec.code.kind == "tarball" else f"{BUILD_DIR}/ponder-{sha}"


def build_step(spec: LaunchSpec, sha: str) -> Step:
    """Builds the commit's code once (skipped when the artifact exists: every retry reuses it)."""
    if spec.code.kind == "tarball":
        argv = ("git", "archive", "--format=tar.gz", f"--prefix=ponder-{sha}/", "-o", artifact(spec, sha), sha)
    else:
        argv = ("python3", "-m", "pip", "wheel", "--no-deps", "--wheel-dir", artifact(spec, sha), ".")
    return Step(f"build the code of commit {sha} once (kept for every retry)", argv=argv, phase="build")


def worker_script(spec: LaunchSpec, sha: str, shape: TpuShape) -> Step:
    """The script each worker runs: install the commit's code, preflight, then exec the job."""
    lines = ["#!/bin/bash", f"# ponder job {spec.name}, commit {sha}: install, preflight, run", "set -euo pipefail",
             'cd "$HOME"']
    if spec.code.kind == "tarball":
        lines += [f"rm -rf ponder-{sha} && tar -xzf ponder-{sha}.tar.gz",
                  f"python3 -m pip install --quiet --user -e 'ponder-{sha}[tpu]'", f"cd ponder-{sha}"]
    else:
        lines += [f"python3 -m pip install --quiet --user --force-reinstall \"$(ls ponder-{sha}/*.whl)[tpu]\""]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in sorted(spec.env.items())]
    lines += [shlex.join(preflight_argv(spec, shape)),
              "exec " + shlex.join(job_argv(spec, installed=spec.code.kind == "wheel"))]
    return Step("the script every worker runs", file=(script_path(spec), "\n".join(lines) + "\n"), phase="file")


def preflight_argv(spec: LaunchSpec, shape: TpuShape) -> list[str]:
    """`ponder launch preflight` expecting every device of every slice."""
    return ["python3", "-m", "tools.cli", "launch", "preflight", "--devices", str(shape.devices * spec.slices)]


def script_path(spec: LaunchSpec) -> str:
    return f"{BUILD_DIR}/{spec.name}-worker.sh"


def _where(spec: LaunchSpec) -> list[str]:
    return [f"--zone={spec.zone}"] * bool(spec.zone) + [f"--project={spec.project}"] * bool(spec.project)


def _xpk_where(spec: LaunchSpec) -> list[str]:
    return [f"--project={spec.project}"] * bool(spec.project) + [f"--zone={spec.zone}"] * bool(spec.zone)


def _runtime(spec: LaunchSpec, shape: TpuShape) -> str:
    return spec.runtime_version or shape.generation.runtime_version


def _copy_and_run(spec: LaunchSpec, sha: str, shape: TpuShape, nodes: list[str]) -> list[Step]:
    """Copies the code and script to every worker of every node, then one supervised ssh per worker."""
    files = [artifact(spec, sha), script_path(spec)]
    recurse = ["--recurse"] if spec.code.kind == "wheel" else []
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
    steps = [Step(f"copy the code and the worker script to every worker of {node}",
                  argv=(*gcloud, "scp", *recurse, *files, f"{node}:", "--worker=all", *_where(spec)), phase="copy")
             for node in nodes]
    script = f"bash ~/{script_path(spec).rsplit('/', 1)[1]}"
    for s, node in enumerate(nodes):
        steps += [Step(f"run the job on slice {s} worker {w}", worker=(s, w), phase="run",
                       argv=(*gcloud, "ssh", node, f"--worker={w}", *_where(spec), f"--command={script}"))
                  for w in range(shape.hosts)]
    return steps


def tpu_vm_plan(spec: LaunchSpec, sha: str) -> list[Step]:
    """`ponder launch tpu-vm`: create the TPU VM unless it exists, copy the code, run on every worker."""
    shape = check_backend(spec, "tpu-vm")
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
    capacity = {"spot": ["--spot"], "reserved": ["--reserved"]}.get(spec.capacity, [])
    plan = [build_step(spec, sha), worker_script(spec, sha, shape),
            Step(f"does the TPU VM {spec.name} exist? (its state, or an error)",
                 argv=(*gcloud, "describe", spec.name, *_where(spec), "--format=value(state)"), phase="exists"),
            Step(f"create it (only when it does not): {spec.accelerator}, {shape.hosts} host(s)",
                 argv=(*gcloud, "create", spec.name, *_where(spec), f"--accelerator-type={spec.accelerator}",
                       f"--version={_runtime(spec, shape)}", *capacity), phase="create"),
            *_copy_and_run(spec, sha, shape, [spec.name])]
    if spec.delete_at_end:
        plan.append(delete_step(spec, "tpu-vm"))
    return plan


def queued_nodes(spec: LaunchSpec) -> list[str]:
    """The TPU node of each slice: NAME for one, NAME-0 ... NAME-(S-1) (`--node-prefix`) for several."""
    return [spec.name] if spec.slices == 1 else [f"{spec.name}-{s}" for s in range(spec.slices)]


def queued_plan(spec: LaunchSpec, sha: str) -> list[Step]:
    """`ponder launch queued`: request the slices, wait until ACTIVE, run on every worker, delete the request."""
    shape = check_backend(spec, "queued")
    queued = ["gcloud", "compute", "tpus", "queued-resources"]
    nodes = ["--node-id=" + spec.name] if spec.slices == 1 else [f"--node-count={spec.slices}",
                                                                 f"--node-prefix={spec.name}"]
    capacity = {"spot": ["--spot"], "reserved": ["--reserved"], "best-effort": ["--best-effort"]}.get(spec.capacity, [])
    plan = [build_step(spec, sha), worker_script(spec, sha, shape),
            Step(f"request {spec.slices} x {spec.accelerator} ({spec.capacity})",
                 argv=(*queued, "create", spec.name, *_where(spec), f"--accelerator-type={spec.accelerator}",
                       f"--runtime-version={_runtime(spec, shape)}", *nodes, *capacity), phase="create"),
            Step("poll until ACTIVE (WAITING_FOR_RESOURCES, PROVISIONING; FAILED or SUSPENDED end the wait)",
                 argv=(*queued, "describe", spec.name, *_where(spec), "--format=value(state.state)"), phase="wait"),
            *_copy_and_run(spec, sha, shape, queued_nodes(spec))]
    if spec.delete_at_end is not False:
        plan.append(delete_step(spec, "queued"))
    return plan


def xpk_plan(spec: LaunchSpec, sha: str) -> list[Step]:
    """`ponder launch xpk`: one `xpk workload create` (xpk restarts it up to max_restarts), then its deletion."""
    shape = check_backend(spec, "xpk")
    capacity = {"spot": ["--spot"], "on-demand": ["--on-demand"]}.get(
        spec.capacity, [f"--reservation={spec.xpk.reservation}"])
    command = shlex.join(preflight_argv(spec, shape)) + " && " + shlex.join(job_argv(spec, installed=True))
    where = _xpk_where(spec)
    plan = [Step(f"create workload {spec.name}: {spec.slices} x {spec.accelerator}, image {spec.code.image} "
                 f"(commit {sha})",
                 argv=("xpk", "workload", "create", f"--cluster={spec.xpk.cluster}", f"--workload={spec.name}",
                       f"--tpu-type={spec.accelerator}", f"--num-slices={spec.slices}",
                       f"--docker-image={spec.code.image}", f"--command={command}",
                       f"--max-restarts={spec.max_restarts}", *capacity, *where,
                       *[f"--env={k}={v}" for k, v in sorted(spec.env.items())]), phase="create"),
            Step("wait until the workload ends (xpk restarts it up to max_restarts times); its status is the job's",
                 argv=("xpk", "workload", "list", f"--cluster={spec.xpk.cluster}",
                       f"--wait-for-job-completion={spec.name}", *where), phase="await")]
    if spec.delete_at_end is not False:
        plan.append(delete_step(spec, "xpk"))
    return plan


def delete_step(spec: LaunchSpec, backend: str) -> Step:
    """Removes what the launch created: at the end (see delete_at_end), and before recreating preempted TPUs."""
    if backend == "tpu-vm":
        return Step("delete the TPU VM", phase="delete",
                    argv=("gcloud", "compute", "tpus", "tpu-vm", "delete", spec.name, *_where(spec), "--quiet"))
    if backend == "queued":
        return Step("delete the queued resource and its TPUs", phase="delete",
                    argv=("gcloud", "compute", "tpus", "queued-resources", "delete", spec.name, *_where(spec),
                          "--force", "--quiet"))
    return Step("delete the workload when it has ended", phase="delete",
                argv=("xpk", "workload", "delete", f"--cluster={spec.xpk.cluster}", f"--workload={spec.name}",
                      *_xpk_where(spec)))


PLANS = {"tpu-vm": tpu_vm_plan, "queued": queued_plan, "xpk": xpk_plan}
