"""Running a launch plan (train/launch/pod.py): create, wait, copy, supervise every worker, restart on preemption.

    status = PodJob(spec, "queued", sha).run()

The plan's steps are carried out by phase: `build` once (skipped when the commit's artifact
exists), `file` written, then each attempt: `exists` (a TPU VM that is already READY is
reused), `create`, `wait` (a queued resource polled until ACTIVE; FAILED or SUSPENDED end
the wait), `copy`, and `run`: one supervised process per worker (train.launch.supervisor:
`[slice s worker w]` lines and logs, the job stopped when one worker fails). A job that
ends while its TPUs are preempted (TPU VM `PREEMPTED`, queued resource `SUSPENDED` or
`FAILED`; the trainer itself exits 0 after saving on SIGTERM), or with RESTARTABLE_STATUS,
is deleted, recreated and relaunched, at most
`max_restarts` times; the trainer resumes from the newest checkpoint in the run directory.
An xpk workload is created once and waited for (`await`): xpk itself recreates it after a
preemption, up to max_restarts times. `delete` runs at the end. A summary says attempts,
preemptions, wall time and last step.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from configs.fileio import run_path
from configs.launch_spec import LaunchSpec
from train.launch.pod import PLANS, Step, artifact, delete_step
from train.launch.supervisor import Supervisor, Worker

RESTARTABLE_STATUS = 75  # EX_TEMPFAIL: a worker that says its job may simply be run again
PREEMPTED_STATES = {"PREEMPTED", "SUSPENDED", "FAILED", "TERMINATED"}
WAIT_STATES = {"WAITING_FOR_RESOURCES", "PROVISIONING", "ACCEPTED", "CREATING", "SUSPENDING"}


class PodJobError(RuntimeError):
    """A launch step that failed outright (not a preemption); the message names the command."""


class PodJob:
    """One launch of `spec` on `backend` from commit `sha`; `run()` returns the job's exit status."""

    def __init__(self, spec: LaunchSpec, backend: str, sha: str, *, root: str | Path = ".", out: IO[str] | None = None,
                 poll_s: float = 30.0, wait_timeout_s: float = 24 * 3600.0):
        self.spec, self.backend, self.sha, self.root = spec, backend, sha, Path(root)
        self.plan = PLANS[backend](spec, sha)
        self.out = out if out is not None else sys.stdout
        self.poll_s, self.wait_timeout_s = poll_s, wait_timeout_s
        self.attempts = self.preemptions = 0

    def _steps(self, phase: str) -> list[Step]:
        return [step for step in self.plan if step.phase == phase]

    def say(self, text: str) -> None:
        self.out.write(f"[launch] {text}\n")
        self.out.flush()

    def _call(self, step: Step, *, check: bool = True) -> subprocess.CompletedProcess:
        self.say(f"{step.what}: {' '.join(step.argv)}")
        done = subprocess.run(step.argv, cwd=self.root, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise PodJobError(f"`{' '.join(step.argv)}` failed with status {done.returncode}: "
                              f"{(done.stderr or done.stdout).strip()[-2000:]}")
        return done

    def run(self) -> int:
        start = time.monotonic()
        status = 1
        try:
            self._prepare()
            while True:
                self.attempts += 1
                self._provision()
                for step in self._steps("copy"):
                    self._call(step)
                status = self._supervise()
                # a preempted worker's trainer saves and exits 0 on SIGTERM: the TPUs' state says what happened
                state = self._state()
                preempted = status == RESTARTABLE_STATUS or state in PREEMPTED_STATES
                if not preempted and status == 0:
                    break
                if not preempted:
                    self.say(f"the job failed with status {status} (TPU state {state or 'unknown'}): not restarting")
                    break
                self.preemptions += 1
                if self.preemptions > self.spec.max_restarts:
                    self.say(f"preempted (TPU state {state or 'unknown'}, status {status}), and max_restarts="
                             f"{self.spec.max_restarts} restarts are spent: stopping")
                    status = status or RESTARTABLE_STATUS  # the job did not finish: run it again later
                    break
                self.say(f"preempted (TPU state {state or 'unknown'}, status {status}): recreating the TPUs, "
                         f"restart {self.preemptions} of {self.spec.max_restarts}")
                self._call(delete_step(self.spec, self.backend), check=False)
        except PodJobError as err:
            self.say(f"error: {err}")
            status = 2
        finally:
            for step in self._steps("delete"):  # the plan holds one when delete_at_end (or its default) says so
                self._call(step, check=False)
            self.say(f"summary: {self.attempts} attempt(s), {self.preemptions} preemption(s), "
                     f"{time.monotonic() - start:.0f} s, last checkpoint step {self._last_step()}, "
                     f"exit status {status}")
        return status

    def _prepare(self) -> None:
        """Builds the commit's code unless it is already built, and writes the generated files."""
        for step in self._steps("build"):
            built = self.root / artifact(self.spec, self.sha)
            if built.exists():
                self.say(f"reusing {artifact(self.spec, self.sha)} (commit {self.sha})")
                continue
            built.parent.mkdir(parents=True, exist_ok=True)
            self._call(step)
        for step in self._steps("file"):
            path, text = step.file
            (self.root / path).parent.mkdir(parents=True, exist_ok=True)
            (self.root / path).write_text(text)
            (self.root / path).chmod(0o755)

    def _provision(self) -> None:
        """Creates the TPUs (a READY TPU VM is reused) and waits until a queued resource is ACTIVE."""
        exists = self._steps("exists")
        if exists and self._call(exists[0], check=False).stdout.strip() == "READY":
            self.say(f"{self.spec.name} exists and is READY: reusing it")
        else:
            for step in self._steps("create"):
                self._call(step)
        for step in self._steps("wait"):
            deadline = time.monotonic() + self.wait_timeout_s
            while True:
                state = self._call(step).stdout.strip()
                if state == "ACTIVE":
                    break
                if state in PREEMPTED_STATES:
                    raise PodJobError(f"queued resource {self.spec.name} is {state} while waiting for it")
                if time.monotonic() > deadline:
                    raise PodJobError(f"queued resource {self.spec.name} still {state} after {self.wait_timeout_s} s")
                time.sleep(self.poll_s)

    def _supervise(self) -> int:
        """Runs every worker's command as one supervised job; its exit status."""
        runs = self._steps("run")
        workers = [Worker(i, step.argv, dict(os.environ), label=f"slice {step.worker[0]} worker {step.worker[1]}")
                   for i, step in enumerate(runs)]
        if not workers:  # xpk: the workload runs in the cluster, and its waiting command tells how it ended
            for step in self._steps("await"):
                done = self._call(step, check=False)
                self.out.write(done.stdout)
                return done.returncode
            return 0
        log_dir = run_path(self.spec.run_dir) / "logs" if self.spec.run_dir else None
        self.say(f"attempt {self.attempts}: {len(workers)} worker(s)")
        return Supervisor(workers, log_dir=log_dir, out=self.out).run()

    def _state(self) -> str | None:
        """The TPUs' state now (READY, PREEMPTED, ACTIVE, SUSPENDED, ...), or None when it cannot be read."""
        for phase in ("exists", "wait"):
            for step in self._steps(phase):
                done = self._call(step, check=False)
                return done.stdout.strip() if done.returncode == 0 else None
        return None

    def _last_step(self) -> int | None:
        if not self.spec.run_dir:
            return None
        try:
            checkpoints = run_path(self.spec.run_dir) / "checkpoints"
            steps = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()] if checkpoints.exists() else []
        except OSError:
            return None
        return max(steps, default=None)
