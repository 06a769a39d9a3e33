"""Upload sessions (distribution's blobWriter and upload purging): resumable, appended chunk by
chunk under the upload's lock, hashed once while streaming, moved into the blob store and linked
into the repository when finished, purged when stale. Driver errors become BlobUploadUnknown or
BlobUploadInvalid here."""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional

from dockyard.registry import paths as p
from dockyard.registry.blobstore import BlobStore
from dockyard.registry.driver import FileWriter, StorageDriver
from dockyard.registry.errors import (
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    InvalidPath,
    PathLocked,
    PathNotFound,
    RangeInvalid,
    RegistryError,
)
from dockyard.registry.linkedstore import LinkedStore

# Bytes read per step when hashing an upload again after a restart.
REHASH_CHUNK = 4 * 1024 * 1024
# Why a chunk, finish or cancel of an upload is refused while another request holds the upload.
UPLOAD_BUSY = "another request is writing or finishing this upload"


@dataclass
class HashState:
    """An upload's running digest and the size it covers."""

    offset: int
    hasher: Any


@dataclass
class UploadStatus:
    name: str
    upload_id: str
    size: int


def _now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> dt.datetime:
    """An RFC 3339 time as distribution (Go, nanoseconds) or this registry writes it."""
    text = text.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    # Go writes nanoseconds; Python takes microseconds at most.
    if "." in text:
        head, _, rest = text.partition(".")
        frac = "".join(ch for ch in rest if ch.isdigit())
        zone = rest[len(frac) :]
        text = f"{head}.{frac[:6]}{zone}"
    return dt.datetime.fromisoformat(text)


