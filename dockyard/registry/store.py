"""The registry's stores over a storage driver: the global content-addressed blob store, upload
sessions (resumable, hashed once while streaming), and per-repository linked stores for layers,
manifests, tags and referrers. Driver errors become store errors here, once."""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Optional

from dockyard.registry import paths as p
from dockyard.registry.driver import FileWriter, StorageDriver
from dockyard.registry.errors import (
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    InvalidPath,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    PathLocked,
    PathNotFound,
    RangeInvalid,
    TooLarge,
)
from dockyard.registry.manifest import Manifest, parse_manifest

# Largest manifest accepted (OCI distribution spec: registries accept at least 4 MiB).
MANIFEST_MAX = 4 * 1024 * 1024
# Bytes read per step when hashing an upload again after a restart.
REHASH_CHUNK = 4 * 1024 * 1024
# Lock file that orders manifest writes against a sweeping garbage collector (shared/exclusive).
GC_LOCK = f"{p.ROOT_PREFIX}/.gc.lock"
# Why a chunk, finish or cancel of an upload is refused while another request holds the upload.
UPLOAD_BUSY = "another request is writing or finishing this upload"


def _link_digest(data: bytes) -> p.Digest:
    return p.parse_digest(data.decode("ascii", "replace").strip())


def _now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class _HashState:
    offset: int
    hasher: Any


@dataclass
class UploadStatus:
    name: str
    upload_id: str
    size: int


