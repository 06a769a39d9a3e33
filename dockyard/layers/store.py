"""The content-addressable image store: blobs by digest, layers by chain ID (deduplicated by diff
ID), images by config digest with their tags, and containers (a writable layer over an image).
Every write is a temp file or directory in the store, fsynced where it is a file, then renamed.

Layout below the store root (``/var/lib/dockyard`` or ``--root``/``DOCKYARD_ROOT``)::

    driver.json                          the graph driver; its presence marks a store
    blobs/sha256/<hex>                   compressed layers, configs, manifests, as pulled
    layers/<chain hex>/layer.json        diff ID, parent chain ID, blob digest, size, driver
    layers/<chain hex>/diff|root/        the layer's content (overlay keeps a diff, vfs a root)
    images/<config hex>.json             an image: config, manifest, layers, tags, sources
    containers/<name>/container.json     a container: image, driver, created
    containers/<name>/upper|work|merged  (overlay) or rootfs/ (vfs)
    tmp/                                 temp files and directories, renamed into place
    tmp/download-<hex>.partial           the registry client's resumable downloads
    locks/store, locks/gate, locks/meta  the store lock, its queue for removers, the metadata lock
    locks/blob-<hex>, locks/layer-<hex>  one download of a blob, one extraction of a layer at once

Permissions: the root and every directory the store makes (and so each ``layers/<chain>`` and
``containers/<name>``) are 0700, its owner's only, as Docker closed CVE-2021-41091: a layer's
setuid binaries and device nodes must not be reachable by other local users. A store made by
older code is tightened when its owner (or root) opens it; ``fsck`` reports what is still open.

Locking (``fcntl.flock``; every lock is released by the kernel when its process dies). Order —
never take a lock while holding one later in this list, never turn shared into exclusive:

1. ``locks/gate``: a remover holds it exclusively while it waits for the store lock, so new
   adders queue behind it (writer preference); adders pass it (shared) on their way in.
2. ``locks/store``: *shared* by every operation that adds or reads content over time (pull,
   import, create, commit, push, export, mount, fsck), for the whole operation, network waits
   included, so nothing it downloaded or extracted can be removed before it is registered;
   *exclusive* for removals (image rm, container rm, prune) and the temp sweep, which do no
   network I/O, wait at most ``lock_wait`` seconds and then fail with ``StoreBusy``.
   Reentrant within one process (its threads share it); exclusive covers shared.
3. ``locks/blob-<hex>``, ``locks/layer-<hex>``: one per item, taken inside the shared store lock
   (one at a time), so two pulls of one layer download and extract it once; the holder unlinks
   the file before it lets go, and a waiter that then finds another file at the path retries.
4. ``locks/meta``: exclusive and short, around every read-modify-write of ``images/*.json``
   (register, tag, untag); no network and no extraction inside it.

Temp files: whatever ``tmp/`` holds while no process holds the store lock was left by a killed
process; opening the store removes it when the store lock can be taken exclusively at once
(never the partial downloads, which a pull resumes), and ``prune`` does so under its lock.
Read-only use (``images``, ``disk_usage``, ``fsck``) takes no exclusive lock and never creates
a store (``ImageStore(create=False)`` raises ``NoStore``)."""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Optional

from dockyard.digests import file_sha256
from dockyard.fsutil import atomic_write, fsync_dir
from dockyard.layers.diff import write_layer
from dockyard.layers.drivers import GraphDriver, detect_driver, remove_tree
from dockyard.layers.tarsafe import HashingReader, LayerError, decompressed
from dockyard.mediatypes import DOCKER_LAYER, DOCKER_MANIFEST, OCI_LAYER

DEFAULT_ROOT = "/var/lib/dockyard"
# gzip level of committed layers: 1 (fastest) — layers are mostly compressed data already.
COMMIT_GZIP_LEVEL = 1
# Bytes per gzip member when a committed layer is compressed on several cores.
GZIP_BLOCK = 4 * 1024 * 1024
# Mode of the root and of every directory the store makes: its owner's only, so no other local
# user reaches a layer's setuid binaries or device nodes (Docker's fix of CVE-2021-41091).
DIR_MODE = 0o700
# Directories below the root, made (DIR_MODE) when the store is opened.
SUBDIRS = ("blobs", "blobs/sha256", "layers", "images", "containers", "tmp", "locks")
# Seconds a removal (image rm, container rm, prune) waits for running operations to finish.
REMOVAL_WAIT = 120.0
# Seconds between two tries of a lock that a removal waits for.
LOCK_POLL = 0.05
# Fewest hex digits of an image ID prefix (`sha256:` or not) that selects an image; fewer —
# the bare `sha256:` above all — would pick "the only image" by accident.
MIN_ID_PREFIX = 6
# Name prefix of the registry client's partial downloads in tmp/: a pull resumes them, so the
# temp sweep keeps them (and only reports them).
DOWNLOAD_PREFIX = "download-"
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
_HEX = re.compile(r"^sha256:[a-f0-9]{64}$")
# An image ID prefix as `resolve` accepts it (without `sha256:`).
_ID_PREFIX = re.compile(rf"^[a-f0-9]{{{MIN_ID_PREFIX},64}}$")


