"""Metrics out of a run: TensorBoard event files, metrics.jsonl, and a progress bar with ETA.

Only process 0 writes files; every process may call `write` (the others do nothing).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
from tqdm import tqdm

from configs.fileio import write_atomic


class MetricsWriter:
    """Appends `{"step": s, **metrics}` to run_dir/metrics.jsonl and TensorBoard scalars."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, initial_step: int = 0, show_progress: bool = True):
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tensorboard = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            drop_records_after(run_dir / "metrics.jsonl", initial_step)
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (closed in close())
            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        self._bar = tqdm(
            total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
            disable=not (self.enabled and show_progress),
        )

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Records one set of scalars at `step` (non-finite values are written as null in JSON)."""
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        for name, value in clean.items():
            if value is not None:
                self._tensorboard.add_scalar(name, value, step)

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
            self._jsonl.close()


def drop_records_after(path: Path, step: int) -> None:
    """On resume, forget records of steps past the checkpoint: those steps run again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_atomic(path, "".join(f"{line}\n" for line in kept))