@dataclass
class Registry:
    """All stores of one storage root. Thread-safe for the operations the HTTP layer uses."""

    driver: StorageDriver
    delete_enabled: bool = False
    _hashes: dict[tuple[str, str], _HashState] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- global blob store -------------------------------------------------------------
    def blob_size(self, digest: p.Digest) -> int:
        try:
            return self.driver.stat(p.path_for(p.BlobData(digest))).size
        except PathNotFound as exc:
            raise BlobUnknown({"digest": str(digest)}) from exc

    def blob_exists(self, digest: p.Digest) -> bool:
        try:
            self.driver.stat(p.path_for(p.BlobData(digest)))
        except PathNotFound:
            return False
        return True

    def open_blob(self, digest: p.Digest, offset: int = 0) -> BinaryIO:
        try:
            return self.driver.reader(p.path_for(p.BlobData(digest)), offset)
        except PathNotFound as exc:
            raise BlobUnknown({"digest": str(digest)}) from exc

    def blob_content(self, digest: p.Digest) -> bytes:
        try:
            return self.driver.get_content(p.path_for(p.BlobData(digest)))
        except PathNotFound as exc:
            raise BlobUnknown({"digest": str(digest)}) from exc

    # ---- repositories ------------------------------------------------------------------
    def repository_exists(self, name: str) -> bool:
        try:
            self.driver.stat(p.path_for(p.RepoRoot(name)))
        except PathNotFound:
            return False
        return True

    def catalog(self, with_uploads: bool = False) -> list[str]:
        """Every repository (a directory with _manifests or _layers — or _uploads too when
        `with_uploads`), sorted."""
        marks = ("_manifests", "_layers", "_uploads") if with_uploads else ("_manifests", "_layers")
        root = p.path_for(p.RepositoriesRoot())
        local = self.driver.local_path(root)
        found: list[str] = []
        if local is None or not os.path.isdir(local):
            return found
        for directory, dirs, _files in os.walk(local):
            if any(d in marks for d in dirs):
                found.append(os.path.relpath(directory, local).replace(os.sep, "/"))
            dirs[:] = sorted(d for d in dirs if not d.startswith("_"))
        return sorted(found)

    # ---- linked blobs (per repository) ---------------------------------------------------
    def link_blob(self, name: str, digest: p.Digest) -> None:
        path = p.path_for(p.LayerLink(name, digest))
        try:
            if self.driver.get_content(path).strip() == str(digest).encode():
                return
        except PathNotFound:
            pass
        self.driver.put_content(path, str(digest).encode())

    def repo_blob_size(self, name: str, digest: p.Digest) -> int:
        try:
            self.driver.stat(p.path_for(p.LayerLink(name, digest)))
        except PathNotFound as exc:
            raise BlobUnknown({"digest": str(digest)}) from exc
        return self.blob_size(digest)

    def repo_has_blob(self, name: str, digest: p.Digest) -> bool:
        try:
            self.repo_blob_size(name, digest)
        except BlobUnknown:
            return False
        return True

    def unlink_blob(self, name: str, digest: p.Digest) -> None:
        try:
            self.driver.delete(p.path_for(p.LayerLink(name, digest)))
        except PathNotFound as exc:
            raise BlobUnknown({"digest": str(digest)}) from exc

    def mount_blob(self, name: str, source: str, digest: p.Digest) -> bool:
        """Link a blob `source` already has into `name`; False when `source` lacks it."""
        if not self.repo_has_blob(source, digest):
            return False
        self.link_blob(name, digest)
        return True

    # ---- uploads -------------------------------------------------------------------------
    def start_upload(self, name: str) -> UploadStatus:
        upload_id = str(uuid.uuid4())
        # Not fsynced: an upload whose start time a power cut loses is purged as stale.
        self.driver.put_content(
            p.path_for(p.UploadStartedAt(name, upload_id)), _now_rfc3339().encode(), durable=False
        )
        writer = self.driver.writer(p.path_for(p.UploadData(name, upload_id)))
        writer.close()
        with self._lock:
            self._hashes[(name, upload_id)] = _HashState(0, hashlib.sha256())
        return UploadStatus(name, upload_id, 0)

    def upload_status(self, name: str, upload_id: str) -> UploadStatus:
        try:
            size = self.driver.stat(p.path_for(p.UploadData(name, upload_id))).size
        except (PathNotFound, InvalidPath) as exc:
            raise BlobUploadUnknown({"upload": upload_id}) from exc
        return UploadStatus(name, upload_id, size)

    def _hash_state(self, name: str, upload_id: str, size: int) -> _HashState:
        with self._lock:
            state = self._hashes.get((name, upload_id))
        if state is not None and state.offset == size:
            return state
        # After a restart (or chunks another worker process wrote) hash what is on disk once.
        hasher = hashlib.sha256()
        with self.driver.reader(p.path_for(p.UploadData(name, upload_id))) as f:
            remaining = size
            while remaining > 0:
                chunk = f.read(min(REHASH_CHUNK, remaining))
                if not chunk:
                    break
                hasher.update(chunk)
                remaining -= len(chunk)
        state = _HashState(size, hasher)
        with self._lock:
            self._hashes[(name, upload_id)] = state
        return state

    def expect_offset(self, name: str, upload_id: str, start: Optional[int]) -> UploadStatus:
        """The upload's status; RangeInvalid when a chunk starting at `start` (from its
        Content-Range) would not continue it. A check before a body is read: append_upload
        checks again under the upload's lock."""
        status = self.upload_status(name, upload_id)
        _check_start(start, status.size)
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
    def append_upload(
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
            _check_start(start, before)
            state = self._hash_state(name, upload_id, before)
            saved = state.hasher.copy()
            appender = UploadAppender(writer, state)
            try:
                yield appender
            except BaseException:
                appender.stop()
                self._take_back(name, upload_id, writer, before, saved)
                raise
            finally:
                appender.stop()

    def _take_back(
        self, name: str, upload_id: str, writer: FileWriter, size: int, hasher: Any
    ) -> None:
        """Undo a refused chunk: the data file cut back to `size` and the digest state back to
        `hasher` (the state at `size`); when the cut fails, the state is dropped, to be hashed
        again from storage."""
        key = (name, upload_id)
        try:
            writer.truncate(size)
        except OSError:
            with self._lock:
                self._hashes.pop(key, None)
            raise
        with self._lock:
            self._hashes[key] = _HashState(size, hasher)

    def finish_upload(self, name: str, upload_id: str, expected: p.Digest) -> p.Digest:
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
                self._remove_upload(name, upload_id, missing_ok=True)
                raise DigestInvalid(
                    {"expected": str(expected), "actual": f"{expected.algorithm}:{actual}"}
                )
            link = p.path_for(p.LayerLink(name, expected))
            if self.blob_exists(expected):
                self.link_blob(name, expected)
            else:
                # blob in place first, then its link; both durable before the 201
                self.driver.move_then_put(
                    data_path, p.path_for(p.BlobData(expected)), link, str(expected).encode()
                )
            self._remove_upload(name, upload_id, missing_ok=True)
        return expected

    def forget_gone_uploads(self) -> int:
        """Drop the digest states of uploads no longer on storage (finished, cancelled or
        purged by another process sharing the root); returns how many were dropped."""
        with self._lock:
            keys = list(self._hashes)
        gone = []
        for name, upload_id in keys:
            try:
                self.driver.stat(p.path_for(p.UploadData(name, upload_id)))
            except (PathNotFound, InvalidPath):
                gone.append((name, upload_id))
        with self._lock:
            for key in gone:
                self._hashes.pop(key, None)
        return len(gone)

    def cancel_upload(self, name: str, upload_id: str) -> None:
        """Remove an upload; refused (BlobUploadInvalid) while another request writes or
        finishes it. One without a data file (a finish between its rename and its removal, or
        a crash's leftover) is removed as it is: nothing can be written into it."""
        with ExitStack() as held:
            try:
                held.enter_context(self._locked(name, upload_id))
            except BlobUploadUnknown:
                pass  # no data file to lock: nothing to write into
            self._remove_upload(name, upload_id)

    def _remove_upload(self, name: str, upload_id: str, missing_ok: bool = False) -> None:
        with self._lock:
            self._hashes.pop((name, upload_id), None)
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
        for name in self.catalog(with_uploads=True):
            try:
                ids = self.driver.list(p.path_for(p.UploadsRoot(name)))
            except PathNotFound:
                continue
            for entry in ids:
                upload_id = entry.rsplit("/", 1)[1]
                started: Optional[dt.datetime] = None
                try:
                    text = self.driver.get_content(p.path_for(p.UploadStartedAt(name, upload_id)))
                    started = _parse_time(text.decode())
                except (PathNotFound, ValueError, BlobUploadUnknown, InvalidPath):
                    # Not written yet (an upload starting this instant) or lost in a crash:
                    # the upload's directory dates it instead; gone meanwhile: skip it.
                    try:
                        info = self.driver.stat(p.path_for(p.UploadRoot(name, upload_id)))
                    except (PathNotFound, InvalidPath):
                        continue
                    started = dt.datetime.fromtimestamp(info.mtime, dt.timezone.utc)
                yield name, upload_id, started

    # ---- manifests, tags, referrers ------------------------------------------------------
    @contextmanager
    def gc_lock(self, exclusive: bool) -> Iterator[None]:
        """Shared for manifest writers, exclusive for a sweeping garbage collector."""
        local = self.driver.local_path(GC_LOCK)
        if local is None:
            yield
            return
        os.makedirs(os.path.dirname(local), exist_ok=True)
        fd = os.open(local, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def resolve(self, name: str, reference: str) -> p.Digest:
        """Digest of a tag or digest reference in `name`."""
        if ":" in reference:
            digest = p.parse_digest(reference)
            try:
                self.driver.stat(p.path_for(p.RevisionLink(name, digest)))
            except PathNotFound as exc:
                raise ManifestUnknown({"reference": reference}) from exc
            return digest
        p.validate_tag(reference)
        try:
            data = self.driver.get_content(p.path_for(p.TagCurrentLink(name, reference)))
        except PathNotFound as exc:
            if not self.repository_exists(name):
                raise NameUnknown({"name": name}) from exc
            raise ManifestUnknown({"tag": reference}) from exc
        return _link_digest(data)

    def get_manifest(self, name: str, reference: str) -> tuple[p.Digest, bytes, str]:
        """(digest, raw bytes, media type) of a manifest by tag or digest."""
        digest = self.resolve(name, reference)
        try:
            raw = self.blob_content(digest)
        except BlobUnknown as exc:
            raise ManifestUnknown({"reference": reference}) from exc
        return digest, raw, media_type_of(raw)

    def put_manifest(
        self, name: str, reference: str, raw: bytes, content_type: str
    ) -> tuple[p.Digest, Manifest]:
        if len(raw) > MANIFEST_MAX:
            raise TooLarge({"size": len(raw), "limit": MANIFEST_MAX})
        manifest = parse_manifest(raw, content_type, strict=True)
        digest = p.Digest("sha256", hashlib.sha256(raw).hexdigest())
        if ":" in reference:
            wanted = p.parse_digest(reference)
            if wanted.algorithm != "sha256":
                actual = hashlib.new(wanted.algorithm, raw).hexdigest()
                digest = p.Digest(wanted.algorithm, actual)
            if digest != wanted:
                raise DigestInvalid({"expected": reference, "actual": str(digest)})
            tag = None
        else:
            tag = p.validate_tag(reference)
        with self.gc_lock(exclusive=False):
            missing = [str(d) for d in manifest.blobs if not self.repo_has_blob(name, d)]
            missing += [
                str(d)
                for d in manifest.manifests
                if not self._has_revision(name, d) or not self.blob_exists(d)
            ]
            if missing:
                raise ManifestBlobUnknown({"missing": missing[:20]})
            if not self.blob_exists(digest):
                self.driver.put_content(p.path_for(p.BlobData(digest)), raw)
            # Written anew on every PUT, even when it exists: its mtime dates the push for the
            # garbage collector's grace period (gc.py keeps manifests pushed within it).
            self.driver.put_content(p.path_for(p.RevisionLink(name, digest)), str(digest).encode())
            if manifest.subject is not None:
                self.driver.put_content(
                    p.path_for(p.ReferrerLink(name, manifest.subject, digest)),
                    str(digest).encode(),
                )
            if tag is not None:
                self.driver.put_content(
                    p.path_for(p.TagIndexLink(name, tag, digest)), str(digest).encode()
                )
                self.driver.put_content(
                    p.path_for(p.TagCurrentLink(name, tag)), str(digest).encode()
                )
        return digest, manifest

    def _has_revision(self, name: str, digest: p.Digest) -> bool:
        try:
            self.driver.stat(p.path_for(p.RevisionLink(name, digest)))
        except PathNotFound:
            return False
        return True

    def delete_manifest(self, name: str, reference: str) -> None:
        if ":" not in reference:
            self.resolve(name, reference)
            self.driver.delete(p.path_for(p.TagRoot(name, reference)))
            return
        digest = self.resolve(name, reference)
        try:
            manifest: Optional[Manifest] = parse_manifest(
                self.blob_content(digest), media_type_of(self.blob_content(digest))
            )
        except (BlobUnknown, ManifestInvalid):
            manifest = None
        for tag in self.tags(name):
            try:
                current = self.resolve(name, tag)
            except ManifestUnknown:
                continue
            if current == digest:
                self.driver.delete(p.path_for(p.TagRoot(name, tag)))
        self.driver.delete(p.path_for(p.RevisionLink(name, digest)).rsplit("/", 1)[0])
        if manifest is not None and manifest.subject is not None:
            try:
                self.driver.delete(
                    p.path_for(p.ReferrerLink(name, manifest.subject, digest)).rsplit("/", 1)[0]
                )
            except PathNotFound:
                pass

    def tags(self, name: str) -> list[str]:
        try:
            entries = self.driver.list(p.path_for(p.TagsRoot(name)))
        except PathNotFound as exc:
            if not self.repository_exists(name):
                raise NameUnknown({"name": name}) from exc
            return []
        out = []
        for entry in entries:
            tag = entry.rsplit("/", 1)[1]
            try:
                self.driver.stat(p.path_for(p.TagCurrentLink(name, tag)))
            except PathNotFound:
                continue
            out.append(tag)
        return sorted(out)

    def referrers(self, name: str, subject: p.Digest) -> list[dict[str, Any]]:
        """Descriptors of manifests in `name` whose subject is `subject`."""
        try:
            entries = list(self.driver.walk(p.path_for(p.ReferrersRoot(name, subject))))
        except PathNotFound:
            return []
        out = []
        for info in entries:
            if not info.path.endswith("/link"):
                continue
            try:
                digest = _link_digest(self.driver.get_content(info.path))
                if not self._has_revision(name, digest):
                    continue
                raw = self.blob_content(digest)
            except (PathNotFound, BlobUnknown):
                continue
            doc = json.loads(raw)
            descriptor: dict[str, Any] = {
                "mediaType": media_type_of(raw),
                "digest": str(digest),
                "size": len(raw),
            }
            artifact = doc.get("artifactType") or (doc.get("config") or {}).get("mediaType")
            if artifact:
                descriptor["artifactType"] = artifact
            if doc.get("annotations"):
                descriptor["annotations"] = doc["annotations"]
            out.append(descriptor)
        return sorted(out, key=lambda d: d["digest"])


class UploadAppender:
    """Writes a chunk to an upload's data file and its running digest, one pass per byte.
    Batches may be written from a worker thread (write_many); `stop` waits for one being
    written and refuses any later, so the upload is never cut back or closed under a write
    (a request cancelled while its batch was being written)."""

    def __init__(self, writer: FileWriter, state: _HashState) -> None:
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


def _parse_time(text: str) -> dt.datetime:
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


def media_type_of(raw: bytes) -> str:
    """The media type a stored manifest is served with."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return "application/octet-stream"
    media = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(media, str) and media:
        return media
    if isinstance(doc, dict) and "manifests" in doc:
        return "application/vnd.oci.image.index.v1+json"
    return "application/vnd.oci.image.manifest.v1+json"


def _check_start(start: Optional[int], size: int) -> None:
    if start is not None and start != size:
        raise RangeInvalid(
            {"expected": size, "got": start},
            message=f"chunk starts at {start}, the upload has {size} bytes",
        )


def ensure_upload_offsets(start: Optional[int], end: Optional[int], length: int) -> None:
    """A Content-Range must match the body's length."""
    if start is not None and end is not None and end - start + 1 != length:
        raise BlobUploadInvalid(
            {"range": f"{start}-{end}", "length": length},
            message="Content-Range does not match the body length",
        )
