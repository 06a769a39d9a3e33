"""Crash-safe file writes shared by the core: a temp file in a directory on the same filesystem,
written, fsynced, renamed over the target, and the directory fsynced, so a reader sees the old
content or the new, never a part."""

from __future__ import annotations

import os
import tempfile
from typing import Optional


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
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
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