class StoreError(Exception):
    """A store operation that cannot be done; the message says why and what would work."""


class NoStore(StoreError):
    """A command that only reads was pointed at a path that holds no store."""


class StoreBusy(StoreError):
    """A removal could not get the store to itself within its wait: operations are running."""


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_id(parent: Optional[str], diff_id: str) -> str:
    if parent is None:
        return diff_id
    return sha256_bytes(f"{parent} {diff_id}".encode())


def _hex(digest: str) -> str:
    if not _HEX.match(digest):
        raise StoreError(f"invalid digest {digest!r}: expected sha256:<64 hex>")
    return digest[7:]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---- locks -------------------------------------------------------------------------------------
def _open_lock(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def _wait_lock(fd: int, operation: int, waiting: Callable[[], None]) -> None:
    """`flock(fd, operation)`, calling `waiting` first if it must wait."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        waiting()
        fcntl.flock(fd, operation)


def _poll_lock(fd: int, operation: int, deadline: float, waiting: Callable[[], None]) -> bool:
    """Try `flock(fd, operation)` until `deadline`; call `waiting` before the first sleep."""
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            waiting()
            time.sleep(LOCK_POLL)


def _once(on_wait: Optional[Callable[[str], None]], what: str) -> Callable[[], None]:
    """A `waiting` callback that tells `on_wait` what is waited for, the first time only."""
    told: list[bool] = []

    def waiting() -> None:
        if not told and on_wait is not None:
            on_wait(what)
        told.append(True)

    return waiting


class _StoreLock:
    """The store lock (with its gate) as this process holds it: one descriptor shared by all
    its threads, reentrant; exclusive covers shared, shared is never turned into exclusive."""

    def __init__(self, directory: str, root: str) -> None:
        self._path = os.path.join(directory, "store")
        self._gate = os.path.join(directory, "gate")
        self._root = root
        # guards the fields below; held while this process waits for the file lock
        self._mutex = threading.Lock()
        self._fd: Optional[int] = None
        self._exclusive = False
        self._depth = 0

    def _release(self) -> None:
        with self._mutex:
            self._depth -= 1
            if self._depth == 0 and self._fd is not None:
                os.close(self._fd)  # closing the descriptor releases the flock
                self._fd = None
                self._exclusive = False

    @contextmanager
    def shared(self, on_wait: Optional[Callable[[str], None]]) -> Iterator[None]:
        with self._mutex:
            if self._depth == 0:
                waiting = _once(on_wait, "a removal (image rm, container rm, prune)")
                gate = _open_lock(self._gate)
                try:
                    _wait_lock(gate, fcntl.LOCK_SH, waiting)  # behind a removal queued first
                    fd = _open_lock(self._path)
                    try:
                        _wait_lock(fd, fcntl.LOCK_SH, waiting)
                    except BaseException:
                        os.close(fd)
                        raise
                finally:
                    os.close(gate)
                self._fd, self._exclusive = fd, False
            self._depth += 1
        try:
            yield
        finally:
            self._release()

    @contextmanager
    def exclusive(
        self, what: str, wait: float, on_wait: Optional[Callable[[str], None]]
    ) -> Iterator[None]:
        with self._mutex:
            if self._depth and not self._exclusive:
                raise StoreError(
                    f"{what}: this process holds the store lock of {self._root} shared and "
                    "cannot also take it exclusively (lock order)"
                )
            if self._depth == 0:
                self._fd = self._acquire_exclusive(what, wait, on_wait)
                self._exclusive = True
            self._depth += 1
        try:
            yield
        finally:
            self._release()

    def _acquire_exclusive(
        self, what: str, wait: float, on_wait: Optional[Callable[[str], None]]
    ) -> int:
        deadline = time.monotonic() + wait
        waiting = _once(on_wait, f"running operations (at most {wait:g} s)")
        gate = _open_lock(self._gate)
        try:
            fd = _open_lock(self._path)
            try:
                if _poll_lock(gate, fcntl.LOCK_EX, deadline, waiting) and _poll_lock(
                    fd, fcntl.LOCK_EX, deadline, waiting
                ):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        finally:
            os.close(gate)
        raise StoreBusy(
            f"{what}: the store at {self._root} is in use by another dockyard operation (pull, "
            f"import, create, commit, push or export); waited {wait:g} s — try again when it "
            "has finished"
        )

    @contextmanager
    def exclusive_if_idle(self) -> Iterator[bool]:
        """Exclusive at once (True) or not at all (False): for sweeps that can wait a turn."""
        with self._mutex:
            if self._depth:
                got = self._exclusive
            else:
                fd = _open_lock(self._path)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    got = False
                else:
                    self._fd, self._exclusive, got = fd, True, True
            if got:
                self._depth += 1
        try:
            yield got
        finally:
            if got:
                self._release()


class _MetaLock:
    """An exclusive lock file, reentrant for one thread and excluding this process's others."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._local = threading.RLock()
        self._fd: Optional[int] = None
        self._depth = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._local:
            if self._depth == 0:
                fd = _open_lock(self._path)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    os.close(self._fd)
                    self._fd = None


@contextmanager
def _item_lock(path: str) -> Iterator[None]:
    """An exclusive lock on a per-item file that is unlinked when let go: a waiter that wakes
    on an unlinked file (or on one replaced since) tries again on the file now at `path`."""
    while True:
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held, current = os.fstat(fd), os.stat(path, follow_symlinks=False)
            if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
                break
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with suppress(FileNotFoundError):
            os.unlink(path)  # still held: nobody can take it between the unlink and the close
        os.close(fd)


@dataclass
class LayerRef:
    digest: str  # compressed blob digest
    diff_id: str
    chain_id: str
    size: int
    media_type: str


@dataclass
class Image:
    id: str
    config: dict[str, Any]
    manifest_media_type: str
    layers: list[LayerRef]
    tags: list[str] = field(default_factory=list)
    sources: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "manifest_media_type": self.manifest_media_type,
            "layers": [vars(layer) for layer in self.layers],
            "tags": self.tags,
            "sources": self.sources,
        }


