"""The check every TPU worker runs before a pod job (`ponder launch preflight --devices N`).

1. Free the TPU: a process left from an earlier job (or another user's notebook) that still
   holds `/dev/accel*` or `/dev/vfio/*` makes the new job fail with "TPU in use"; those
   processes are killed and libtpu's lock file is removed.
2. Join the job (`jax.distributed`, from the TPU VM's own metadata): the processes compare
   their count, devices per host and python/jax/jaxlib/libtpu/ponder versions
   (model.distributed.check_agreement), so a worker with another install is named.
3. Count the devices: the job must see what the accelerator type promises.
A failure raises PreflightError naming the worker (its process index) and what differs.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

TPU_DEVICES = ("/dev/accel", "/dev/vfio/")
LIBTPU_LOCKFILE = Path("/tmp/libtpu_lockfile")


class PreflightError(RuntimeError):
    """A worker that is not ready for the job; the message names it."""


def tpu_holders(proc: Path = Path("/proc")) -> dict[int, str]:
    """{pid: the TPU device file it holds open} for every other process that holds one."""
    holders = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(TPU_DEVICES):
                    holders[int(entry.name)] = target
                    break
        except OSError:  # gone, or not ours to look at
            continue
    return holders


def free_tpu(proc: Path = Path("/proc"), lockfile: Path = LIBTPU_LOCKFILE) -> list[str]:
    """Kills the processes holding the TPU and removes libtpu's lock file; says what it did."""
    done = []
    for pid, device in sorted(tpu_holders(proc).items()):
        try:
            os.kill(pid, signal.SIGKILL)
            done.append(f"killed process {pid}, which held {device}")
        except ProcessLookupError:
            pass
    if lockfile.exists():
        lockfile.unlink()
        done.append(f"removed {lockfile}")
    return done


def check_devices(expected: int) -> None:
    """PreflightError unless the job sees `expected` devices (after joining it)."""
    import jax

    if jax.device_count() != expected:
        raise PreflightError(
            f"worker {jax.process_index()}: the job sees {jax.device_count()} devices ({jax.process_count()} "
            f"processes x {jax.local_device_count()}), the accelerator type promises {expected}")
