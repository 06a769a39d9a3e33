"""Storage drivers: the small interface the registry stores on (get/put content, reader, writer
with commit/cancel, stat, list, walk, move-then-put, delete, lock, stale temp sweep), and the
filesystem driver. Nothing above a driver sees where or how it keeps its bytes: paths are
'/'-separated, relative and checked by `check_path`. Every write of the filesystem driver is
atomic: a temp file in the same directory, fsync, rename, fsync of the directory."""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Optional, Protocol

from dockyard.fsutil import (
    TEMP_PREFIX,
    TempSweep,
    atomic_write,
    fsync_dir,
    fsync_path,
    stage_file,
    sweep_temp_files,
)
from dockyard.registry.errors import InvalidPath, PathLocked, PathNotFound

# A storage path: '/'-separated components of these characters (a trailing '/' is allowed) ...
_SAFE_PATH = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*/?")
# ... none of which is `.` or `..`.
_DOT_PARTS = re.compile(r"(?:^|/)\.{1,2}(?:/|$)")


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    mtime: float
    is_dir: bool


class FileWriter(Protocol):
    """An appending writer: `commit` makes the bytes durable, `cancel` removes them, `truncate`
    takes back what was written past a size. One opened to append holds the file's lock until
    `close` (see StorageDriver.writer)."""

    @property
    def size(self) -> int: ...

    def write(self, data: bytes) -> int: ...

    def truncate(self, size: int) -> None: ...

    def commit(self) -> None: ...

    def cancel(self) -> None: ...

    def close(self) -> None: ...


class StorageDriver(Protocol):
    """What the blob and linked stores need from storage (distribution's StorageDriver)."""

    def get_content(self, path: str) -> bytes: ...

    def put_content(self, path: str, data: bytes, durable: bool = True) -> None: ...

    def reader(self, path: str, offset: int = 0) -> BinaryIO: ...

    def writer(self, path: str, append: bool = False) -> FileWriter:
        """A new file (`append` false), or the end of an existing one (`append`): then the
        writer holds the file's exclusive lock until closed, across every process sharing the
        storage, and is refused at once (PathLocked) while another writer holds it, never
        waiting; a file moved or removed before the lock was taken is PathNotFound, never
        written (its bytes may be another path's now, e.g. a committed blob's)."""
        ...

    def stat(self, path: str) -> FileInfo: ...

    def list(self, path: str) -> list[str]: ...

    def move_then_put(self, source: str, dest: str, path: str, data: bytes) -> None: ...

    def delete(self, path: str) -> None: ...

    def walk(self, path: str) -> Iterator[FileInfo]:
        """Every file below `path` (not directories); PathNotFound when `path` is no
        directory. Callers must not rely on the order."""
        ...

    def lock(self, path: str, exclusive: bool) -> AbstractContextManager[None]:
        """Hold the lock named `path`, shared or exclusive, across every process sharing the
        storage, for the block; waits for it."""
        ...

    def sweep_stale(self, older_than: float, remove: bool) -> TempSweep:
        """Remove (or only find, `remove` false) the temp files a killed writer left that are
        older than `older_than` seconds; what is left is reported."""
        ...

    def probe(self) -> None:
        """Return once the backing storage answered a request now — never from a cache (an
        NFS client answers stat and readdir from its attribute cache while the server is
        gone); raise OSError or DriverError when it fails. May block while the storage hangs
        (a hard NFS mount): the health check bounds its wait."""
        ...


def check_path(path: str) -> str:
    """`path` without a trailing '/' when it is a storage path: safe characters only, no
    empty, `.` or `..` component (so it never leaves a driver's root); InvalidPath otherwise.
    The empty path is the root."""
    if path == "":
        return path
    if _SAFE_PATH.fullmatch(path) is None or _DOT_PARTS.search(path) is not None:
        raise InvalidPath(path)
    return path.rstrip("/")


