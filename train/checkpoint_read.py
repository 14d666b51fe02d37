"""Reading a checkpoint step back, and telling damage from an error a retry may clear.

    step_dir, value, skipped = newest_readable(step_dirs, check, read)   # {skipped dir: what was wrong}

A step that does not read back because it is damaged (bad JSON, missing or truncated files)
is skipped for the next older one; the caller may set it aside. An error that says nothing
about the files (out of memory, permission denied, EIO, a stale mount) is retried and then
raised as CheckpointError, so a run never rolls back to an older step, and renames nothing,
because of a passing fault.
"""

from __future__ import annotations

import errno
import os
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from train.host_state import DataStateError

T = TypeVar("T")
RETRY_DELAYS = (1.0, 5.0)  # seconds before each new attempt at a step that failed with a transient error
# OS errors a retry (or a restart) may clear: I/O, permissions, memory, busy or stale mounts
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EINTR, errno.ENOMEM, errno.EBUSY, errno.ETIMEDOUT,
                              errno.ESTALE, errno.ENFILE, errno.EMFILE, errno.EACCES, errno.EPERM, errno.ENOLCK,
                              errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN, errno.EHOSTUNREACH})
# the same in tensorstore's and XLA's status messages (`RESOURCE_EXHAUSTED: Out of memory`, ...)
TRANSIENT_STATUSES = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED", "ABORTED")
READ, DAMAGED, TRANSIENT = 0, 1, 2  # how reading a step went, ordered by severity


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or restored; the message says which step and what went wrong."""


def newest_readable(step_dirs: list[Path], check: Callable[[Path], None],
                    read: Callable[[Path], T]) -> tuple[Path, T, dict[Path, str]]:
    """`(step_dir, read(step_dir), {skipped step_dir: what was wrong})` for the newest step every process reads.

    `step_dirs` run oldest first. A damaged step (`check` or `read` raises anything but a
    transient error) is skipped with a warning naming it and the error; nothing is deleted.
    A transient error (`transient`) is retried after each of RETRY_DELAYS, then raised as
    CheckpointError: an older step is never used in its place. Processes agree after each
    attempt, so they never continue from different steps. Orbax's restore ends in a collective
    barrier, so multi-host, damage that only some hosts meet inside orbax's array reads (a
    truncated shard file) stops the run instead; `check` catches what it can before that.
    """
    problems, skipped = [], {}
    for step_dir in reversed(step_dirs):
        for delay in (*RETRY_DELAYS, None):
            result, error, status = _attempt_step(step_dir, check, read)
            if status != TRANSIENT or delay is None:
                break
            warnings.warn(f"reading checkpoint {step_dir} failed, retrying in {delay:g}s: {error}", stacklevel=3)
            time.sleep(delay)
        if status == READ:
            return step_dir, result, skipped
        if status == TRANSIENT:
            raise CheckpointError(
                f"checkpoint {step_dir} could not be read ({len(RETRY_DELAYS) + 1} attempts): {error}. That is an "
                "error a retry may clear (out of memory, permissions, I/O), not damage: nothing was renamed and no "
                "older step was used in its place. Fix the cause and start again.")
        problems.append(f"{step_dir}: {error}")
        skipped[step_dir] = error
        warnings.warn(f"checkpoint {step_dir} is unreadable, trying an older step: {error}", stacklevel=3)
    raise CheckpointError(f"no readable checkpoint in {step_dirs[0].parent}:\n" + "\n".join(f"  {p}" for p in problems))


def _attempt_step(step_dir: Path, check: Callable[[Path], None],
                  read: Callable[[Path], T]) -> tuple[T | None, str | None, int]:
    """`(result, error, status)` of checking then reading one step; every process returns the same status."""
    result = None
    for fn in (check, read):
        result, error, status = _attempt(fn, step_dir)
        worst = status if jax.process_count() == 1 else int(
            np.max(multihost_utils.process_allgather(np.asarray(status, np.int32))))
        if worst != READ:
            kind = "a transient error" if worst == TRANSIENT else "damage"
            return None, error or f"other processes could not read it ({kind}: see their logs)", worst
    return result, None, READ


def _attempt(fn: Callable[[Path], T], step_dir: Path) -> tuple[T | None, str | None, int]:
    """`(fn(step_dir), None, READ)`, or `(None, what went wrong, DAMAGED or TRANSIENT)`.

    DataStateError (other data settings, not damage) propagates.
    """
    try:
        return fn(step_dir), None, READ
    except DataStateError:
        raise
    except Exception as err:  # any other failure to read back: damage, unless it is transient
        reason = transient(err)
        return None, describe(err) + (f" (transient: {reason})" if reason else ""), TRANSIENT if reason else DAMAGED


def describe(err: BaseException) -> str:
    """`Type: first line of the message` (at most 300 characters of it)."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


def transient(err: BaseException | None) -> str | None:
    """Why `err` (or an error it was raised from) is one a retry may clear, or None when it is damage.

    Out of memory (host or device), permission denied and OS errors such as EIO, ESTALE or
    EAGAIN, raised by Python or reported in a tensorstore/XLA status message, are transient;
    anything else that stops a step reading back (bad JSON, missing or truncated files) is not.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, MemoryError):
            return "out of memory"
        if isinstance(err, OSError) and err.errno in TRANSIENT_ERRNOS:
            return os.strerror(err.errno)
        text = str(err)
        codes = [int(code) for code in re.findall(r"os_error_code='?(\d+)", text)]
        if found := [code for code in codes if code in TRANSIENT_ERRNOS]:
            return os.strerror(found[0])
        if found := [name for name in TRANSIENT_STATUSES if name in text]:
            return found[0].lower().replace("_", " ")
        if "out of memory" in text.lower():
            return "out of memory"
        err = err.__cause__ or err.__context__
    return None
