"""The registry's stores over one storage driver, as CNCF distribution layers them: the global
content-addressed blob store (`blobstore`), repositories with their linked blobs (`linkedstore`),
upload sessions (`uploadstore`) and manifests, tags and referrers (`manifeststore`). `Registry`
holds one of each over the same driver; `build_registry` makes it from a configuration, for
`serve` and `garbage-collect` alike. Driver errors become store errors in those modules, once."""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Optional

from dockyard.fsutil import TempSweep
from dockyard.registry import paths as p
from dockyard.registry.blobstore import BlobStore
from dockyard.registry.config import RegistryConfig
from dockyard.registry.driver import FilesystemDriver, StorageDriver
from dockyard.registry.errors import DriverError, PathNotFound, Unavailable
from dockyard.registry.linkedstore import LinkedStore
from dockyard.registry.manifeststore import MANIFEST_MAX, ManifestStore, media_type_of
from dockyard.registry.uploadstore import UploadAppender, UploadStatus, UploadStore

__all__ = [
    "MANIFEST_MAX",
    "Registry",
    "UploadAppender",
    "UploadStatus",
    "build_registry",
    "media_type_of",
]


@dataclass
class Registry:
    """Every store of one storage root. Thread-safe for the operations the HTTP layer uses."""

    driver: StorageDriver
    # storage.delete.enabled: whether the API may delete blobs and manifests (the garbage
    # collector deletes whatever this says)
    delete_enabled: bool = False
    blobs: BlobStore = field(init=False)
    linked: LinkedStore = field(init=False)
    uploads: UploadStore = field(init=False)
    manifests: ManifestStore = field(init=False)

    def __post_init__(self) -> None:
        self.blobs = BlobStore(self.driver)
        self.linked = LinkedStore(self.driver, self.blobs)
        self.uploads = UploadStore(self.driver, self.blobs, self.linked)
        self.manifests = ManifestStore(self.driver, self.blobs, self.linked)

    # ---- what callers outside the HTTP layer use (tools, tests) -----------------------------
    def catalog(self, with_uploads: bool = False) -> list[str]:
        return self.linked.catalog(with_uploads)

    def start_upload(self, name: str) -> UploadStatus:
        return self.uploads.start(name)

    def upload_status(self, name: str, upload_id: str) -> UploadStatus:
        return self.uploads.status(name, upload_id)

    def append_upload(
        self, name: str, upload_id: str, start: Optional[int] = None
    ) -> AbstractContextManager[UploadAppender]:
        return self.uploads.append(name, upload_id, start)

    def finish_upload(self, name: str, upload_id: str, expected: p.Digest) -> p.Digest:
        return self.uploads.finish(name, upload_id, expected)

    def forget_gone_uploads(self) -> int:
        return self.uploads.forget_gone()

    def gc_lock(self, exclusive: bool) -> AbstractContextManager[None]:
        return self.manifests.gc_lock(exclusive)

    # ---- storage health ----------------------------------------------------------------
    def check_storage(self) -> None:
        """Unavailable unless the storage answers now (the health check: `driver.probe`)."""
        try:
            self.driver.probe()
        except (OSError, DriverError) as exc:
            raise Unavailable(message=f"{type(exc).__name__}: {exc}") from exc

    # ---- garbage collection totals (the metrics read them; gc.collect adds to them) --------
    def gc_stats(self) -> dict[str, int]:
        """Garbage collections run on this storage root, and what they removed, in all."""
        stats = {"runs": 0, "blobs_swept": 0, "manifests_deleted": 0}
        try:
            recorded = json.loads(self.driver.get_content(p.path_for(p.GCStats())))
        except (PathNotFound, ValueError):
            return stats
        if isinstance(recorded, dict):
            for key in stats:
                value = recorded.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    stats[key] = value
        return stats

    def record_gc(self, blobs_swept: int, manifests_deleted: int) -> None:
        """Add one garbage collection to the totals (call it under the exclusive GC lock)."""
        stats = self.gc_stats()
        stats["runs"] += 1
        stats["blobs_swept"] += blobs_swept
        stats["manifests_deleted"] += manifests_deleted
        self.driver.put_content(p.path_for(p.GCStats()), json.dumps(stats).encode())

    def sweep_temp_files(self, older_than: float, remove: bool) -> TempSweep:
        """Remove (or only find) temp files killed writers left, older than `older_than`."""
        return self.driver.sweep_stale(older_than, remove)


def build_registry(config: RegistryConfig, create: bool = True) -> Registry:
    """The registry a configuration describes (its storage driver and stores), for `serve`
    (`create`: the storage root is made when missing) and `garbage-collect` (never made)."""
    if create:
        os.makedirs(config.rootdirectory, exist_ok=True)
    return Registry(FilesystemDriver(config.rootdirectory), config.delete_enabled)