@dataclass
class TempEntry:
    """One entry of tmp/ as `disk_usage` and `fsck_report` show it."""

    path: str  # relative to the store root: tmp/<name>
    bytes: int
    # "partial download (…)", "in use by a running operation", "left behind: <why not removed>"
    state: str


@dataclass
class FsckReport:
    """What `fsck_report` found: damaged content, directories other users can reach, temps."""

    damage: list[str] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)
    temps: list[TempEntry] = field(default_factory=list)


class ImageStore:
    """One store root with one graph driver. `create=False` (commands that only read) raises
    `NoStore` where there is no store instead of making one."""

    def __init__(
        self, root: Optional[str] = None, driver: Optional[str] = None, create: bool = True
    ) -> None:
        self.root = os.path.abspath(root or os.environ.get("DOCKYARD_ROOT") or DEFAULT_ROOT)
        # seconds a removal waits for running operations
        self.lock_wait = REMOVAL_WAIT
        # called (with what is waited for) when an operation must wait for the store lock
        self.on_lock_wait: Optional[Callable[[str], None]] = None
        # directories (of a store made by older code) that opening made private to the owner
        self.tightened: list[str] = []
        # tmp/ entries left by killed operations that the sweep removed when the store opened
        self.swept: list[str] = []
        # tmp/ entries a sweep could not remove, with the reason
        self._sweep_failures: dict[str, str] = {}
        # whether this opening made the store (it held no driver.json)
        self.created = not os.path.exists(self._path("driver.json"))
        if create:
            os.makedirs(self.root, mode=DIR_MODE, exist_ok=True)
        else:
            self._check_exists()
        self._tighten(self.root)  # before anything is made inside
        for sub in SUBDIRS:
            with suppress(FileExistsError):
                os.mkdir(self._path(sub), DIR_MODE)
        for path in self._store_dirs():
            self._tighten(path)
        self._lock = _StoreLock(self._path("locks"), self.root)
        self._meta = _MetaLock(self._path("locks", "meta"))
        recorded = self._read_json("driver.json")
        name = driver or (recorded or {}).get("driver")
        self.driver: GraphDriver = detect_driver(name)
        if recorded and recorded.get("driver") != self.driver.name:
            raise StoreError(
                f"the store at {self.root} uses the {recorded['driver']} driver, not "
                f"{self.driver.name}; use another --root"
            )
        if not recorded:
            self._write_json("driver.json", {"driver": self.driver.name})
        with self._lock.exclusive_if_idle() as idle:
            if idle:
                self.swept = self._remove_temps()

    # ---- files -------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _check_exists(self) -> None:
        try:
            os.stat(self._path("driver.json"))
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NoStore(
                f"there is no store at {self.root} (check --root and $DOCKYARD_ROOT; "
                "`dockyard image pull` or `image import` makes one)"
            ) from exc
        except PermissionError as exc:
            raise StoreError(
                f"cannot open the store at {self.root}: permission denied (a store is private "
                "to its owner; run this as its owner or root)"
            ) from exc

    def _store_dirs(self) -> Iterator[str]:
        """The directories whose mode keeps other users out: the root, its subdirectories, and
        each layer and container directory."""
        yield self.root
        for sub in SUBDIRS:
            yield self._path(sub)
        for sub in ("layers", "containers"):
            try:
                names = sorted(os.listdir(self._path(sub)))
            except FileNotFoundError:
                continue
            for name in names:
                yield self._path(sub, name)

    def _tighten(self, path: str) -> None:
        """Take group and other access away from a store directory that has it (an older
        store), where this user may (its owner, or root); `fsck` reports the rest."""
        try:
            info = os.stat(path) if path == self.root else os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(info.st_mode) or not info.st_mode & 0o077:
            return
        if os.geteuid() not in (0, info.st_uid):
            return
        os.chmod(path, stat.S_IMODE(info.st_mode) & ~0o077)
        self.tightened.append(path)

    def _unsafe_dirs(self) -> list[str]:
        unsafe = []
        for path in self._store_dirs():
            try:
                info = os.stat(path) if path == self.root else os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode) and info.st_mode & 0o077:
                unsafe.append(
                    f"{path} is mode {stat.S_IMODE(info.st_mode):04o}: other users can reach "
                    f"the image files below it (a store keeps its directories {DIR_MODE:04o}; "
                    f"chmod go-rwx {path})"
                )
        return unsafe

    def _read_json(self, *parts: str) -> Optional[dict[str, Any]]:
        try:
            with open(self._path(*parts)) as f:
                data: dict[str, Any] = json.load(f)
                return data
        except FileNotFoundError:
            return None

    def _write_json(self, rel: str, data: Any) -> None:
        self._write_atomic(rel, json.dumps(data, indent=2, sort_keys=True).encode())

    def _write_atomic(self, rel: str, data: bytes) -> None:
        with self.sharing():
            atomic_write(self._path(rel), data, tmp_dir=self._path("tmp"))

    @contextmanager
    def temp_file(self, prefix: str = "file-") -> Iterator[tuple[str, IO[bytes]]]:
        """A temp file in tmp/ (gone afterwards unless renamed), under the shared store lock."""
        with self.sharing():
            fd, tmp = tempfile.mkstemp(dir=self._path("tmp"), prefix=prefix)
            f = os.fdopen(fd, "w+b")
            try:
                yield tmp, f
            finally:
                f.close()
                if os.path.exists(tmp):
                    os.unlink(tmp)

    # ---- locks -------------------------------------------------------------------------
    def sharing(self) -> Any:
        """The store lock, shared: hold it across every step of an operation that adds content
        (pull, import, …) so that no removal frees what it has not registered yet."""
        return self._lock.shared(self.on_lock_wait)

    def exclusive(self, what: str) -> Any:
        """The store lock, exclusive (for removals): waits `lock_wait` s, then `StoreBusy`."""
        return self._lock.exclusive(what, self.lock_wait, self.on_lock_wait)

    @contextmanager
    def blob_lock(self, digest: str) -> Iterator[None]:
        """Held around the download of one blob: a second pull of it waits, then finds it."""
        with self.sharing(), _item_lock(self._path("locks", f"blob-{_hex(digest)}")):
            yield

    # ---- temp files --------------------------------------------------------------------
    def _remove_temps(self) -> list[str]:
        """Remove what is in tmp/ but the partial downloads; only with the store lock held
        exclusively (then no running operation owns any of it)."""
        removed = []
        for name in sorted(os.listdir(self._path("tmp"))):
            if name.startswith(DOWNLOAD_PREFIX):
                continue
            path = self._path("tmp", name)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._sweep_failures[name] = exc.strerror or type(exc).__name__
                continue
            self._sweep_failures.pop(name, None)
            removed.append(f"tmp/{name}")
        return removed

    def temp_entries(self) -> list[TempEntry]:
        """What tmp/ holds after a sweep (when the store is idle): partial downloads, and temps
        of running operations (or that could not be removed)."""
        with self._lock.exclusive_if_idle() as idle:
            if idle:
                self.swept += self._remove_temps()
        entries = []
        for name in sorted(os.listdir(self._path("tmp"))):
            path = self._path("tmp", name)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            size = _tree_size(path) if stat.S_ISDIR(info.st_mode) else info.st_blocks * 512
            if name.startswith(DOWNLOAD_PREFIX):
                state = "partial download (a pull resumes it)"
            elif name in self._sweep_failures:
                state = f"left behind: {self._sweep_failures[name]}"
            else:
                state = "in use by a running operation"
            entries.append(TempEntry(f"tmp/{name}", size, state))
        return entries

    # ---- blobs -------------------------------------------------------------------------
    def blob_path(self, digest: str) -> str:
        return self._path("blobs", "sha256", _hex(digest))

    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def adopt_blob(self, tmp: str, digest: str) -> None:
        """Move a verified temp file into place (once: an existing blob is kept)."""
        with self.sharing():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            if self.has_blob(digest):
                os.unlink(tmp)
                return
            os.replace(tmp, self.blob_path(digest))
            fsync_dir(self._path("blobs", "sha256"))

    def put_blob(self, data: bytes) -> str:
        digest = sha256_bytes(data)
        if not self.has_blob(digest):
            self._write_atomic(os.path.join("blobs", "sha256", _hex(digest)), data)
        return digest

    def read_blob(self, digest: str) -> bytes:
        try:
            with open(self.blob_path(digest), "rb") as f:
                return f.read()
        except FileNotFoundError as exc:
            raise StoreError(f"blob {digest} is not in the store") from exc

    # ---- layers ------------------------------------------------------------------------
    def layer_dir(self, chain: str) -> str:
        return self._path("layers", _hex(chain))

    def has_layer(self, chain: str) -> bool:
        return os.path.exists(os.path.join(self.layer_dir(chain), "layer.json"))

    def layer_dirs(self, image: Image) -> list[str]:
        return [self.layer_dir(layer.chain_id) for layer in image.layers]

    def _layer_lock(self, chain: str) -> Any:
        return _item_lock(self._path("locks", f"layer-{_hex(chain)}"))

    def apply_blob(
        self,
        parent_chain: Optional[str],
        digest: str,
        expected_diff_id: Optional[str],
        parent_dirs: list[str],
    ) -> tuple[str, str, int]:
        """Extract a stored layer blob on top of `parent_chain`; returns (chain, diff, size).

        Nothing is half-extracted: the layer goes to a temp directory renamed into place, under
        the layer's lock, so a layer extracted meanwhile by another process is simply used."""
        with self.sharing():
            if expected_diff_id is None:
                work, meta = self._extract(parent_chain, digest, None, parent_dirs)
                with self._layer_lock(meta["chain_id"]):
                    return self._publish_layer(work, meta)
            chain = chain_id(parent_chain, expected_diff_id)
            with self._layer_lock(chain):
                existing = self._read_json("layers", _hex(chain), "layer.json")
                if existing is not None:
                    return chain, expected_diff_id, int(existing.get("size", 0))
                work, meta = self._extract(parent_chain, digest, expected_diff_id, parent_dirs)
                return self._publish_layer(work, meta)

    def _extract(
        self,
        parent_chain: Optional[str],
        digest: str,
        expected_diff_id: Optional[str],
        parent_dirs: list[str],
    ) -> tuple[str, dict[str, Any]]:
        """The layer extracted into a new tmp/layer-* directory, and its layer.json."""
        work = self._path("tmp", f"layer-{uuid.uuid4().hex}")
        os.mkdir(work, DIR_MODE)
        try:
            with open(self.blob_path(digest), "rb") as source:
                result = self.driver.apply(work, parent_dirs, source)
            if result.compressed_digest != digest:
                raise LayerError(f"layer blob {digest} hashes to {result.compressed_digest}")
            if expected_diff_id is not None and result.diff_id != expected_diff_id:
                raise LayerError(
                    f"layer {digest} has diff ID {result.diff_id}, the image config says "
                    f"{expected_diff_id}"
                )
            meta = {
                "chain_id": chain_id(parent_chain, result.diff_id),
                "diff_id": result.diff_id,
                "parent": parent_chain,
                "blob": digest,
                "size": result.size,
                "driver": self.driver.name,
                "skipped_devices": result.skipped_devices,
            }
            with open(os.path.join(work, "layer.json"), "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
        except BaseException:
            remove_tree(work)
            raise
        return work, meta

    def _publish_layer(self, work: str, meta: dict[str, Any]) -> tuple[str, str, int]:
        """Rename an extracted layer into place (with its lock held); one there already wins."""
        chain = str(meta["chain_id"])
        try:
            if self.has_layer(chain):
                remove_tree(work)
            else:
                if os.path.lexists(self.layer_dir(chain)):  # damaged: no layer.json
                    remove_tree(self.layer_dir(chain))
                os.replace(work, self.layer_dir(chain))
                fsync_dir(self._path("layers"))
        except BaseException:
            remove_tree(work)
            raise
        return chain, str(meta["diff_id"]), int(meta["size"])

    # ---- images ------------------------------------------------------------------------
    def images(self) -> list[Image]:
        out = []
        for name in sorted(os.listdir(self._path("images"))):
            if not name.endswith(".json"):
                continue
            try:
                image = self.load_image("sha256:" + name[:-5])
            except StoreError:
                if os.path.exists(self._path("images", name)):
                    raise
                continue  # removed while it was read
            if image is not None:
                out.append(image)
        return out

    def load_image(self, image_id: str) -> Optional[Image]:
        data = self._read_json("images", _hex(image_id) + ".json")
        if data is None:
            return None
        config = json.loads(self.read_blob(image_id))
        return Image(
            id=image_id,
            config=config,
            manifest_media_type=data["manifest_media_type"],
            layers=[LayerRef(**layer) for layer in data["layers"]],
            tags=list(data.get("tags", [])),
            sources={k: list(v) for k, v in data.get("sources", {}).items()},
        )

    def save_image(self, image: Image) -> None:
        with self.sharing(), self._meta.held():
            self._write_json(os.path.join("images", _hex(image.id) + ".json"), image.to_json())

    def resolve(self, ref: str) -> Image:
        """An image by tag (as stored), by ID, or by a unique ID prefix of at least
        MIN_ID_PREFIX hex digits (with or without `sha256:`)."""
        images = self.images()
        if ref.startswith("sha256:"):
            prefix: Optional[str] = ref[7:]
            for image in images:
                if image.id == ref:
                    return image
        else:
            wanted = normalize_ref(ref)
            for image in images:
                if wanted in image.tags:
                    return image
            prefix = ref if _ID_PREFIX.match(ref) else None
        if prefix is not None:
            if not _ID_PREFIX.match(prefix):
                raise StoreError(
                    f"{ref!r} is not an image ID: give sha256: and {MIN_ID_PREFIX} to 64 hex "
                    "digits, or a tag"
                )
            hits = [image for image in images if image.id[7:].startswith(prefix)]
            if len(hits) == 1:
                return hits[0]
            if hits:
                raise StoreError(
                    f"{ref!r} is the start of {len(hits)} image IDs in {self.root}; give more "
                    "digits"
                )
        raise StoreError(f"no image {ref!r} in {self.root} (see `dockyard image ls`)")

    def tag(self, image: Image, ref: str) -> None:
        ref = normalize_ref(ref)
        with self.sharing(), self._meta.held():
            for other in self.images():
                if ref in other.tags and other.id != image.id:
                    other.tags.remove(ref)
                    self.save_image(other)
            current = self.load_image(image.id) or image
            if ref not in current.tags:
                current.tags.append(ref)
            self.save_image(current)
            image.tags = list(current.tags)

    def register(
        self,
        config_bytes: bytes,
        layers: list[LayerRef],
        media_type: str,
        ref: Optional[str],
        source: Optional[str] = None,
    ) -> Image:
        with self.sharing():
            image_id = self.put_blob(config_bytes)
            with self._meta.held():
                image: Image = self.load_image(image_id) or Image(
                    id=image_id,
                    config=json.loads(config_bytes),
                    manifest_media_type=media_type,
                    layers=layers,
                )
                if source:
                    for layer in layers:
                        sources = image.sources.setdefault(layer.digest, [])
                        if source not in sources:
                            sources.append(source)
                self.save_image(image)
                if ref:
                    self.tag(image, ref)
            return image

    def remove_image(self, ref: str) -> list[str]:
        """Untag `ref` (or remove the image by ID); free layers nothing else uses. Waits for
        running operations (the store lock, exclusive)."""
        with self.exclusive(f"image rm {ref}"), self._meta.held():
            image = self.resolve(ref)
            if not ref.startswith("sha256:") and normalize_ref(ref) in image.tags:
                image.tags.remove(normalize_ref(ref))
            else:
                image.tags = []
            if image.tags:
                self.save_image(image)
                return []
            users = [c["name"] for c in self.containers() if c["image"] == image.id]
            if users:
                raise StoreError(f"image {ref} is used by container(s) {', '.join(users)}")
            os.unlink(self._path("images", _hex(image.id) + ".json"))
            fsync_dir(self._path("images"))
            return self._remove_unused()

    def prune(self) -> list[str]:
        """Remove layers and blobs no image or container uses, and what killed operations
        left in tmp/ (not the partial downloads); returns what went."""
        with self.exclusive("prune"):
            return self._remove_unused() + self._remove_temps()

    def _remove_unused(self) -> list[str]:
        used_chains: set[str] = set()
        used_blobs: set[str] = set()
        for image in self.images():
            used_blobs.add(image.id)
            for layer in image.layers:
                used_chains.add(layer.chain_id)
                used_blobs.add(layer.digest)
        for container in self.containers():
            base = self.load_image(container["image"])
            if base:
                used_chains.update(layer.chain_id for layer in base.layers)
        removed = []
        for name in sorted(os.listdir(self._path("layers"))):
            if "sha256:" + name not in used_chains:
                remove_tree(self._path("layers", name))
                removed.append("layer sha256:" + name)
        for name in sorted(os.listdir(self._path("blobs", "sha256"))):
            if "sha256:" + name not in used_blobs:
                os.unlink(self._path("blobs", "sha256", name))
                removed.append("blob sha256:" + name)
        return removed

    # ---- containers ----------------------------------------------------------------------
    def container_dir(self, name: str) -> str:
        if not _NAME.match(name):
            raise StoreError(
                f"invalid container name {name!r}: letters, digits, '_', '.', '-' (max 128)"
            )
        return self._path("containers", name)

    def containers(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(os.listdir(self._path("containers"))):
            try:
                data = self._read_json("containers", name, "container.json")
            except NotADirectoryError:
                continue
            if data:
                out.append(data)
        return out

    def container(self, name: str) -> dict[str, Any]:
        data = self._read_json("containers", name, "container.json") if _NAME.match(name) else None
        if data is None:
            raise StoreError(f"no container {name!r} (see `dockyard container ls`)")
        return data

    def create_container(self, ref: str, name: str) -> dict[str, Any]:
        with self.sharing():
            directory = self.container_dir(name)
            if os.path.lexists(directory):
                raise StoreError(f"container {name!r} exists already")
            image = self.resolve(ref)
            work = self._path("tmp", f"container-{uuid.uuid4().hex}")
            os.mkdir(work, DIR_MODE)
            try:
                self.driver.create_container(work, self.layer_dirs(image))
                meta = {
                    "name": name,
                    "image": image.id,
                    "ref": ref,
                    "driver": self.driver.name,
                    "created": _now(),
                }
                with open(os.path.join(work, "container.json"), "w") as f:
                    json.dump(meta, f, indent=2, sort_keys=True)
                try:
                    os.rename(work, directory)
                except OSError as exc:
                    if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        raise StoreError(f"container {name!r} exists already") from exc
                    raise
                fsync_dir(self._path("containers"))
            except BaseException:
                remove_tree(work)
                raise
            return meta

    def mount(self, name: str) -> str:
        with self.sharing():
            meta = self.container(name)
            image = self._container_image(meta)
            return self.driver.mount(self.container_dir(name), self.layer_dirs(image))

    def umount(self, name: str) -> None:
        with self.sharing():
            self.container(name)
            self.driver.umount(self.container_dir(name))

    def _container_image(self, meta: dict[str, Any]) -> Image:
        image = self.load_image(meta["image"])
        if image is None:
            raise StoreError(f"the image of container {meta['name']} is gone from the store")
        return image

    def remove_container(self, name: str) -> None:
        with self.exclusive(f"container rm {name}"):
            self.container(name)
            directory = self.container_dir(name)
            self.driver.umount(directory)
            remove_tree(directory)

    def commit(self, name: str, ref: str, message: str = "", author: str = "") -> Image:
        """The container's changes as one new layer over its image, tagged `ref`."""
        with self.sharing():
            return self._commit(name, ref, message, author)

    def _commit(self, name: str, ref: str, message: str, author: str) -> Image:
        meta = self.container(name)
        base = self._container_image(meta)
        directory = self.container_dir(name)
        changes = list(self.driver.changes(directory, self.layer_dirs(base)))
        changed_root = self.driver.changed_root(directory)
        with self.temp_file("commit-") as (tar_path, tar_file):
            write_layer(changes, changed_root, tar_file)
            tar_file.flush()
            tar_file.seek(0)
            plain = HashingReader(tar_file)  # type: ignore[arg-type]
            with self.temp_file("commit-") as (gz_path, gz_file):
                digest = "sha256:" + gzip_parallel(plain, gz_file)
                gz_file.flush()
                size = os.path.getsize(gz_path)
                self.adopt_blob(gz_path, digest)
            diff_id = plain.digest
        parent_chain = base.layers[-1].chain_id if base.layers else None
        chain, _, _ = self.apply_blob(parent_chain, digest, diff_id, self.layer_dirs(base))
        docker = base.manifest_media_type == DOCKER_MANIFEST
        new_layer = LayerRef(digest, diff_id, chain, size, DOCKER_LAYER if docker else OCI_LAYER)
        config = json.loads(json.dumps(base.config))
        config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
        config["rootfs"]["diff_ids"] = list(config["rootfs"].get("diff_ids", [])) + [diff_id]
        created = _now()
        entry: dict[str, Any] = {
            "created": created,
            "created_by": f"dockyard container commit {name}",
        }
        if message:
            entry["comment"] = message
        if author:
            entry["author"] = author
        config["history"] = list(config.get("history", [])) + [entry]
        config["created"] = created
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        with self._meta.held():
            image = self.register(
                config_bytes, base.layers + [new_layer], base.manifest_media_type, ref
            )
            for layer in base.layers:
                if layer.digest in base.sources:
                    image.sources.setdefault(layer.digest, []).extend(
                        s
                        for s in base.sources[layer.digest]
                        if s not in image.sources.get(layer.digest, [])
                    )
            self.save_image(image)
        return image

    # ---- reports -----------------------------------------------------------------------
    def history(self, ref: str) -> list[dict[str, Any]]:
        """Newest first, as `docker history`: one row per history entry."""
        image = self.resolve(ref)
        rows = []
        layers = iter(image.layers)
        for entry in image.config.get("history", []):
            layer = None if entry.get("empty_layer") else next(layers, None)
            rows.append(
                {
                    "layer": layer.digest if layer else "<missing>",
                    "size": layer.size if layer else 0,
                    "created": entry.get("created", ""),
                    "created_by": entry.get("created_by", ""),
                    "comment": entry.get("comment", ""),
                }
            )
        for layer in layers:  # layers without history entries (imported tarballs)
            rows.append(
                {
                    "layer": layer.digest,
                    "size": layer.size,
                    "created": "",
                    "created_by": "",
                    "comment": "",
                }
            )
        return list(reversed(rows))

    def disk_usage(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for image in self.images():
            for layer in image.layers:
                counts[layer.chain_id] = counts.get(layer.chain_id, 0) + 1
        layers: list[dict[str, Any]] = []
        for chain, users in sorted(counts.items()):
            layers.append(
                {"chain_id": chain, "images": users, "bytes": _tree_size(self.layer_dir(chain))}
            )
        shared = sum(int(entry["bytes"]) for entry in layers if int(entry["images"]) > 1)
        containers = [
            {
                "name": c["name"],
                "bytes": _tree_size(self.driver.changed_root(self.container_dir(c["name"]))),
            }
            for c in self.containers()
        ]
        temps = self.temp_entries()
        return {
            "layers": layers,
            "shared_bytes": shared,
            "total_layer_bytes": sum(entry["bytes"] for entry in layers),
            "containers": containers,
            "temps": [vars(entry) for entry in temps],
            "temp_bytes": sum(entry.bytes for entry in temps),
        }

    def fsck(self) -> list[str]:
        """Re-verify every blob's digest and every layer's diff ID, and that other users are
        kept out; a list of problems."""
        report = self.fsck_report()
        return report.damage + report.unsafe

    def fsck_report(self) -> FsckReport:
        """`fsck` with its findings apart, and what tmp/ holds (not a problem: see TempEntry)."""
        report = FsckReport(temps=self.temp_entries(), unsafe=self._unsafe_dirs())
        with self.sharing():  # no removal while the digests are checked
            report.damage = self._damage()
        return report

    def _damage(self) -> list[str]:
        damage = []
        for name in sorted(os.listdir(self._path("blobs", "sha256"))):
            with open(self._path("blobs", "sha256", name), "rb") as f:
                if file_sha256(f) != name:
                    damage.append(f"blob sha256:{name}: content does not match its digest")
        for name in sorted(os.listdir(self._path("images"))):
            if not name.endswith(".json"):
                continue
            image_id = "sha256:" + name[: -len(".json")]
            try:
                image = self.load_image(image_id)
            except (StoreError, ValueError, KeyError, TypeError) as exc:
                damage.append(f"image {image_id}: {exc}")
                continue
            if image is None:
                continue
            for layer in image.layers:
                if not self.has_blob(layer.digest):
                    damage.append(f"image {image.id}: layer blob {layer.digest} is missing")
                    continue
                if not self.has_layer(layer.chain_id):
                    damage.append(f"image {image.id}: layer {layer.chain_id} is not extracted")
                with open(self.blob_path(layer.digest), "rb") as f:
                    try:
                        diff = _diff_id_of(f)
                    except LayerError as exc:
                        damage.append(f"layer blob {layer.digest}: {exc}")
                        continue
                if diff != layer.diff_id:
                    damage.append(
                        f"layer blob {layer.digest}: diff ID {diff}, expected {layer.diff_id}"
                    )
        return damage


def gzip_parallel(source: Any, out: IO[bytes]) -> str:
    """Gzip `source` into `out` as a series of gzip members compressed on every core (zlib
    releases the GIL), in order; a multi-member gzip is one valid stream for every reader.
    Returns the hex sha256 of what was written."""
    hasher = hashlib.sha256()

    def compress(block: bytes) -> bytes:
        packer = zlib.compressobj(COMMIT_GZIP_LEVEL, zlib.DEFLATED, 31)
        return packer.compress(block) + packer.flush()

    workers = max(os.cpu_count() or 1, 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[Any] = []
        while True:
            block = source.read(GZIP_BLOCK)
            if block:
                pending.append(pool.submit(compress, block))
            while pending and (len(pending) > workers or not block):
                data = pending.pop(0).result()
                hasher.update(data)
                out.write(data)
            if not block:
                break
    return hasher.hexdigest()


def _diff_id_of(f: IO[bytes]) -> str:
    try:
        stream, _ = decompressed(f)  # type: ignore[arg-type]
        hasher = hashlib.sha256()
        for chunk in iter(lambda: stream.read(1024 * 1024), b""):
            hasher.update(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise LayerError(f"cannot decompress: {exc}") from exc
    return "sha256:" + hasher.hexdigest()


def _tree_size(path: str) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for directory, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def normalize_ref(ref: str) -> str:
    """`host:port/repo` → `host:port/repo:latest`; digests and tags are kept as given."""
    if "@" in ref:
        return ref
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last else f"{ref}:latest"