class HashStates:
    """The running digests of this process's uploads, by (repository, upload id); thread-safe.
    A state that is missing or behind the upload's size is hashed again from storage."""

    def __init__(self) -> None:
        self._states: dict[tuple[str, str], HashState] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> Optional[HashState]:
        with self._lock:
            return self._states.get(key)

    def set(self, key: tuple[str, str], state: HashState) -> None:
        with self._lock:
            self._states[key] = state

    def drop(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._states.pop(key, None)

    def keys(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._states)


def _rehash(driver: StorageDriver, path: str, size: int) -> HashState:
    """The sha256 state of the first `size` bytes of the file at `path`."""
    hasher = hashlib.sha256()
    with driver.reader(path) as f:
        remaining = size
        while remaining > 0:
            chunk = f.read(min(REHASH_CHUNK, remaining))
            if not chunk:
                break
            hasher.update(chunk)
            remaining -= len(chunk)
    return HashState(size, hasher)


def _started_at(driver: StorageDriver, name: str, upload_id: str) -> Optional[dt.datetime]:
    """When an upload started: its start time, or when missing or unreadable (not written yet:
    an upload starting this instant; lost in a crash) its directory's modification time; None
    when the upload is gone meanwhile."""
    try:
        text = driver.get_content(p.path_for(p.UploadStartedAt(name, upload_id)))
        return parse_time(text.decode())
    except (PathNotFound, ValueError, BlobUploadUnknown, InvalidPath):
        try:
            info = driver.stat(p.path_for(p.UploadRoot(name, upload_id)))
        except (PathNotFound, InvalidPath):
            return None
        return dt.datetime.fromtimestamp(info.mtime, dt.timezone.utc)


def check_start(start: Optional[int], size: int) -> None:
    if start is not None and start != size:
        raise RangeInvalid(
            {"expected": size, "got": start},
            message=f"chunk starts at {start}, the upload has {size} bytes",
        )


class UploadStore:
    """Uploads in progress; thread-safe. Digest states live in this process's memory."""

    def __init__(self, driver: StorageDriver, blobs: BlobStore, linked: LinkedStore) -> None:
        self.driver = driver
        self.blobs = blobs
        self.linked = linked
        self._hashes = HashStates()

    def start(self, name: str) -> UploadStatus:
        upload_id = str(uuid.uuid4())
        # Not fsynced: an upload whose start time a power cut loses is purged as stale.
        self.driver.put_content(
            p.path_for(p.UploadStartedAt(name, upload_id)), _now_rfc3339().encode(), durable=False
        )
        self.driver.writer(p.path_for(p.UploadData(name, upload_id))).close()
        self._hashes.set((name, upload_id), HashState(0, hashlib.sha256()))
        return UploadStatus(name, upload_id, 0)

    def status(self, name: str, upload_id: str) -> UploadStatus:
        try:
            size = self.driver.stat(p.path_for(p.UploadData(name, upload_id))).size
        except (PathNotFound, InvalidPath) as exc:
            raise BlobUploadUnknown({"upload": upload_id}) from exc
        return UploadStatus(name, upload_id, size)

    def _hash_state(self, name: str, upload_id: str, size: int) -> HashState:
        state = self._hashes.get((name, upload_id))
        if state is not None and state.offset == size:
            return state
        # After a restart (or chunks another worker process wrote) hash what is on disk once.
        state = _rehash(self.driver, p.path_for(p.UploadData(name, upload_id)), size)
        self._hashes.set((name, upload_id), state)
        return state

    def expect_offset(self, name: str, upload_id: str, start: Optional[int]) -> UploadStatus:
        """The upload's status; RangeInvalid when a chunk starting at `start` (from its
        Content-Range) would not continue it. A check before a body is read: append checks
        again under the upload's lock."""
        status = self.status(name, upload_id)
        check_start(start, status.size)
        return status

    @contextmanager
    def _locked(self, name: str, upload_id: str) -> Iterator[FileWriter]:
        """The upload's data file opened to append, holding its lock for the block (see
        StorageDriver.writer): BlobUploadInvalid at once while another request, in any process,
        holds it; BlobUploadUnknown when the upload is gone (finished, cancelled, purged)."""
        try:
            writer = self.driver.writer(p.path_for(p.UploadData(name, upload_id)), append=True)
        except (PathNotFound, InvalidPath) as exc:
            raise BlobUploadUnknown({"upload": upload_id}) from exc
        except PathLocked as exc:
            raise BlobUploadInvalid({"upload": upload_id}, message=UPLOAD_BUSY) from exc
        try:
            yield writer
        finally:
            writer.close()

    @contextmanager
    def append(
        self, name: str, upload_id: str, start: Optional[int] = None
    ) -> Iterator[UploadAppender]:
        """Append one chunk to an upload, holding its lock for the block: a chunk, finish or
        cancel of the same upload meanwhile is refused (BlobUploadInvalid), so no byte lands in
        a file that is committed or being committed. `start` (from Content-Range) must equal
        its size. A chunk is whole or not at all: whatever the block raises (a refused or
        broken-off body) cuts the data file back to its size before and restores the digest
        state."""
        with self._locked(name, upload_id) as writer:
            before = writer.size
            check_start(start, before)
            state = self._hash_state(name, upload_id, before)
            saved = state.hasher.copy()
            appender = UploadAppender(writer, state)
            try:
                yield appender
            except BaseException:
                appender.stop()
                self._take_back((name, upload_id), writer, before, saved)
                raise
            finally:
                appender.stop()

    def _take_back(self, key: tuple[str, str], writer: FileWriter, size: int, hasher: Any) -> None:
        """Undo a refused chunk: the data file cut back to `size` and the digest state back to
        `hasher` (the state at `size`); when the cut fails, the state is dropped, to be hashed
        again from storage."""
        try:
            writer.truncate(size)
        except OSError:
            self._hashes.drop(key)
            raise
        self._hashes.set(key, HashState(size, hasher))

    def finish(self, name: str, upload_id: str, expected: p.Digest) -> p.Digest:
        """Verify the upload's digest, move it into the blob store (once), link it in `name`.
        The upload's lock is held from the hash to the upload's removal: a chunk that comes
        meanwhile is refused as busy, one that comes after as unknown, never written into the
        committed blob; a finish while a chunk is being written is refused as busy."""
        data_path = p.path_for(p.UploadData(name, upload_id))
        with self._locked(name, upload_id) as writer:
            if expected.algorithm == "sha256":
                actual = self._hash_state(name, upload_id, writer.size).hasher.hexdigest()
            else:
                hasher = hashlib.new(expected.algorithm)
                with self.driver.reader(data_path) as f:
                    for chunk in iter(lambda: f.read(REHASH_CHUNK), b""):
                        hasher.update(chunk)
                actual = hasher.hexdigest()
            if actual != expected.hex:
                self._remove(name, upload_id, missing_ok=True)
                raise DigestInvalid(
                    {"expected": str(expected), "actual": f"{expected.algorithm}:{actual}"}
                )
            if self.blobs.exists(expected):
                self.linked.link_blob(name, expected)
            else:
                # blob in place first, then its link; both durable before the 201
                self.driver.move_then_put(
                    data_path,
                    p.path_for(p.BlobData(expected)),
                    p.path_for(p.LayerLink(name, expected)),
                    str(expected).encode(),
                )
            self._remove(name, upload_id, missing_ok=True)
        return expected

    def forget_gone(self) -> int:
        """Drop the digest states of uploads no longer on storage (finished, cancelled or
        purged by another process sharing the root); returns how many were dropped."""
        gone = []
        for name, upload_id in self._hashes.keys():
            try:
                self.driver.stat(p.path_for(p.UploadData(name, upload_id)))
            except (PathNotFound, InvalidPath):
                gone.append((name, upload_id))
        for key in gone:
            self._hashes.drop(key)
        return len(gone)

    def cancel(self, name: str, upload_id: str) -> None:
        """Remove an upload; refused (BlobUploadInvalid) while another request writes or
        finishes it. One without a data file (a finish between its rename and its removal, or
        a crash's leftover) is removed as it is: nothing can be written into it."""
        with ExitStack() as held:
            try:
                held.enter_context(self._locked(name, upload_id))
            except BlobUploadUnknown:
                pass  # no data file to lock: nothing to write into
            self._remove(name, upload_id)

    def _remove(self, name: str, upload_id: str, missing_ok: bool = False) -> None:
        self._hashes.drop((name, upload_id))
        # The files this registry writes first (cheaper than walking the directory), then the
        # directory with whatever else is in it (distribution's hashstates).
        for leftover in (p.UploadStartedAt(name, upload_id), p.UploadData(name, upload_id)):
            try:
                self.driver.delete(p.path_for(leftover))
            except (PathNotFound, NotADirectoryError):
                pass
        try:
            self.driver.delete(p.path_for(p.UploadRoot(name, upload_id)))
        except PathNotFound as exc:
            if not missing_ok:
                raise BlobUploadUnknown({"upload": upload_id}) from exc

    def uploads(self) -> Iterator[tuple[str, str, dt.datetime]]:
        """(repository, upload id, started at) of every upload on storage; an upload without a
        readable start time is dated by its directory's modification time."""
        for name in self.linked.catalog(with_uploads=True):
            try:
                ids = self.driver.list(p.path_for(p.UploadsRoot(name)))
            except PathNotFound:
                continue
            for entry in ids:
                upload_id = entry.rsplit("/", 1)[1]
                started = _started_at(self.driver, name, upload_id)
                if started is not None:
                    yield name, upload_id, started

    def purge(
        self, age: float, dry_run: bool = False, log: Callable[[str], None] = print
    ) -> list[tuple[str, str]]:
        """Remove the uploads started more than `age` seconds ago (`dry_run`: only list them);
        returns (repository, upload id) of each. One being written or finished meanwhile is
        left alone (the purge after next finds it, if still stale)."""
        cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=age)
        purged = []
        for name, upload_id, started in list(self.uploads()):
            if started.tzinfo is None:
                started = started.replace(tzinfo=dt.timezone.utc)
            if started >= cutoff:
                continue
            purged.append((name, upload_id))
            if dry_run:
                log(f"upload purge (dry run) would remove {name}/{upload_id}")
                continue
            try:
                self.cancel(name, upload_id)
            except RegistryError:
                continue
            log(f"upload purge removed {name}/{upload_id}")
        return purged


class UploadAppender:
    """Writes a chunk to an upload's data file and its running digest, one pass per byte.
    Batches may be written from a worker thread (write_many); `stop` waits for one being
    written and refuses any later, so the upload is never cut back or closed under a write
    (a request cancelled while its batch was being written)."""

    def __init__(self, writer: FileWriter, state: HashState) -> None:
        self._writer = writer
        self._state = state
        self._busy = threading.Lock()
        self._stopped = False

    @property
    def size(self) -> int:
        return int(self._writer.size)

    def write(self, data: bytes) -> None:
        self.write_many([data])

    def write_many(self, chunks: list[bytes]) -> None:
        """Write and hash a batch of chunks in order (run in a worker thread)."""
        with self._busy:
            if self._stopped:
                raise ValueError("write to an upload chunk that has ended")
            for data in chunks:
                self._writer.write(data)
                self._state.hasher.update(data)
                self._state.offset = self._writer.size

    def stop(self) -> None:
        """End the chunk: wait for a batch being written; refuse any later."""
        with self._busy:
            self._stopped = True
