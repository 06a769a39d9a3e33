"""Repositories and the blobs linked into them (distribution's linkedBlobStore for `_layers`): a
blob is served from a repository only through its link there. Also the catalog, found by
listing the repositories tree. Driver errors become BlobUnknown here."""

from __future__ import annotations

from collections.abc import Iterator

from dockyard.registry import paths as p
from dockyard.registry.blobstore import BlobStore
from dockyard.registry.driver import StorageDriver
from dockyard.registry.errors import BlobUnknown, DigestInvalid, PathNotFound

# Directories that make their parent a repository (with uploads: one that only has uploads).
_REPO_MARKS = frozenset({"_manifests", "_layers"})
_UPLOAD_MARKS = _REPO_MARKS | {"_uploads"}


def link_digest(data: bytes) -> p.Digest:
    """The digest a link file holds."""
    return p.parse_digest(data.decode("ascii", "replace").strip())


class LinkedStore:
    """Repositories, and the blobs linked into each."""

    def __init__(self, driver: StorageDriver, blobs: BlobStore) -> None:
        self.driver = driver
        self.blobs = blobs

    # ---- repositories ------------------------------------------------------------------
    def repository_exists(self, name: str) -> bool:
        try:
            self.driver.stat(p.path_for(p.RepoRoot(name)))
        except PathNotFound:
            return False
        return True

    def catalog(self, with_uploads: bool = False) -> list[str]:
        """Every repository (a directory with _manifests or _layers — or _uploads too when
        `with_uploads`), sorted. Directories starting with '_' are never descended into."""
        marks = _UPLOAD_MARKS if with_uploads else _REPO_MARKS
        root = p.path_for(p.RepositoriesRoot())
        found: list[str] = []
        pending = [root]
        while pending:
            directory = pending.pop()
            try:
                entries = self.driver.list(directory)
            except PathNotFound:
                continue  # a file, or gone meanwhile
            names = [entry.rsplit("/", 1)[1] for entry in entries]
            if directory != root and marks.intersection(names):
                found.append(directory[len(root) + 1 :])
            pending.extend(e for e, n in zip(entries, names) if not n.startswith("_"))
        return sorted(found)

    # ---- linked blobs ------------------------------------------------------------------
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
        return self.blobs.size(digest)

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

    def layer_links(self, name: str) -> Iterator[tuple[p.Digest, p.Digest]]:
        """(digest the link's path names, digest it holds) of every `_layers` link of `name`;
        unreadable links are skipped."""
        try:
            infos = list(self.driver.walk(p.path_for(p.LayersRoot(name))))
        except PathNotFound:
            return
        for info in infos:
            if not info.path.endswith("/link"):
                continue
            try:
                yield p.digest_from_path(info.path), link_digest(self.driver.get_content(info.path))
            except (DigestInvalid, PathNotFound):
                continue

    def remove_layer_link(self, name: str, digest: p.Digest) -> None:
        """Remove the `_layers` link named by `digest` with its directory (gone: nothing)."""
        try:
            self.driver.delete(p.path_for(p.LayerDir(name, digest)))
        except PathNotFound:
            pass
