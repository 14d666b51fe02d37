"""Joining a multi-process JAX job: one process per host, the same program everywhere.

    spec = job_spec(coordinator, num_processes, process_id)   # None: a single-process run
    if spec: join_job(spec)                                    # before jax computes anything

A process is one of many when it is told so (`--coordinator HOST:PORT --num-processes N
--process-id I`, or the same as PONDER_COORDINATOR / PONDER_NUM_PROCESSES / PONDER_PROCESS_ID,
which `ponder launch local` sets) or when its environment is a cluster JAX can read itself
(a multi-host TPU VM or GKE TPU pod, a SLURM job of several tasks). Start-up must fail with
a message, not hang or abort: JAX's coordination client aborts the process (SIGABRT, no
Python exception) when the coordinator stays silent, so ponder probes the coordinator's port
first and keeps a watchdog that reports what to check before JAX's own deadline fires.
After joining, the processes compare what they declared and what they run (process count,
devices per host, jax and ponder versions) and stop naming the first difference.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "PONDER_COORDINATOR", "PONDER_NUM_PROCESSES", "PONDER_PROCESS_ID"
ENV_TIMEOUT = "PONDER_INIT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300
JAX_GRACE_S = 30  # JAX's own deadline is set this much later, so ponder's clearer report comes first


class DistributedError(RuntimeError):
    """This process cannot join its job; the message says what to check."""


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """How this process joins its job: explicit (coordinator, count, id), or `auto` (JAX reads the cluster)."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    source: str  # "flags", "environment", or the cluster kind JAX detects ("tpu", "slurm")
    timeout_s: int = DEFAULT_TIMEOUT_S

    @property
    def auto(self) -> bool:
        return self.coordinator is None


def job_spec(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
             timeout_s: int | None = None, environ: Mapping[str, str] | None = None) -> JobSpec | None:
    """The job this process belongs to, or None when it runs alone; flags win over PONDER_* variables."""
    environ = os.environ if environ is None else environ
    timeout_s = timeout_s or int(environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S))
    given = (coordinator, num_processes, process_id)
    source = "flags"
    if all(value is None for value in given):
        given = tuple(environ.get(name) for name in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID))
        source = "environment"
    if any(value is not None for value in given):
        if any(value is None for value in given):
            names = ("--coordinator/" + ENV_COORDINATOR, "--num-processes/" + ENV_NUM_PROCESSES,
                     "--process-id/" + ENV_PROCESS_ID)
            missing = [name for name, value in zip(names, given, strict=True) if value is None]
            raise DistributedError(f"a multi-process run needs all three of coordinator, process count and id; "
                                   f"missing {', '.join(missing)}")
        address = str(given[0])
        count, index = _integer(given[1], "number of processes"), _integer(given[2], "process id")
        if count < 1 or not 0 <= index < count:
            raise DistributedError(f"process id {index} is not in 0..{count - 1} (number of processes {count})")
        if ":" not in address:
            raise DistributedError(f"coordinator {address!r} must be HOST:PORT")
        return None if count == 1 else JobSpec(address, count, index, source, timeout_s)
    cluster = detect_cluster(environ)
    return JobSpec(None, None, None, cluster, timeout_s) if cluster else None


def detect_cluster(environ: Mapping[str, str]) -> str | None:
    """The multi-process cluster JAX can configure itself from this environment ("tpu", "slurm"), or None."""
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in environ:
        return "tpu"
    if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in environ:
        return "slurm"
    return None


def join_job(spec: JobSpec) -> None:
    """Calls jax.distributed.initialize for `spec`, then checks that every process agrees on the job."""
    import jax

    # CPU devices of different processes talk through gloo; accelerators ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    what = (f"process {spec.process_id} of {spec.num_processes} with coordinator {spec.coordinator}"
            if not spec.auto else f"a {spec.source} job (detected from the environment)")
    if not spec.auto and spec.process_id != 0:
        _wait_for_port(spec.coordinator, spec.timeout_s)
    done = threading.Event()
    watchdog = threading.Thread(target=_watchdog, args=(done, spec, what), daemon=True)
    watchdog.start()
    try:
        if spec.auto:
            jax.distributed.initialize(initialization_timeout=spec.timeout_s + JAX_GRACE_S)
        else:
            jax.distributed.initialize(spec.coordinator, spec.num_processes, spec.process_id,
                                       initialization_timeout=spec.timeout_s + JAX_GRACE_S)
    except Exception as err:  # JAX raises for bad arguments or a failed cluster detection
        raise DistributedError(f"could not join {what}: {err}") from err
    finally:
        done.set()
    check_agreement(spec)


