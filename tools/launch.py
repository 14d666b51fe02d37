"""`ponder launch local`: run a command as N processes of one JAX job on this machine."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from etils import epath

EPILOG = """\
Example: ponder launch local --hosts 2 --devices-per-host 4 -- ponder train --config tiny

Each host runs COMMAND with PONDER_COORDINATOR, PONDER_NUM_PROCESSES and PONDER_PROCESS_ID set
and its own CPU devices, so `ponder` joins them into one job (jax.distributed, gloo collectives).
Lines are printed as `[host i] ...` and kept in RUN_DIR/logs/host-i.log (--log-dir, or the run
directory of a ponder command: train.run_dir, rl.run_dir, reward train's --out). SIGTERM or
Ctrl-C reaches every host (training saves and exits 0; a second Ctrl-C kills); when one host
fails the others are stopped, and the exit status is the failed host's (else the worst of all)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("launch", help="run a command as a multi-process job",
                                   description="Run a ponder command as a multi-process JAX job.")
    backends = parser.add_subparsers(dest="backend", metavar="BACKEND", required=True)
    local = backends.add_parser("local", help="N processes on this machine, one job (CPU collectives)",
                                description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    local.add_argument("--hosts", type=int, required=True, help="number of processes (simulated hosts)")
    local.add_argument("--devices-per-host", type=int, default=1, metavar="D",
                       help="CPU devices of each host (default 1)")
    local.add_argument("--log-dir", default=None, help="where host-i.log go (default: RUN_DIR/logs of the command)")
    local.add_argument("job_command", nargs=argparse.REMAINDER, metavar="-- COMMAND...",
                       help="what every host runs")
    local.set_defaults(func=run_local)
    for backend, text in POD_BACKENDS.items():
        pod = backends.add_parser(backend, help=text, description=f"{text}. {POD_DESCRIPTION}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        pod.add_argument("spec", help="a launch spec: a YAML path, or a name under configs/launch/ (e.g. v4-32)")
        pod.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="overrides of the spec, e.g. zone=us-east5-a")
        pod.add_argument("--dry-run", action="store_true",
                         help="print every command and generated file in order; run and change nothing")
        pod.add_argument("--sha", default=None, help="the commit whose code runs (default: git rev-parse HEAD)")
        pod.add_argument("--poll-seconds", type=float, default=30.0,
                         help="how often a queued resource's state is read while waiting (default 30)")
        pod.set_defaults(func=run_pod)
    preflight = backends.add_parser("preflight", help="on a TPU worker: free the TPU, compare versions, count devices",
                                    description=_preflight_doc())
    preflight.add_argument("--devices", type=int, required=True, help="devices the job must see (all slices)")
    preflight.set_defaults(func=run_preflight)


POD_BACKENDS = {
    "tpu-vm": "a TPU VM (created unless it exists): copy the code, run on every worker",
    "queued": "queued resources (one or several slices, spot/reserved/best-effort): wait until ACTIVE, run, delete",
    "xpk": "an xpk workload on a GKE cluster (a container image)",
}
POD_DESCRIPTION = """The job is described by a launch spec (configs/launch/*.yaml, key=value overrides).
--dry-run prints every command and generated file of the launch, in order, and runs nothing.
Without it the launcher builds the commit's code once, creates the TPUs (or waits for a queued
resource), copies the code, runs every worker under one supervisor ([slice s worker w] lines,
logs in RUN_DIR/logs/), recreates and relaunches a preempted job up to max_restarts times (the
trainer resumes from its newest checkpoint), deletes what it created when asked, and ends with
a summary."""


def _preflight_doc() -> str:
    from train.launch import preflight

    return preflight.__doc__


def run_pod(args: argparse.Namespace) -> int:
    import subprocess

    from configs.launch_spec import load_launch_spec
    from train.launch.pod import PLANS, LaunchError, render

    spec = load_launch_spec(args.spec, args.overrides)  # ConfigError: the CLI names file and key
    sha = args.sha or subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                     check=True).stdout.strip()
    try:
        plan = PLANS[args.backend](spec, sha)
    except LaunchError as err:
        print(f"ponder launch {args.backend}: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(render(plan))
        return 0
    from train.launch.pod_job import PodJob

    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
    return PodJob(spec, args.backend, sha, root=root, poll_s=args.poll_seconds).run()


def run_preflight(args: argparse.Namespace) -> int:
    from model import distributed
    from train.launch.preflight import PreflightError, check_devices, free_tpu

    for done in free_tpu():
        print(f"ponder launch preflight: {done}", flush=True)
    spec = distributed.job_spec(None, None, None)
    if spec is not None:
        distributed.join_job(spec)  # compares counts and versions
    try:
        check_devices(args.devices)
    except PreflightError as err:
        print(f"ponder launch preflight: error: {err}", file=sys.stderr)
        return 2
    import jax

    print(f"ponder launch preflight: worker {jax.process_index()} ready ({jax.device_count()} devices)")
    return 0


def run_local(args: argparse.Namespace) -> int:
    from train.launch.local import local_workers
    from train.launch.supervisor import Supervisor

    command = args.job_command[1:] if args.job_command[:1] == ["--"] else args.job_command
    try:
        workers = local_workers(command, args.hosts, args.devices_per_host)
    except ValueError as err:
        print(f"ponder launch: error: {err}", file=sys.stderr)
        return 2
    run_dir = _run_dir(command)
    log_dir = args.log_dir or (run_dir / "logs" if run_dir else None)
    return Supervisor(workers, log_dir=log_dir).run()


def _run_dir(command: list[str]) -> epath.Path | None:
    """The run directory a ponder command writes to, or None (not ponder, no run directory, a bad config)."""
    if not command or Path(command[0]).name != "ponder":
        return None
    from configs.fileio import run_path
    from configs.load import ConfigError, load_config
    from tools.cli import build_parser

    try:
        args = build_parser().parse_args(command[1:])
    except SystemExit:
        return None  # the hosts will print the usage error themselves
    if args.command == "reward":
        return run_path(args.out) if args.reward_command == "train" else None
    if args.command not in ("train", "rl"):
        return None
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError:
        return None
    return run_path((cfg.rl if args.command == "rl" else cfg.train).run_dir)
