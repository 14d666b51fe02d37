"""Run-state paths and atomic writes: the one place every layer names and publishes a file.

It lives in configs/ because configs is the one package every other layer (model, tasks,
search, train, tools) may import. `run_path` turns a string into an `etils.epath.Path`, which
also names buckets (`gs://...`, reached through fsspec/gcsfs: the CLI sets EPATH_USE_TF=false).

Local writes go to a temporary name beside their target and are renamed over it only once
complete, so a crash, a full disk or a parallel writer leaves either the old file or the new
one, never half of one. Object storage has no rename and no append, but an object appears
only once its upload completes: `write_atomic` uploads whole text, `atomic_path` stages
locally and uploads at the end, `LineLog` keeps a growing file's lines and rewrites the object,
and `local_copy` brings a stored directory down for readers (TensorFlow) that need a disk.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from etils import epath

REMOTE_SCHEMES = ("gs://", "s3://")


# How ponder reaches object storage, set by entry points (the CLI, the tests) before first use:
# etils.epath goes through fsspec/gcsfs (the client tested here against an emulator), not the
# TensorFlow GCS filesystem it picks when TensorFlow is installed; and gcsfs lists a directory
# afresh every time, since other hosts of a job write to the same run directory (a cached
# listing would miss a step another process committed).
OBJECT_STORAGE_ENV = {"EPATH_USE_TF": "false", "FSSPEC_GS": '{"use_listings_cache": false}'}


def use_object_storage_defaults() -> None:
    """Sets OBJECT_STORAGE_ENV in os.environ where the user has not; call before the first gs:// path."""
    for key, value in OBJECT_STORAGE_ENV.items():
        os.environ.setdefault(key, value)


def run_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: local paths made absolute, `gs://bucket/...` kept as it is."""
    return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(os.fspath(path)))


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names object storage (gs://, s3://) rather than a local disk."""
    return os.fspath(path).startswith(REMOTE_SCHEMES)


def upload_tree(local: str | os.PathLike, target: epath.Path) -> None:
    """Copies every file under the local directory `local` to the same relative path under `target`."""
    for root, _, files in os.walk(local):
        for name in sorted(files):
            source = Path(root) / name
            (target / source.relative_to(local).as_posix()).write_bytes(source.read_bytes())


@contextlib.contextmanager
def local_copy(directory: str | os.PathLike) -> Iterator[Path]:
    """`directory` as a local path: itself on a local disk, a temporary download of it on object storage."""
    if not is_remote(directory):
        yield Path(directory)
        return
    source = epath.Path(directory)
    with tempfile.TemporaryDirectory(prefix="ponder-") as tmp:
        for path in _files_under(source):
            local = Path(tmp) / os.path.relpath(os.fspath(path), os.fspath(source))
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(path.read_bytes())
        yield Path(tmp)


def _files_under(directory: epath.Path) -> Iterator[epath.Path]:
    # not epath's walk() or rglob(): on gs:// one drops the scheme from its paths, the other refuses
    for path in directory.iterdir():
        if path.is_dir():
            yield from _files_under(path)
        else:
            yield path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, directory: bool = False, mode: int | None = None) -> Iterator[Path]:
    """Yields a fresh temporary path beside `target` to be filled; on success it replaces `target`.

    With `directory=True` the temporary path is an empty directory and an existing target
    directory is removed just before the rename. `mode` sets the permissions of the result
    (mkstemp creates 0600 files). On an error the temporary path is removed and `target`
    is left as it was. A `target` on object storage is staged in a local temporary
    directory and uploaded once the block ends (a directory's files one by one, so its
    readers must look for a file written last to know it is complete).
    """
    if is_remote(target):
        with _staged_upload(epath.Path(target), directory) as tmp:
            yield tmp
        return
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}."
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix, suffix=".tmp"))
    else:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        if directory and target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike, encoding: str = "utf-8") -> Iterator[IO[str]]:
    """A text file that appears at `target`, synced to disk, only when the block ends without error."""
    with atomic_path(target) as tmp, open(tmp, "w", encoding=encoding) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_atomic(target: str | os.PathLike, text: str) -> Path | epath.Path:
    """Writes `text` to `target` atomically and returns the target's path."""
    if is_remote(target):
        target = epath.Path(target)
        target.write_text(text)  # an object appears whole once its upload completes
        return target
    with atomic_open(target) as f:
        f.write(text)
    return Path(target)


@contextlib.contextmanager
def _staged_upload(target: epath.Path, directory: bool) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ponder-") as tmp:
        staged = Path(tmp) / target.name
        if directory:
            staged.mkdir()
        yield staged
        if directory:
            if target.exists():
                target.rmtree()
            upload_tree(staged, target)
        else:
            target.write_bytes(staged.read_bytes())


class LineLog:
    """A text file that grows line by line (metrics.jsonl, rollouts.jsonl, results.jsonl); process-local.

    On a local disk each line is appended and flushed as it is written. Object storage cannot
    append, and rewriting an object more than about once a second is throttled, so there
    the lines are kept in memory and the whole object is rewritten when `sync()` is called
    (at checkpoints, at the end) and at most every `upload_every_s` seconds in between.
    `keep(line)` filters the lines already in the file when it is opened (a resumed run
    drops the steps it will run again); `fresh=True` starts the file empty.
    """

    def __init__(self, path: str | os.PathLike, *, keep: Callable[[str], bool] | None = None, fresh: bool = False,
                 upload_every_s: float = 30.0):
        self.path = run_path(path)
        self.remote = is_remote(path)
        self.upload_every_s = upload_every_s
        existed = self.path.exists()
        old = self.path.read_text(encoding="utf-8").splitlines() if existed and not fresh else []
        self._lines = [line for line in old if line.strip() and (keep is None or keep(line))]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh or keep is not None or not existed:
            write_atomic(self.path, "".join(f"{line}\n" for line in self._lines))
        if not self.remote:
            self._lines = []
            self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed in close())
        self._uploaded_at, self._dirty = time.monotonic(), False
        self.uploads = 0  # how many times the object was rewritten (always 0 on a local disk)

    def write(self, line: str) -> None:
        """Adds one line (without its newline)."""
        if not self.remote:
            self._file.write(line + "\n")
            return
        self._lines.append(line)
        self._dirty = True
        if time.monotonic() - self._uploaded_at >= self.upload_every_s:
            self.sync()

    def sync(self) -> None:
        """Makes every line written so far durable (fsync locally, one upload to object storage)."""
        if not self.remote:
            self._file.flush()
            os.fsync(self._file.fileno())
        elif self._dirty:
            self.path.write_text("".join(f"{line}\n" for line in self._lines), encoding="utf-8")
            self._uploaded_at, self._dirty = time.monotonic(), False
            self.uploads += 1

    def close(self) -> None:
        self.sync()
        if not self.remote:
            self._file.close()

