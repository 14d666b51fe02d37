"""The `ponder` command: global options, then one subcommand per module in `tools/`.

Each subcommand lives in `tools/<name>.py` and exposes `add_parser(subparsers)`, which adds
its parser and sets `func(args) -> int | None` as the default. Adding a command means
writing that module and listing its name in `COMMANDS`; nothing else here changes.

jax is never imported at module level here: `--devices N` has to reach XLA_FLAGS before
the first `import jax`, so it is applied before any subcommand module is imported.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from configs.fileio import use_object_storage_defaults
from configs.load import ConfigError, load_config
from configs.schema import Config
from configs.xla_flags import tune_cpu_backend

# Commands that run on one host by design, and why; in a multi-process job they stop with that reason.
SINGLE_HOST = {
    "demo": "the demo is a one-machine showcase of every stage",
    "bench": "a benchmark measures one host against a reference on the same host",
    "data": "it reads and writes local problem files",
    "vocab": "it trains a vocabulary from local files",
    "reward data": "labelling samples problems in small host-side batches and appends to one local file",
    "reward eval": "it scores a local reward data file",
    "import": "it reads a local HuggingFace directory into a local run directory",
}

# Module names under tools/, in the order --help lists them.
COMMANDS = ("demo", "info", "train", "rl", "generate", "search", "reward", "data", "vocab", "export", "bench", "launch")

DESCRIPTION = """\
ponder is a JAX/TPU-first stack for reasoning models: pretrain a Flax NNX transformer on a
(data, fsdp, tensor) device mesh, fine-tune it with reinforcement learning on chain-of-thought
with verifiable rewards, and spend more compute at inference time through a jit-compiled,
batched tree search over reasoning steps. Commands that take a config accept `--config PATH`
(a YAML file, or a packaged name such as `tiny` or `llama3-8b`) followed by dotted overrides
`key.sub=value`, e.g. `ponder info --config llama3-8b mesh.fsdp=8`."""

EPILOG = """\
--devices N must come before the subcommand: `ponder --devices 8 info --config tiny`.
It simulates N CPU devices (appends --xla_force_host_platform_device_count=N to XLA_FLAGS
and sets JAX_PLATFORMS=cpu unless already set), which is how sharded layouts are tried
out without hardware."""


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the common `--config PATH` option and positional `key=value` overrides."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="YAML config file or packaged name (tiny, llama3-8b, experiments/tiny); default: configs/base.yaml",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. model.num_layers=4"
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated config named by `--config` with the positional overrides applied."""
    return load_config(args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    """The full `ponder` parser; imports each subcommand module listed in `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="ponder",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ponder {package_version()}")
    parser.add_argument(
        "--devices",
        type=_positive_int,
        metavar="N",
        default=None,
        help="simulate N CPU devices (sets XLA_FLAGS before jax is imported); give it before the subcommand",
    )
    job = parser.add_argument_group("multi-process jobs (or PONDER_COORDINATOR, PONDER_NUM_PROCESSES, "
                                    "PONDER_PROCESS_ID; TPU pods and SLURM are detected)")
    job.add_argument("--coordinator", metavar="HOST:PORT", default=None, help="process 0's address, the same for all")
    job.add_argument("--num-processes", type=_positive_int, metavar="N", default=None, help="processes in the job")
    job.add_argument("--process-id", type=int, metavar="I", default=None, help="this process's index, 0..N-1")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"tools.{name}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `ponder` console script; exits with the command's status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    use_object_storage_defaults()  # how gs:// run directories are reached (configs.fileio)
    devices = _devices_before_command(argv)
    if devices is not None:
        simulate_cpu_devices(devices)
    tune_cpu_backend()  # after --devices, which runs on CPU even on an accelerator host
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        sys.exit(2)
    from model import distributed  # imports jax: only after XLA_FLAGS is final
    from model.sharding import MeshError
    from tasks.files import ProblemFileError

    joined = False
    try:
        if args.command != "launch":  # a launcher starts a job's processes; it is none of them
            spec = distributed.job_spec(args.coordinator, args.num_processes, args.process_id)
            name = " ".join(filter(None, (args.command, getattr(args, "reward_command", None))))
            if spec is not None and name in SINGLE_HOST:
                raise distributed.DistributedError(
                    f"`ponder {name}` runs on one host ({SINGLE_HOST[name]}): run it without `ponder launch`, "
                    "--num-processes or the PONDER_* variables")
            if spec is not None:
                distributed.join_job(spec)
                joined = True
        status = args.func(args)
    except (ConfigError, MeshError, ProblemFileError, FileNotFoundError, distributed.DistributedError) as err:
        print(f"ponder {args.command}: error: {err}", file=sys.stderr)
        status = 2
    except BrokenPipeError:  # `ponder info | head`: the reader left; exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except (Exception, KeyboardInterrupt):
        if not joined:
            raise
        traceback.print_exc()
        status = 1
    if status and joined:
        # One host of a job failing leaves at once: JAX's exit barrier would wait for the other
        # hosts, which may be waiting for this one inside a collective. Its launcher (or the
        # cluster) then stops them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status or 0)


def report(text: str, file=None, flush: bool = False) -> None:
    """Prints `text` on process 0 only: a job's results and notes are said once, not once per host."""
    import jax

    if jax.process_index() == 0:
        print(text, file=file, flush=flush)


def simulate_cpu_devices(count: int) -> None:
    """Makes jax (not yet imported) see `count` CPU devices."""
    if "jax" in sys.modules:
        print("ponder: warning: --devices has no effect, jax was already imported", file=sys.stderr)
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _devices_before_command(argv: Sequence[str]) -> int | None:
    """The value of `--devices` among the global options (before the subcommand), if valid."""
    value = None
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] == "--devices" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--devices="):
            value = argv[i].partition("=")[2]
        i += 1
    try:
        return _positive_int(value) if value is not None else None
    except argparse.ArgumentTypeError:
        return None  # the full parser reports it


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def package_version() -> str:
    """The installed ponder's version as `--version` prints it (without importing jax, unlike model.distributed)."""
    try:
        return version("ponder")
    except PackageNotFoundError:
        return "unknown (not installed)"


if __name__ == "__main__":
    main()
