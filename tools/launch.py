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
