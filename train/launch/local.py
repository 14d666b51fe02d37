"""`ponder launch local`: N processes of one command on this machine, joined as one JAX job.

Each host gets its own CPU devices (`--xla_force_host_platform_device_count`), the job's
coordinator on a free localhost port, and its PONDER_* identity; ponder's start-up
(model/distributed.py) joins them with CPU collectives (gloo). This is how every command is
tried on many hosts without a pod.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence

from model.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from train.launch.supervisor import Worker

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_workers(command: Sequence[str], hosts: int, devices_per_host: int, *, port: int | None = None,
                  environ: Mapping[str, str] | None = None) -> list[Worker]:
    """The `hosts` workers of `command` as one job on localhost, each with `devices_per_host` CPU devices."""
    if hosts < 1 or devices_per_host < 1:
        raise ValueError(f"--hosts and --devices-per-host must be positive, got {hosts} and {devices_per_host}")
    if not command:
        raise ValueError("no command to launch: give it after `--`, "
                         "e.g. `ponder launch local --hosts 2 -- ponder train`")
    environ = dict(os.environ if environ is None else environ)
    argv = _runnable(command)
    port = free_port() if port is None else port
    flags = _DEVICE_COUNT_FLAG.sub("", environ.get("XLA_FLAGS", "")).strip()
    base = environ | {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices_per_host}".strip(),
        ENV_COORDINATOR: f"127.0.0.1:{port}",
        ENV_NUM_PROCESSES: str(hosts),
        "PYTHONUNBUFFERED": "1",  # lines reach the supervisor as they are printed
    }
    return [Worker(i, argv, base | {ENV_PROCESS_ID: str(i)}) for i in range(hosts)]


def _runnable(command: Sequence[str]) -> tuple[str, ...]:
    """`command`, with a bare `ponder` run through this Python when it is not on PATH (an unactivated venv)."""
    if command[0] == "ponder" and shutil.which("ponder") is None:
        return (sys.executable, "-m", "tools.cli", *command[1:])
    return tuple(command)