def check_agreement(spec: JobSpec) -> None:
    """Every process declared the same count and runs the same devices per host and versions; else DistributedError.

    The versions compared: python, jax, jaxlib, libtpu (when installed) and ponder. A
    difference names both processes and both values.
    """
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    declared = spec.num_processes if spec.num_processes is not None else jax.process_count()
    counts = {"number of processes": declared, "devices per host": jax.local_device_count()}
    versions = installed_versions()
    mine = np.concatenate([np.asarray(list(counts.values()), np.int64)] +
                          [np.frombuffer(v.encode()[:VERSION_BYTES].ljust(VERSION_BYTES), np.uint8).astype(np.int64)
                           for v in versions.values()])
    everyone = np.asarray(multihost_utils.process_allgather(mine))
    if declared != jax.process_count():
        raise DistributedError(f"this process was started with --num-processes {declared} but the job has "
                               f"{jax.process_count()} processes: start every process with the same count")
    for column, name in enumerate(counts):
        values = everyone[:, column]
        if (values != values[0]).any():
            odd = int(np.flatnonzero(values != values[0])[0])
            raise DistributedError(f"the processes of this job disagree on {name}: {int(values[0])} on "
                                   f"process 0, {int(values[odd])} on process {odd}")
    for k, name in enumerate(versions):
        start = len(counts) + k * VERSION_BYTES
        rows = [bytes(row[start:start + VERSION_BYTES].astype(np.uint8)).decode(errors="replace").strip()
                for row in everyone]
        odd = next((i for i, row in enumerate(rows) if row != rows[0]), None)
        if odd is not None:
            raise DistributedError(f"the processes of this job run different {name} versions: {rows[0]} on "
                                   f"process 0, {rows[odd]} on process {odd}: install the same on every host")


VERSION_BYTES = 32  # of each version string compared across processes


def installed_versions() -> dict[str, str]:
    """The versions every process of a job must share: python, jax, jaxlib, libtpu (or `none`), ponder."""
    import platform

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "none"

    return {"python": platform.python_version(), "jax": of("jax"), "jaxlib": of("jaxlib"), "libtpu": of("libtpu"),
            "ponder": ponder_version()}


def check_shared_directory(directory: str | os.PathLike) -> None:
    """Every process sees the same `directory` (process 0 writes a nonce, all read it); else DistributedError.

    A run directory on a path each host resolves to its own disk would split checkpoints
    over the hosts; this catches it at start-up instead of at the first restore.
    """
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from configs.fileio import run_path, write_atomic

    if jax.process_count() == 1:
        return
    draw = np.asarray(np.random.default_rng().integers(1 << 30, dtype=np.int32))
    nonce = int(multihost_utils.broadcast_one_to_all(draw))
    marker = run_path(directory) / f".ponder-hosts-{nonce:x}"
    if jax.process_index() == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, str(nonce))
    multihost_utils.sync_global_devices("ponder: run directory marker written")
    try:
        sees = marker.exists() and marker.read_text() == str(nonce)
    except OSError:
        sees = False
    everyone = np.asarray(multihost_utils.process_allgather(np.asarray([sees])))[:, 0]
    multihost_utils.sync_global_devices("ponder: run directory marker read")
    if jax.process_index() == 0:
        marker.unlink()
    if not everyone.all():
        blind = ", ".join(str(i) for i in np.flatnonzero(~everyone))
        raise DistributedError(
            f"{directory}: process(es) {blind} do not see the file process 0 wrote there, so each host sees its "
            "own local disk: use a directory every host shares, such as gs://BUCKET/run or a shared filesystem"
        )


def host_values(tree):
    """`tree` with every jax.Array leaf as a numpy array of its global value, on every process.

    Reading an array that spans other processes' devices raises; this gathers it instead
    (`process_allgather`, a collective: every process must call it with the same tree). An
    array this process holds whole (one process, or replicated) is read where it is.
    """
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    def read(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(read, tree)


def _watchdog(done: threading.Event, spec: JobSpec, what: str) -> None:
    """Reports and exits (status 2) when joining takes longer than the timeout, before JAX aborts the process."""
    if done.wait(spec.timeout_s):
        return
    count = f"all {spec.num_processes} processes" if spec.num_processes else "every process of the job"
    print(f"ponder: error: could not join {what} within {spec.timeout_s} s. Check that {count} were started, "
          "each with the same --num-processes and its own --process-id, and that the coordinator address "
          f"is reachable from every host ({ENV_TIMEOUT} sets the timeout).", file=sys.stderr, flush=True)
    os._exit(2)


def _wait_for_port(address: str, timeout_s: float) -> None:
    """Waits until the coordinator accepts TCP connections; DistributedError naming it after `timeout_s`."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"the coordinator {address} did not answer within {timeout_s} s ({err}). Check that process 0 "
                    "is running, that the address and port are right, and that this host can reach it."
                ) from None
            time.sleep(0.25)


def _integer(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"the {name} must be an integer, got {value!r}") from None


def ponder_version() -> str:
    """The installed ponder's version as hosts compare it and exports record it ("unknown" if not installed)."""
    try:
        return version("ponder")
    except PackageNotFoundError:
        return "unknown"
