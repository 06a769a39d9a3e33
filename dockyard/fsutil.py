"""Crash-safe file writes shared by the core: a temp file in a directory on the same filesystem,
written, fsynced, renamed over the target, and the directory fsynced, so a reader sees the old
content or the new, never a part; and the sweep of temp files a killed writer left behind."""

from __future__ import annotations

import os
import stat
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

# Name prefix of the temp files stage_file writes (readers of a tree skip these names).
TEMP_PREFIX = ".tmp-"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: str) -> None:
    """fsync a file by name (its data and size)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str,
    data: bytes,
    mode: int = 0o644,
    durable: bool = True,
    tmp_dir: Optional[str] = None,
) -> None:
    """Replace `path` with `data` atomically; `durable` adds the fsyncs (file and directory).
    `tmp_dir` must be on the same filesystem (default: the target's directory)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = stage_file(tmp_dir or directory, data, mode, durable)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(directory)


def stage_file(directory: str, data: bytes, mode: int = 0o644, durable: bool = True) -> str:
    """Write `data` to a new temp file in `directory` (fsynced when `durable`) and return its
    path, for the caller to rename into place; nothing is left behind on failure."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


@dataclass
class TempSweep:
    """What one sweep of a tree for stale temp files did."""

    # temp files this sweep deleted
    removed: int = 0
    # stale temp files still there: (path relative to the root, mtime, why it was not removed)
    left: list[tuple[str, float, str]] = field(default_factory=list)


def sweep_temp_files(root: str, older_than: float, remove: bool = True) -> TempSweep:
    """Delete (or with `remove` false only list) the temp files of stage_file below `root`
    last written more than `older_than` seconds ago: what a writer killed between writing and
    renaming left. A younger one may be a write in progress, of this process or of another one
    sharing the tree, and is never touched; one gone meanwhile was renamed or swept by another
    process. Symbolic links are not followed."""
    result = TempSweep()
    now = time.time()
    for directory, _dirs, files in os.walk(root):
        for name in files:
            if not name.startswith(TEMP_PREFIX):
                continue
            path = os.path.join(directory, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue  # renamed into place (or swept) since the directory was listed
            if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < older_than:
                continue
            relative = os.path.relpath(path, root)
            if not remove:
                result.left.append((relative, info.st_mtime, "not removed"))
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                result.left.append((relative, info.st_mtime, exc.strerror or type(exc).__name__))
                continue
            result.removed += 1
    return result
