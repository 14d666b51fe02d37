"""Metrics out of a run: TensorBoard event files, metrics.jsonl, and a progress bar with ETA.

Only process 0 writes files; every process may call `write` (the others do nothing).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import jax
from tqdm import tqdm

from configs.fileio import LineLog, is_remote, run_path, upload_tree


class MetricsWriter:
    """Appends `{"step": s, **metrics}` to run_dir/metrics.jsonl and TensorBoard scalars.

    With the run directory on object storage the event files are written to a local temporary
    directory and uploaded, with metrics.jsonl, at every `sync()` (the trainers call it once a
    checkpoint save starts, so no logged step older than a checkpoint is lost) and at most
    every `LineLog.upload_every_s` seconds in between.
    """

    def __init__(self, run_dir: str | Path, *, total_steps: int, initial_step: int = 0, show_progress: bool = True):
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tensorboard = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._jsonl = LineLog(run_path(run_dir) / "metrics.jsonl", keep=lambda line: step_of(line) <= initial_step)
            self._events = run_path(run_dir) / "tensorboard"
            self._staging = tempfile.TemporaryDirectory(prefix="ponder-tensorboard-") if is_remote(run_dir) else None
            self._tensorboard = SummaryWriter(self._staging.name if self._staging else str(self._events))
        self._bar = tqdm(
            total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
            disable=not (self.enabled and show_progress),
        )

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Records one set of scalars at `step` (non-finite values are written as null in JSON)."""
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        for name, value in clean.items():
            if value is not None:
                self._tensorboard.add_scalar(name, value, step)
        uploads = self._jsonl.uploads
        self._jsonl.write(json.dumps({"step": step, **clean}))
        if self._jsonl.uploads != uploads:  # metrics.jsonl went up: the events go with it
            self._upload_events()

    def sync(self) -> None:
        """Makes everything written so far durable in the run directory."""
        if self.enabled:
            self._jsonl.sync()
            self._upload_events()

    def _upload_events(self) -> None:
        self._tensorboard.flush()
        if self._staging is not None:
            upload_tree(self._staging.name, self._events)

    def progress(self, step: int, summary: dict[str, float]) -> None:
        """Moves the bar to `step` and shows a few headline numbers."""
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in summary.items()}, refresh=False)

    def message(self, text: str) -> None:
        """A line above the progress bar (process 0 only)."""
        if self.enabled:
            self._bar.write(text)

    def close(self) -> None:
        self._bar.close()
        if self.enabled:
            self._tensorboard.close()
            self._upload_events()
            self._jsonl.close()
            if self._staging is not None:
                self._staging.cleanup()


def step_of(line: str) -> int:
    """The step of one JSON-lines record (metrics.jsonl, rollouts.jsonl)."""
    return json.loads(line)["step"]
