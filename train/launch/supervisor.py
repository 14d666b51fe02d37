"""Supervising the processes of one job: prefixed output, per-host logs, shared fate, forwarded signals.

    workers = [Worker(i, argv, env) for i in range(hosts)]
    status = Supervisor(workers, log_dir=run_dir / "logs").run()

`ponder launch local` starts its hosts as local processes; the TPU pod backends start theirs
over ssh or a cluster client. Only `start` (Worker -> a running process with a readable
stdout) differs between them, so it is a parameter. The rest is the same everywhere: each
line a host prints is shown as `[host i] ...` and appended to `log_dir/host-i.log` (on a bucket:
at the end of the job, since objects cannot be appended to); SIGTERM
and SIGINT to the supervisor reach every host; when one host fails the others are stopped
(a JAX job cannot go on without one of its processes); the job's exit status is that of
the host that failed first (the ones stopped because of it do not count), else the worst of
its hosts'.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from configs.fileio import is_remote, run_path, write_atomic

STOP_GRACE_S = 60.0  # how long hosts stopped by the supervisor get to save and exit before SIGKILL


@dataclasses.dataclass(frozen=True)
class Worker:
    """One process of the job: its index, command line and full environment."""

    index: int
    argv: tuple[str, ...]
    env: dict[str, str]
    label: str | None = None  # how its lines and log are named (default `host i`; a pod: `slice s worker w`)

    @property
    def name(self) -> str:
        return self.label or f"host {self.index}"


def start_local(worker: Worker) -> subprocess.Popen:
    """Starts `worker` on this machine in its own process group, stdout and stderr merged into one pipe."""
    return subprocess.Popen(list(worker.argv), env=worker.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def exit_status(returncode: int) -> int:
    """A process's status as a shell reports it: 128 + N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """Runs the workers to the end as one job; `run()` returns the job's exit status (see the module docstring)."""

    def __init__(self, workers: list[Worker], *, start: Callable[[Worker], subprocess.Popen] = start_local,
                 log_dir: str | os.PathLike | None = None, out: IO[str] | None = None,
                 stop_grace_s: float = STOP_GRACE_S):
        self.workers, self.start, self.stop_grace_s = workers, start, stop_grace_s
        # logs for a bucket (gs://RUN/logs) are written locally, then appended to the bucket's copies at the end
        self.log_upload = run_path(log_dir) if log_dir is not None and is_remote(log_dir) else None
        self._log_staging = tempfile.TemporaryDirectory(prefix="ponder-logs-") if self.log_upload else None
        self.log_dir = Path(self._log_staging.name if self._log_staging else log_dir) if log_dir is not None else None
        self.out = out if out is not None else sys.stdout
        self.processes: list[subprocess.Popen] = []
        self.statuses: dict[int, int] = {}
        self.stopping: str | None = None  # why the supervisor is stopping the job, once it is
        self.failure: int | None = None  # the status of the host that failed first, unless a signal stopped the job
        self._lock = threading.Lock()
        self._signals = 0

    def run(self) -> int:
        """Starts every worker, relays their output, stops the job when one fails; the worst exit status."""
        previous = self._install_signal_handlers()
        readers = []
        try:
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
            for worker in self.workers:
                process = self.start(worker)
                self.processes.append(process)
                reader = threading.Thread(target=self._relay, args=(worker, process), daemon=True)
                reader.start()
                readers.append(reader)
            self._wait()
        finally:
            self._kill_all(signal.SIGKILL)  # nothing outlives the supervisor, whatever stopped it
            for reader in readers:
                reader.join(timeout=5)
            self._restore_signal_handlers(previous)
            if self.log_upload is not None:
                self._upload_logs()
        return self.failure if self.failure is not None else max(self.statuses.values(), default=1)

    def _wait(self) -> None:
        """Polls until every process has exited; the first failure stops the rest."""
        deadline = None
        while len(self.statuses) < len(self.processes):
            for worker, process in zip(self.workers, self.processes, strict=True):
                if worker.index in self.statuses or process.poll() is None:
                    continue
                status = self.statuses[worker.index] = exit_status(process.returncode)
                if status != 0 and self.stopping is None:
                    self.failure = status
                    self._stop(f"{worker.name} exited with status {status}; stopping the other hosts")
            if self.stopping is not None and deadline is None:
                deadline = time.monotonic() + self.stop_grace_s
            if deadline is not None and time.monotonic() > deadline:
                self._say(f"hosts still running {self.stop_grace_s:.0f} s after SIGTERM: killing them")
                self._kill_all(signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.05)

    def _stop(self, reason: str, sig: int = signal.SIGTERM) -> None:
        self.stopping = reason
        self._say(reason)
        self._kill_all(sig)

    def _kill_all(self, sig: int) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def _relay(self, worker: Worker, process: subprocess.Popen) -> None:
        """Copies the worker's output line by line to `out` (prefixed) and to its log file."""
        log_file = self.log_dir / f"{worker.name.replace(' ', '-')}.log" if self.log_dir else None
        log = open(log_file, "a", encoding="utf-8") if log_file else None  # noqa: SIM115 (closed below)
        try:
            for raw in iter(process.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                if not line.endswith("\n"):
                    line += "\n"
                with self._lock:
                    self.out.write(f"[{worker.name}] {line}")
                    self.out.flush()
                if log is not None:
                    log.write(line)
                    log.flush()
        finally:
            process.stdout.close()
            if log is not None:
                log.close()

    def _upload_logs(self) -> None:
        """Appends each host's log of this job to its copy in the bucket (object storage cannot append)."""
        try:
            for log in sorted(self.log_dir.glob("*.log")):
                target = self.log_upload / log.name
                earlier = target.read_text(encoding="utf-8") if target.exists() else ""
                write_atomic(target, earlier + log.read_text(encoding="utf-8"))
        except OSError as err:
            self._say(f"could not upload the hosts' logs to {self.log_upload}: {err}")
        finally:
            self._log_staging.cleanup()

    def _say(self, message: str) -> None:
        with self._lock:
            self.out.write(f"[launch] {message}\n")
            self.out.flush()

    def _on_signal(self, signum: int, _frame) -> None:
        """The first SIGTERM/SIGINT is passed on to every host (they save and exit); a second kills them."""
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            self._stop(f"{name} received: passing it to every host", signum)
        else:
            self._stop(f"{name} received again: killing every host", signal.SIGKILL)

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
