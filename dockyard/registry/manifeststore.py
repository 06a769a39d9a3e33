"""Manifests, tags and referrers of each repository (distribution's manifestStore and tagStore):
a manifest is a blob linked as a revision, a tag a link to a revision, a referrer a link under
its subject. Writers share the garbage collector's lock. Driver errors become ManifestUnknown
or NameUnknown here."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

from dockyard.mediatypes import OCI_INDEX, OCI_MANIFEST, OCTET_STREAM
from dockyard.registry import paths as p
from dockyard.registry.blobstore import BlobStore
from dockyard.registry.driver import StorageDriver
from dockyard.registry.errors import (
    BlobUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    PathNotFound,
    TooLarge,
)
from dockyard.registry.linkedstore import LinkedStore, link_digest
from dockyard.registry.manifest import Manifest, parse_manifest

# Largest manifest accepted (OCI distribution spec: registries accept at least 4 MiB).
MANIFEST_MAX = 4 * 1024 * 1024


def media_type_of(raw: bytes) -> str:
    """The media type a stored manifest is served with."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return OCTET_STREAM
    media = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(media, str) and media:
        return media
    if isinstance(doc, dict) and "manifests" in doc:
        return OCI_INDEX
    return OCI_MANIFEST


def _manifest_digest(reference: str, raw: bytes) -> tuple[p.Digest, Optional[str]]:
    """(digest of `raw`, tag) for a PUT to `reference`: a digest reference must be the body's."""
    digest = p.Digest("sha256", hashlib.sha256(raw).hexdigest())
    if ":" not in reference:
        return digest, p.validate_tag(reference)
    wanted = p.parse_digest(reference)
    if wanted.algorithm != "sha256":
        digest = p.Digest(wanted.algorithm, hashlib.new(wanted.algorithm, raw).hexdigest())
    if digest != wanted:
        raise DigestInvalid({"expected": reference, "actual": str(digest)})
    return digest, None


class ManifestStore:
    """Manifests by tag or digest, tags and referrers, per repository."""

    def __init__(self, driver: StorageDriver, blobs: BlobStore, linked: LinkedStore) -> None:
        self.driver = driver
        self.blobs = blobs
        self.linked = linked

    @contextmanager
    def gc_lock(self, exclusive: bool) -> Iterator[None]:
        """Shared for manifest writers, exclusive for a sweeping garbage collector."""
        with self.driver.lock(p.path_for(p.GCLock()), exclusive):
            yield

    def resolve(self, name: str, reference: str) -> p.Digest:
        """Digest of a tag or digest reference in `name`."""
        if ":" in reference:
            digest = p.parse_digest(reference)
            if not self.has_revision(name, digest):
                raise ManifestUnknown({"reference": reference})
            return digest
        p.validate_tag(reference)
        try:
            data = self.driver.get_content(p.path_for(p.TagCurrentLink(name, reference)))
        except PathNotFound as exc:
            if not self.linked.repository_exists(name):
                raise NameUnknown({"name": name}) from exc
            raise ManifestUnknown({"tag": reference}) from exc
        return link_digest(data)

    def get(self, name: str, reference: str) -> tuple[p.Digest, bytes, str]:
        """(digest, raw bytes, media type) of a manifest by tag or digest."""
        digest = self.resolve(name, reference)
        try:
            raw = self.blobs.content(digest)
        except BlobUnknown as exc:
            raise ManifestUnknown({"reference": reference}) from exc
        return digest, raw, media_type_of(raw)

    def put(
        self, name: str, reference: str, raw: bytes, content_type: str
    ) -> tuple[p.Digest, Manifest]:
        if len(raw) > MANIFEST_MAX:
            raise TooLarge({"size": len(raw), "limit": MANIFEST_MAX})
        manifest = parse_manifest(raw, content_type, strict=True)
        digest, tag = _manifest_digest(reference, raw)
        link = str(digest).encode()
        with self.gc_lock(exclusive=False):
            missing = [str(d) for d in manifest.blobs if not self.linked.repo_has_blob(name, d)]
            missing += [
                str(d)
                for d in manifest.manifests
                if not self.has_revision(name, d) or not self.blobs.exists(d)
            ]
            if missing:
                raise ManifestBlobUnknown({"missing": missing[:20]})
            self.blobs.put(digest, raw)
            # Written anew on every PUT, even when it exists: its mtime dates the push for the
            # garbage collector's grace period (gc.py keeps manifests pushed within it).
            self.driver.put_content(p.path_for(p.RevisionLink(name, digest)), link)
            if manifest.subject is not None:
                spec = p.ReferrerLink(name, manifest.subject, digest)
                self.driver.put_content(p.path_for(spec), link)
            if tag is not None:
                self.driver.put_content(p.path_for(p.TagIndexLink(name, tag, digest)), link)
                self.driver.put_content(p.path_for(p.TagCurrentLink(name, tag)), link)
        return digest, manifest

    def has_revision(self, name: str, digest: p.Digest) -> bool:
        try:
            self.driver.stat(p.path_for(p.RevisionLink(name, digest)))
        except PathNotFound:
            return False
        return True

    def delete(self, name: str, reference: str) -> None:
        """Remove a tag, or a manifest revision with every tag on it and its referrer link."""
        digest = self.resolve(name, reference)
        if ":" not in reference:
            self._delete(p.TagRoot(name, reference))
            return
        try:
            raw = self.blobs.content(digest)
            manifest: Optional[Manifest] = parse_manifest(raw, media_type_of(raw))
        except (BlobUnknown, ManifestInvalid):
            manifest = None
        for tag in self.tags(name):
            try:
                current = self.resolve(name, tag)
            except ManifestUnknown:
                continue
            if current == digest:
                self._delete(p.TagRoot(name, tag))
        self._delete(p.RevisionDir(name, digest))
        if manifest is not None and manifest.subject is not None:
            try:
                self._delete(p.ReferrerDir(name, manifest.subject, digest))
            except ManifestUnknown:
                pass

    def _delete(self, spec: p.PathSpec) -> None:
        try:
            self.driver.delete(p.path_for(spec))
        except PathNotFound as exc:  # deleted meanwhile by another request
            raise ManifestUnknown({"path": type(spec).__name__}) from exc

    def tags(self, name: str) -> list[str]:
        try:
            entries = self.driver.list(p.path_for(p.TagsRoot(name)))
        except PathNotFound as exc:
            if not self.linked.repository_exists(name):
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

    def revisions(self, name: str) -> dict[p.Digest, float]:
        """Every manifest revision of `name` → when it was last pushed: the modification time
        of its revision link, which every manifest PUT (by digest or by tag) writes anew."""
        out: dict[p.Digest, float] = {}
        try:
            infos = list(self.driver.walk(p.path_for(p.RevisionsRoot(name))))
        except PathNotFound:
            return out
        for info in infos:
            if not info.path.endswith("/link"):
                continue
            try:
                digest = link_digest(self.driver.get_content(info.path))
            except (DigestInvalid, PathNotFound):
                continue
            out[digest] = max(info.mtime, out.get(digest, info.mtime))
        return out

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
                digest = link_digest(self.driver.get_content(info.path))
                if not self.has_revision(name, digest):
                    continue
                raw = self.blobs.content(digest)
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
