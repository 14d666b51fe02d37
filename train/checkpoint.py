"""Orbax checkpoints of a run: train state, data position and resolved config per step; async, keep-N, atomic.

    ckpt = Checkpoints(run_dir / "checkpoints", save_every=100, keep=3)
    step, state = ckpt.restore(layout.abstract, data=pipeline)   # newest step that reads back
    ckpt.save(step, state, data=pipeline, config=cfg)             # only every `save_every` steps
    ckpt.save(step, state, data=pipeline, config=cfg, force=True) # final step, preemption
    ckpt.close()

In a directory every host sees (a shared filesystem or a bucket, `gs://...`):
`directory/<step>/{state/, config/metadata, data/shard-I-of-N/, _CHECKPOINT_METADATA}`.
A step is written as `<step>.orbax-checkpoint-tmp*` and renamed once every item of every
process has committed (on a bucket: written as `<step>/`, then marked with COMMIT_FILE), so a
run killed mid-save leaves a step that is never listed; earlier steps are untouched, and
opening the directory again removes the unfinished one.

Failures say which step and what kind: a save that fails (in the background, too) raises
CheckpointError naming its step at the next `save` or `wait`; a step that does not read back
because it is damaged is skipped for an older one (and set aside as `<step>.corrupt` at the
next save), while an error a retry may clear (out of memory, permission, I/O) is retried and
then raised, renaming nothing, rather than rolling the run back to an older step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from configs.fileio import is_remote, run_path
from configs.schema import Config
from train.checkpoint_read import CheckpointError, describe, newest_readable
from train.data.shards import HostShards

METADATA_FILE = "_CHECKPOINT_METADATA"
COMMIT_FILE = "commit_success.txt"  # what orbax writes last into a step on object storage
# what orbax names a step while it is being written (`<step>.orbax-checkpoint-tmp`, maybe `-<timestamp>`)
UNFINISHED_STEP = re.compile(rf"^\d+{re.escape(ocp.utils.TMP_DIR_SUFFIX)}(-\d+)?$")


class DataHandler(ocp.CheckpointHandler):
    """The data item: the data position, one `shard-I-of-N` subdirectory per data shard (train.data.shards).

    Synchronous on purpose: orbax runs non-async handlers to completion inside `save()`, so
    the tf.data iterator is captured at the step being saved, not later in a background
    thread. Multi-host: orbax creates the (temporary) item directory on the primary host and
    signals the other processes before any handler runs; every process then writes only its
    own shards' subdirectories and removes nothing else, and the primary renames the step
    once all processes have committed. As for orbax's array writes, `directory` must be on a
    filesystem every host sees.
    `Checkpoints.restore` calls `restore` itself, host-locally after orbax's collective part.
    """

    def save(self, directory: epath.Path, args: DataSave) -> None:
        args.pipeline.save(directory)

    def restore(self, directory: epath.Path, args: DataRestore) -> int:
        args.pipeline.check(directory)
        args.pipeline.restore(directory)
        return args.pipeline.batches_read


@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    """Saves `pipeline`'s position (this process's shards) as the `data` item."""

    pipeline: HostShards


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    """Moves `pipeline` to the saved position: its next batch is the one after the saved step."""

    pipeline: HostShards


class Checkpoints:
    """A run's checkpoint directory: saves every `save_every` steps, keeps the newest `keep`.

    Opening it removes the tmp dirs of saves that never finished, so one run at a time may
    open a directory (another process's save in progress would be removed).
    """

    def __init__(self, directory: str | Path, *, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every ({save_every}) and keep ({keep}) must be at least 1")
        self.directory = run_path(directory)
        self.save_every = save_every
        self._corrupted: dict[int, str] = {}  # steps a restore had to skip, with what was wrong
        self._pending: int | None = None  # the step whose save may still be running
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._remove_unfinished_saves()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(stopping_on=exc)

    def save(self, step: int, state: Any, *, data: HostShards | None = None, config: Config | None = None,
             force: bool = False) -> bool:
        """Starts saving `state` (a pytree of jax.Arrays, possibly sharded), the data position and config.

        Skipped unless `step % save_every == 0` or `force`; also skipped (with a warning) when a
        newer step is already saved. Returns whether a save started; `wait()` blocks until it is
        committed. Steps a restore found corrupted are first renamed to `<step>.corrupt`
        (never deleted), so a resumed run can write those step numbers again. Every call first
        checks the previous save if it has finished: one that failed raises CheckpointError
        naming its step (chained to orbax's error), at the first call after it failed.
        """
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self.wait()  # it has finished: only collects its outcome
        if not force and step % self.save_every:
            return False
        self.wait()  # orbax would wait for the previous save too; this way its failure names its step
        self._set_aside_corrupted()
        latest = self.latest_step()
        if latest is not None and step <= latest:
            if step < latest:
                warnings.warn(f"not saving step {step}: {self.directory} already holds step {latest}", stacklevel=2)
            return False
        items: dict[str, ocp.args.CheckpointArgs] = {"state": ocp.args.StandardSave(state)}
        if config is not None:
            items["config"] = ocp.args.JsonSave(config.model_dump(mode="json"))
        if data is not None:
            items["data"] = DataSave(data)
        try:
            started = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as err:
            raise self._save_failed(step, err) from err
        self._pending = step if started else None
        return started

    def wait(self) -> None:
        """Blocks until every started save is committed; CheckpointError (naming the step) if it failed."""
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            raise self._save_failed(step, err) from err

    def _save_failed(self, step: int | None, err: Exception) -> CheckpointError:
        return CheckpointError(
            f"saving step {step if step is not None else '(unknown)'} to {self.directory} failed: "
            f"{describe(err)}. Steps {self.all_steps()} are complete; the unfinished step's files are removed "
            "when this directory is next opened.")

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every committed step, oldest first."""
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state: Any, *, data: HostShards | None = None,
                step: int | None = None) -> tuple[int, Any]:
        """Restores `(step, state)`, each array onto the sharding its ShapeDtypeStruct carries.

        The mesh may differ from the one saved with (shape, device count). Tries `step` (default:
        the newest), then each older step, warning about every one that fails to read back; with
        `data`, the pipeline position comes from the same step as the state. Raises CheckpointError
        when none reads back, and the pipeline's DataStateError (no fallback: not damage) when the
        position was saved with other data settings or another number of data shards.
        """
        self.wait()
        steps = [s for s in self.all_steps() if step is None or s <= step]
        if not steps or (step is not None and step not in steps):
            raise CheckpointError(f"{self.directory}: no step {step or ''} to restore (have {self.all_steps()})")

        def check(step_dir: Path) -> None:
            _check_state(step_dir)
            if data is not None:
                data.check(step_dir / "data")

        def read(step_dir: Path) -> Any:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            state = self._manager.restore(int(step_dir.name), args=args).state
            if data is not None:  # host-local, after orbax's closing barrier: see newest_readable
                DataHandler().restore(step_dir / "data", DataRestore(data))
            return state

        found, state, skipped = newest_readable([self.directory / str(s) for s in steps], check, read)
        self._corrupted = {s: why for s, why in self._corrupted.items() if s != int(found.name)}
        self._corrupted |= {int(d.name): why for d, why in skipped.items()}
        return int(found.name), state

    def restore_config(self, step: int | None = None) -> dict:
        """The resolved config saved with `step` (default: the newest), as a JSON dict."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoints")
        self.wait()
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def close(self, *, stopping_on: BaseException | None = None) -> None:
        """Waits for the pending save, then releases orbax's resources (also when that save failed).

        A failed save raises CheckpointError, unless the run is already stopping on another
        error (`stopping_on`): then the failure is a warning, so the error that stopped the run
        is the one that propagates. `with Checkpoints(...)` closes this way on exit.
        """
        try:
            self.wait()
        except CheckpointError as err:
            if stopping_on is None:
                raise
            warnings.warn(f"{err} (while stopping on {type(stopping_on).__name__}: {stopping_on})", stacklevel=2)
        finally:
            self._manager.close()

    def _remove_unfinished_saves(self) -> None:
        """Removes the steps whose save never finished (a crash mid-save), and nothing else.

        On a disk those are orbax's tmp dirs; on object storage, which has no rename, orbax
        writes `<step>/` in place and marks it finished with COMMIT_FILE last.
        """
        if jax.process_index() == 0:
            remote = is_remote(self.directory)
            # a bucket has no empty directories: `checkpoints/` exists once a step is written
            for path in sorted(self.directory.iterdir()) if self.directory.exists() else []:
                unfinished = UNFINISHED_STEP.match(path.name) or (
                    remote and path.name.isdigit() and not (path / COMMIT_FILE).exists())
                if unfinished and path.is_dir() and not os.path.islink(path):
                    path.rmtree()
                    warnings.warn(f"removed {path}: a save that never finished (the run stopped mid-save)",
                                  stacklevel=3)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("ponder_checkpoints_remove_unfinished")

    def _set_aside_corrupted(self) -> None:
        """Renames steps a restore skipped to `<step>.corrupt[-n]`, which orbax does not list as steps."""
        if not self._corrupted:
            return
        if jax.process_index() == 0:
            for step, problem in sorted(self._corrupted.items()):
                source = self.directory / str(step)
                target, n = self.directory / f"{step}.corrupt", 1
                while target.exists():
                    target, n = self.directory / f"{step}.corrupt-{n}", n + 1
                if source.exists():
                    source.rename(target)
                    warnings.warn(f"moved unreadable checkpoint {source} to {target} ({problem})", stacklevel=3)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("ponder_checkpoints_set_aside")
        self._corrupted.clear()
        self._manager.reload()


def find_run_config(checkpoint: Path | epath.Path) -> Path | epath.Path | None:
    """config.yaml of the run a checkpoint path belongs to (run dir, run/checkpoints or run/checkpoints/<step>)."""
    for directory in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (directory / "config.yaml").is_file():
            return directory / "config.yaml"
    return None


def load_params(path: str | Path, abstract_params: Any, *, allow_missing: bool = False) -> Any:
    """The params of a saved train state (see `read_params`, which also says which step was read)."""
    return read_params(path, abstract_params, allow_missing=allow_missing)[1]


def read_params(path: str | Path, abstract_params: Any, *, allow_missing: bool = False) -> tuple[Path, Any]:
    """(step dir read, params) of a saved train state, onto the shardings in `abstract_params` (for `init_from`).

    `path` is a run directory, its `checkpoints/` (the newest readable step is used) or one
    step directory. A partial restore (`PyTreeRestore(partial_restore=True)`): only the arrays under
    `state["params"]` are read; the optimizer state stays on disk, and so do saved params that
    `abstract_params` lacks (a policy's LM head is read into a reward model). Params that
    `abstract_params` has and the checkpoint lacks (a fresh value head) raise CheckpointError,
    unless `allow_missing`: then they come back as their ShapeDtypeStructs, for `init_state` to fill.
    """
    path, step_dirs = _step_dirs(path)
    item = {"params": abstract_params}
    restore_args = {"params": ocp.checkpoint_utils.construct_restore_args(abstract_params)}
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)

    def read(step_dir: Path) -> Any:
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(step_dir / "state", args=args)["params"]

    step_dir, params, _ = newest_readable(step_dirs, _check_state, read)
    missing = missing_params(params)
    if missing and not allow_missing:
        raise CheckpointError(f"{path}: the checkpoint has no {', '.join(missing)} (a different model config?)")
    return step_dir, params


def saved_param_shapes(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{dotted name: (shape, dtype)} of the params saved in the newest step `load_params(path, ...)` would
    look at first, from its metadata alone (nothing is read), to name what does not fit before restoring."""
    path, step_dirs = _step_dirs(path)
    with ocp.PyTreeCheckpointer() as checkpointer:
        saved = checkpointer.metadata(step_dirs[-1] / "state").item_metadata["params"]
    return {jax.tree_util.keystr(key, simple=True, separator="."): (tuple(leaf.shape), str(leaf.dtype))
            for key, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}


def _step_dirs(path: str | Path) -> tuple[Path, list[Path]]:
    """(the directory of steps, its step directories oldest first) of a run dir, checkpoints/ or one step dir."""
    path = run_path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / "checkpoints").is_dir():  # a run directory
        path = path / "checkpoints"
    if (path / "state").is_dir():
        step_dirs = [path]
    else:
        step_dirs = sorted((p for p in path.iterdir() if p.name.isdigit() and p.is_dir()), key=lambda p: int(p.name))
    if not step_dirs:
        raise CheckpointError(f"{path}: neither a checkpoint step (no state/) nor a directory of steps")
    return path, step_dirs


def missing_params(params: Any) -> list[str]:
    """Dotted names of the leaves of `params` that are still ShapeDtypeStructs (not read from a checkpoint)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [jax.tree_util.keystr(path, simple=True, separator=".") for path, leaf in flat
            if isinstance(leaf, jax.ShapeDtypeStruct)]


def _check_state(step_dir: Path) -> None:
    """Host-local checks of a step's own and its state's metadata (JSON both)."""
    json.loads((step_dir / METADATA_FILE).read_text())
    json.loads((step_dir / "state" / "_METADATA").read_text())
