"""An in-memory storage driver with the filesystem driver's semantics (files in directories that
outlive their last file, appending writers that hold a lock and follow a file that is moved,
modification times of files and directories, shared and exclusive locks), so the one driver
conformance suite runs on both and the stores and the garbage collector can be tested without a
disk. Its clock is injectable, which lets tests age files."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from dockyard.fsutil import TempSweep
from dockyard.registry.driver import FileInfo, FileWriter, check_path
from dockyard.registry.errors import PathLocked, PathNotFound


@dataclass(eq=False)
class _File:
    """A file's bytes (an inode: a writer holding one follows it through a move)."""

    data: bytearray
    mtime: float
    locked: bool = False


@dataclass(eq=False)
class _RWLock:
    cond: threading.Condition = field(default_factory=threading.Condition)
    readers: int = 0
    writer: bool = False


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


class _MemWriter:
    def __init__(self, driver: MemoryDriver, file: _File) -> None:
        self._driver = driver
        self._file = file
        self._closed = False

    @property
    def size(self) -> int:
        return len(self._file.data)

    def write(self, data: bytes) -> int:
        with self._driver.mutex:
            self._file.data += data
            self._file.mtime = self._driver.clock()
        return len(data)

    def truncate(self, size: int) -> None:
        with self._driver.mutex:
            del self._file.data[size:]

    def commit(self) -> None:
        pass  # nothing to make durable

    def cancel(self) -> None:
        self.close()
        self._driver.forget(self._file)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with self._driver.mutex:
                self._file.locked = False


class MemoryDriver:
    """Keeps everything in dictionaries: files by path, directories by path (with their
    modification time, which changes when an entry is added or removed)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.mutex = threading.RLock()
        self._files: dict[str, _File] = {}
        self._dirs: dict[str, float] = {"": clock()}
        self._locks: dict[str, _RWLock] = {}

    # ---- bookkeeping (callers hold self.mutex) -------------------------------------------
    def _make_parents(self, path: str) -> None:
        now = self.clock()
        parent = _parent(path)
        missing = []
        while parent not in self._dirs:
            if parent in self._files:
                raise PathNotFound(path)  # a file where a directory should be
            missing.append(parent)
            parent = _parent(parent)
        for directory in reversed(missing):
            self._dirs[directory] = now
            self._dirs[_parent(directory)] = now

    def _place(self, path: str, file: _File) -> None:
        if path in self._dirs:
            raise PathNotFound(path)  # a directory is there
        self._make_parents(path)
        if path not in self._files:
            self._dirs[_parent(path)] = self.clock()
        self._files[path] = file

    def _below(self, path: str) -> list[str]:
        prefix = f"{path}/" if path else ""
        return [f for f in self._files if f.startswith(prefix)]

    def forget(self, file: _File) -> None:
        """Remove `file` wherever it is now (a cancelled writer's)."""
        with self.mutex:
            for path, entry in list(self._files.items()):
                if entry is file:
                    del self._files[path]
                    self._dirs[_parent(path)] = self.clock()

    # ---- the driver interface --------------------------------------------------------------
    def get_content(self, path: str) -> bytes:
        path = check_path(path)
        with self.mutex:
            file = self._files.get(path)
            if file is None:
                raise PathNotFound(path)
            return bytes(file.data)

    def put_content(self, path: str, data: bytes, durable: bool = True) -> None:
        path = check_path(path)
        with self.mutex:
            self._place(path, _File(bytearray(data), self.clock()))

    def reader(self, path: str, offset: int = 0) -> BinaryIO:
        stream = io.BytesIO(self.get_content(path))
        stream.seek(offset)
        return stream

    def writer(self, path: str, append: bool = False) -> FileWriter:
        path = check_path(path)
        with self.mutex:
            if not append:
                file = _File(bytearray(), self.clock(), locked=False)
                self._place(path, file)
                return _MemWriter(self, file)
            existing = self._files.get(path)
            if existing is None:
                raise PathNotFound(path)
            if existing.locked:
                raise PathLocked(path)
            existing.locked = True
            return _MemWriter(self, existing)

    def stat(self, path: str) -> FileInfo:
        path = check_path(path)
        with self.mutex:
            file = self._files.get(path)
            if file is not None:
                return FileInfo(path, len(file.data), file.mtime, False)
            if path in self._dirs:
                return FileInfo(path, 0, self._dirs[path], True)
        raise PathNotFound(path)

    def probe(self) -> None:
        self.list("")

    def list(self, path: str) -> list[str]:
        path = check_path(path)
        prefix = f"{path}/" if path else ""
        with self.mutex:
            if path not in self._dirs:
                raise PathNotFound(path)
            children = {
                entry[: len(prefix) + entry[len(prefix) :].index("/")]
                if "/" in entry[len(prefix) :]
                else entry
                for entry in (*self._files, *self._dirs)
                if entry.startswith(prefix) and entry != path
            }
        return sorted(children)

    def move_then_put(self, source: str, dest: str, path: str, data: bytes) -> None:
        source, dest = check_path(source), check_path(dest)
        with self.mutex:
            file = self._files.get(source)
            if file is None:
                raise PathNotFound(source)
            self._place(dest, file)
            del self._files[source]
            self._dirs[_parent(source)] = self.clock()
            self.put_content(path, data)

    def delete(self, path: str) -> None:
        path = check_path(path)
        with self.mutex:
            if path in self._files:
                del self._files[path]
            elif path in self._dirs and path != "":
                for entry in self._below(path):
                    del self._files[entry]
                for directory in [d for d in self._dirs if d.startswith(f"{path}/")]:
                    del self._dirs[directory]
                del self._dirs[path]
            else:
                raise PathNotFound(path)
            self._dirs[_parent(path)] = self.clock()

    def walk(self, path: str) -> Iterator[FileInfo]:
        path = check_path(path)
        with self.mutex:
            if path not in self._dirs:
                raise PathNotFound(path)
            found = [
                FileInfo(entry, len(self._files[entry].data), self._files[entry].mtime, False)
                for entry in self._below(path)
            ]
        yield from sorted(found, key=lambda info: info.path.split("/"))

    @contextmanager
    def lock(self, path: str, exclusive: bool) -> Iterator[None]:
        path = check_path(path)
        with self.mutex:
            lock = self._locks.setdefault(path, _RWLock())
        with lock.cond:
            lock.cond.wait_for(lambda: not lock.writer and (not exclusive or lock.readers == 0))
            if exclusive:
                lock.writer = True
            else:
                lock.readers += 1
        try:
            yield
        finally:
            with lock.cond:
                if exclusive:
                    lock.writer = False
                else:
                    lock.readers -= 1
                lock.cond.notify_all()

    def sweep_stale(self, older_than: float, remove: bool) -> TempSweep:
        return TempSweep()  # every write is whole at once: no temp file is ever left