def _load_sync_file_range() -> Optional[Callable[[int, int, int], None]]:
    """Linux sync_file_range(SYNC_FILE_RANGE_WRITE): start writeback without waiting."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]

    def kick(fd: int, offset: int, length: int) -> None:
        func(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE; a failure only costs speed

    return kick


_SYNC_FILE_RANGE = _load_sync_file_range()
# Threads that run one fsync while the calling thread runs another (see move_then_put).
_SYNCERS = ThreadPoolExecutor(16, thread_name_prefix="fsync")
# Bytes written before writeback of them is started, so the final fsync has little left.
WRITEBACK_STEP = 8 * 1024 * 1024


def _open_locked(path: str, full: str) -> int:
    """A descriptor appending to the existing file `full` (storage path `path`), holding its
    exclusive lock (flock, which NFS clients emulate with a byte-range lock the server sees):
    PathLocked when another descriptor holds it; FileNotFoundError when `full` is not (or no
    longer) the file locked."""
    fd = os.open(full, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise PathLocked(path) from exc
        # The holder before us may have moved the file (a finished upload is a blob now) or
        # removed it: the descriptor must still be the file at the path.
        opened, current = os.fstat(fd), os.stat(full, follow_symlinks=False)
        if (opened.st_dev, opened.st_ino) != (current.st_dev, current.st_ino):
            raise FileNotFoundError(full)
    except BaseException:
        os.close(fd)  # releases the lock with the descriptor
        raise
    return fd


class _FsWriter:
    def __init__(self, path: str, full: str, append: bool) -> None:
        self._path = full
        try:
            if append:
                self._fd = _open_locked(path, full)
            else:
                self._fd = self._create(full)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise PathNotFound(path) from exc
        self._size = os.fstat(self._fd).st_size
        self._kicked = self._size
        self._closed = False

    @staticmethod
    def _create(full: str) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            return os.open(full, flags, 0o666)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            return os.open(full, flags, 0o666)

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:  # unbuffered: what truncate takes back is all on the file
            written = os.write(self._fd, view)
            self._size += written
            view = view[written:]
        if _SYNC_FILE_RANGE is not None and self._size - self._kicked >= WRITEBACK_STEP:
            _SYNC_FILE_RANGE(self._fd, self._kicked, self._size - self._kicked)
            self._kicked = self._size
        return len(data)

    def truncate(self, size: int) -> None:
        """Cut the file back to `size` bytes (what it had before a refused chunk)."""
        os.ftruncate(self._fd, size)
        self._size = size
        self._kicked = min(self._kicked, size)

    def commit(self) -> None:
        os.fsync(self._fd)

    def cancel(self) -> None:
        self.close()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                if _SYNC_FILE_RANGE is not None and self._size > self._kicked:
                    # start writeback of the tail now: the fsync at commit then finds it under way
                    _SYNC_FILE_RANGE(self._fd, self._kicked, self._size - self._kicked)
                    self._kicked = self._size
            finally:
                os.close(self._fd)


class FilesystemDriver:
    """Stores everything below one root directory; paths are '/'-separated and relative."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def _full(self, path: str) -> str:
        """The absolute path of a storage path (see check_path): always inside the root."""
        if path == "":
            return self.root
        return f"{self.root}/{check_path(path)}"

    def get_content(self, path: str) -> bytes:
        try:
            with open(self._full(path), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise PathNotFound(path) from exc

    def put_content(self, path: str, data: bytes, durable: bool = True) -> None:
        """Atomic (temp + rename) always; durable (fsync of file and directory) unless told
        the content may be lost in a power cut (an upload's start time)."""
        atomic_write(self._full(path), data, durable=durable)

    def reader(self, path: str, offset: int = 0) -> BinaryIO:
        try:
            f = open(self._full(path), "rb")  # noqa: SIM115 - returned to the caller
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise PathNotFound(path) from exc
        if offset:
            f.seek(offset)
        return f

    def writer(self, path: str, append: bool = False) -> FileWriter:
        return _FsWriter(path, self._full(path), append)

    def stat(self, path: str) -> FileInfo:
        try:
            st = os.stat(self._full(path))
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise PathNotFound(path) from exc
        return FileInfo(path, st.st_size, st.st_mtime, os.path.isdir(self._full(path)))

    def probe(self) -> None:
        # statvfs is always a round trip to an NFS server (FSSTAT / GETATTR of the file system's
        # counters), unlike stat and readdir: a dead server makes it fail or hang, as `df` does.
        os.statvfs(self._full(""))
        os.listdir(self._full(""))

    def list(self, path: str) -> list[str]:
        full = self._full(path)
        try:
            names = sorted(os.listdir(full))
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise PathNotFound(path) from exc
        base = path.strip("/")
        return [f"{base}/{n}" if base else n for n in names if not n.startswith(TEMP_PREFIX)]

    def move_then_put(self, source: str, dest: str, path: str, data: bytes) -> None:
        """Durably move `source` to `dest`, then durably write `data` at `path` (atomically).

        What a finished upload needs: the blob is in place before its link appears, and both
        are on disk before this returns. The fsyncs run two at a time: the source file's
        alongside the link's temp file, then, after the two renames (blob first), the two
        directories. On a journalling filesystem each pair shares one journal commit, so a
        small blob costs two commits instead of four."""
        src, dst, target = self._full(source), self._full(dest), self._full(path)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        syncing = _SYNCERS.submit(fsync_path, src)
        tmp = stage_file(os.path.dirname(target), data)
        try:
            try:
                syncing.result()
                os.replace(src, dst)
            except FileNotFoundError as exc:
                raise PathNotFound(source) from exc
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        syncing = _SYNCERS.submit(fsync_dir, os.path.dirname(dst))
        fsync_dir(os.path.dirname(target))
        syncing.result()

    def delete(self, path: str) -> None:
        """Remove a file, or a directory with everything below it."""
        full = self._full(path)
        try:
            os.unlink(full)  # a file or a symlink: one call
            return
        except FileNotFoundError as exc:
            raise PathNotFound(path) from exc
        except IsADirectoryError:
            pass
        try:
            os.rmdir(full)  # an empty directory: one more
        except OSError:
            shutil.rmtree(full)

    def walk(self, path: str) -> Iterator[FileInfo]:
        full = self._full(path)
        if not os.path.isdir(full):
            raise PathNotFound(path)
        base = path.strip("/")
        for directory, dirs, files in os.walk(full):
            dirs.sort()
            rel = os.path.relpath(directory, full)
            prefix = base if rel == "." else f"{base}/{rel}"
            for name in sorted(files):
                if name.startswith(TEMP_PREFIX):
                    continue
                st = os.stat(os.path.join(directory, name))
                yield FileInfo(f"{prefix}/{name}", st.st_size, st.st_mtime, False)

    @contextmanager
    def lock(self, path: str, exclusive: bool) -> Iterator[None]:
        """flock(2) on the file at `path` (created when missing), which NFS clients emulate
        with a byte-range lock the server sees."""
        full = self._full(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        fd = os.open(full, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock with the descriptor

    def sweep_stale(self, older_than: float, remove: bool) -> TempSweep:
        return sweep_temp_files(self.root, older_than, remove=remove)
