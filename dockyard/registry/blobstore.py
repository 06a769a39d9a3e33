"""The global, content-addressed blob store (distribution's blobStore): a blob's bytes under its
digest, shared by every repository, written once. Driver errors become BlobUnknown here."""

from __future__ import annotations

from typing import BinaryIO

from dockyard.registry import paths as p
from dockyard.registry.driver import StorageDriver
from dockyard.registry.errors import BlobUnknown, DigestInvalid, PathNotFound


class BlobStore:
    """Blobs by digest, over one storage driver."""

    def __init__(self, driver: StorageDriver) -> None:
        self.driver = driver

    @staticmethod
    def _unknown(digest: p.Digest) -> BlobUnknown:
        return BlobUnknown({"digest": str(digest)})

    def size(self, digest: p.Digest) -> int:
        try:
            return self.driver.stat(p.path_for(p.BlobData(digest))).size
        except PathNotFound as exc:
            raise self._unknown(digest) from exc

    def modified(self, digest: p.Digest) -> float:
        """When the blob was written (its data file's modification time)."""
        try:
            return self.driver.stat(p.path_for(p.BlobData(digest))).mtime
        except PathNotFound as exc:
            raise self._unknown(digest) from exc

    def exists(self, digest: p.Digest) -> bool:
        try:
            self.driver.stat(p.path_for(p.BlobData(digest)))
        except PathNotFound:
            return False
        return True

    def open(self, digest: p.Digest, offset: int = 0) -> BinaryIO:
        try:
            return self.driver.reader(p.path_for(p.BlobData(digest)), offset)
        except PathNotFound as exc:
            raise self._unknown(digest) from exc

    def content(self, digest: p.Digest) -> bytes:
        try:
            return self.driver.get_content(p.path_for(p.BlobData(digest)))
        except PathNotFound as exc:
            raise self._unknown(digest) from exc

    def put(self, digest: p.Digest, data: bytes) -> None:
        """Store `data` (whose digest the caller computed) unless the blob exists already."""
        if not self.exists(digest):
            self.driver.put_content(p.path_for(p.BlobData(digest)), data)

    def delete(self, digest: p.Digest) -> None:
        """Remove the blob with its directory (garbage collection only)."""
        try:
            self.driver.delete(p.path_for(p.BlobDir(digest)))
        except PathNotFound as exc:
            raise self._unknown(digest) from exc

    def digests(self) -> list[p.Digest]:
        """Every blob on storage, sorted by algorithm, prefix and hex (what the directory
        names say: anything that is no valid digest's directory is skipped)."""
        out: list[p.Digest] = []
        for algorithm in self._list(p.path_for(p.BlobsRoot())):
            if algorithm.rsplit("/", 1)[1] not in p.ALGORITHMS:
                continue
            for prefix in self._list(algorithm):
                for directory in self._list(prefix):
                    try:
                        out.append(p.digest_from_path(directory))
                    except DigestInvalid:
                        continue
        return out

    def _list(self, path: str) -> list[str]:
        try:
            return self.driver.list(path)
        except PathNotFound:
            return []
