"""Run-state paths and atomic writes: the one place every layer names and publishes a file.

It lives in configs/ because configs is the one package every other layer (model, tasks,
search, train, tools) may import. `run_path` turns a string into an `etils.epath.Path`, which
also names buckets (`gs://...`); run state on a bucket is not written yet. A write goes to a
temporary name beside its target and is renamed over it only once complete, so a crash, a
full disk or a parallel writer leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from etils import epath

REMOTE_SCHEMES = ("gs://", "s3://")


def run_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: local paths made absolute, `gs://bucket/...` kept as it is."""
    return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(os.fspath(path)))


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names object storage (gs://, s3://) rather than a local disk."""
    return os.fspath(path).startswith(REMOTE_SCHEMES)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, directory: bool = False, mode: int | None = None) -> Iterator[Path]:
    """Yields a fresh temporary path beside `target` to be filled; on success it replaces `target`.

    With `directory=True` the temporary path is an empty directory and an existing target
    directory is removed just before the rename. `mode` sets the permissions of the result
    (mkstemp creates 0600 files). On an error the temporary path is removed and `target`
    is left as it was.
    """
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


def write_atomic(target: str | os.PathLike, text: str) -> Path:
    """Writes `text` to `target` atomically and returns the target's path."""
    with atomic_open(target) as f:
        f.write(text)
    return Path(target)

