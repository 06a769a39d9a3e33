"""Garbage collection, mark and sweep over distribution's layout — and safe while the registry
keeps serving pushes: blobs younger than a grace period are never swept (an upload whose
manifest has not arrived yet), and the sweep runs under an exclusive lock that manifest writers
share, after marking again every manifest written since marking began."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Callable

from dockyard.registry import paths as p
from dockyard.registry.errors import (
    BlobUnknown,
    DigestInvalid,
    ManifestInvalid,
    ManifestUnknown,
    PathNotFound,
)
from dockyard.registry.manifest import parse_manifest
from dockyard.registry.store import Registry, media_type_of

# Default age below which an unreferenced blob is kept (its manifest may be on its way).
DEFAULT_GRACE_SECONDS = 3600.0


@dataclass
class GCResult:
    marked: set[str] = field(default_factory=set)
    deleted_blobs: list[str] = field(default_factory=list)
    kept_young: list[str] = field(default_factory=list)
    deleted_manifests: list[tuple[str, str]] = field(default_factory=list)


def _revisions(registry: Registry, name: str) -> list[p.Digest]:
    out: list[p.Digest] = []
    try:
        infos = list(registry.driver.walk(p.path_for(p.RevisionsRoot(name))))
    except PathNotFound:
        return out
    for info in infos:
        if not info.path.endswith("/link"):
            continue
        try:
            out.append(p.parse_digest(registry.driver.get_content(info.path).decode().strip()))
        except (DigestInvalid, PathNotFound, UnicodeDecodeError):
            continue
    return out


def _tagged(registry: Registry, name: str) -> set[p.Digest]:
    out: set[p.Digest] = set()
    try:
        tags = registry.tags(name)
    except ManifestUnknown:
        return out
    for tag in tags:
        try:
            out.add(registry.resolve(name, tag))
        except (ManifestUnknown, DigestInvalid):
            continue
    return out


class _Marker:
    def __init__(self, registry: Registry, log: Callable[[str], None]) -> None:
        self.registry = registry
        self.log = log
        self.marked: set[str] = set()

    def mark_manifests(self, name: str, digests: Iterable[p.Digest]) -> None:
        pending = list(digests)
        seen: set[p.Digest] = set()
        while pending:
            digest = pending.pop()
            if digest in seen:
                continue
            seen.add(digest)
            try:
                raw = self.registry.blob_content(digest)
                manifest = parse_manifest(raw, media_type_of(raw))
            except (BlobUnknown, ManifestInvalid):
                self.log(f"{name}: manifest {digest} is missing or unreadable, skipped")
                continue
            self.log(f"{name}: marking manifest {digest}")
            self.marked.add(str(digest))
            for blob in manifest.blobs:
                self.marked.add(str(blob))
            pending.extend(manifest.manifests)


def _keep_set(
    registry: Registry, name: str, revisions: set[p.Digest], delete_untagged: bool
) -> tuple[set[p.Digest], set[p.Digest]]:
    """(manifests to keep, manifests to delete) of one repository."""
    if not delete_untagged:
        return revisions, set()
    keep = set(_tagged(registry, name)) & revisions
    changed = True
    while changed:
        changed = False
        for digest in list(keep):
            try:
                raw = registry.blob_content(digest)
                manifest = parse_manifest(raw, media_type_of(raw))
            except (BlobUnknown, ManifestInvalid):
                continue
            children = set(manifest.manifests) & revisions
            referrers = {
                p.parse_digest(d["digest"]) for d in registry.referrers(name, digest)
            } & revisions
            new = (children | referrers) - keep
            if new:
                keep |= new
                changed = True
    return keep, revisions - keep


def collect(
    registry: Registry,
    dry_run: bool = False,
    delete_untagged: bool = False,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    log: Callable[[str], None] = print,
) -> GCResult:
    """Mark every blob a kept manifest references, then sweep the rest (older than grace)."""
    marker = _Marker(registry, log)
    result = GCResult()
    doomed: list[tuple[str, p.Digest]] = []
    seen: dict[str, set[p.Digest]] = {}
    for name in registry.catalog():
        seen[name] = set(_revisions(registry, name))
        keep, delete = _keep_set(registry, name, seen[name], delete_untagged)
        marker.mark_manifests(name, keep)
        doomed += [(name, d) for d in sorted(delete, key=str)]

    with registry.gc_lock(exclusive=True):
        # Manifests written while we marked are kept, with everything they reference.
        for name in registry.catalog():
            fresh = set(_revisions(registry, name)) - seen.get(name, set())
            marker.mark_manifests(name, fresh)
            if delete_untagged:
                tagged_now = _tagged(registry, name)
                doomed = [
                    (n, d)
                    for n, d in doomed
                    if n != name or (d not in tagged_now and d not in fresh)
                ]
        for name, digest in doomed:
            if str(digest) in marker.marked:
                continue
            log(f"{name}: manifest eligible for deletion: {digest}")
            result.deleted_manifests.append((name, str(digest)))
            if not dry_run:
                try:
                    registry.delete_manifest(name, str(digest))
                except (ManifestUnknown, PathNotFound):
                    pass
        for blob in _all_blobs(registry):
            if str(blob) in marker.marked:
                continue
            path = p.path_for(p.BlobData(blob))
            try:
                age = time.time() - registry.driver.stat(path).mtime
            except PathNotFound:
                continue
            if age < grace_seconds:
                result.kept_young.append(str(blob))
                continue
            log(f"blob eligible for deletion: {blob}")
            result.deleted_blobs.append(str(blob))
            if not dry_run:
                try:
                    registry.driver.delete(path.rsplit("/", 1)[0])
                except PathNotFound:
                    pass
        if result.deleted_blobs and not dry_run:
            _drop_dangling_layer_links(registry, log)
    result.marked = marker.marked
    log(
        f"{len(marker.marked)} blobs marked, {len(result.deleted_blobs)} blobs and "
        f"{len(result.deleted_manifests)} manifests eligible for deletion"
        + (
            f", {len(result.kept_young)} unreferenced blobs younger than the grace period kept"
            if result.kept_young
            else ""
        )
        + (" (dry run: nothing deleted)" if dry_run else "")
    )
    return result


def _drop_dangling_layer_links(registry: Registry, log: Callable[[str], None]) -> None:
    """Remove `_layers` links whose blob was swept (distribution 2.8 leaves them dangling)."""
    for name in registry.catalog(with_uploads=True):
        try:
            infos = list(registry.driver.walk(p.path_for(p.LayersRoot(name))))
        except PathNotFound:
            continue
        for info in infos:
            if not info.path.endswith("/link"):
                continue
            try:
                digest = p.parse_digest(registry.driver.get_content(info.path).decode().strip())
            except (DigestInvalid, PathNotFound, UnicodeDecodeError):
                continue
            if not registry.blob_exists(digest):
                registry.driver.delete(info.path.rsplit("/", 1)[0])
                log(f"{name}: removed the link to swept blob {digest}")


def _all_blobs(registry: Registry) -> list[p.Digest]:
    root = registry.driver.local_path(p.path_for(p.BlobsRoot()))
    out: list[p.Digest] = []
    if root is None or not os.path.isdir(root):
        return out
    for algorithm in sorted(os.listdir(root)):
        if algorithm not in p.ALGORITHMS:
            continue
        for prefix in sorted(os.listdir(os.path.join(root, algorithm))):
            directory = os.path.join(root, algorithm, prefix)
            if not os.path.isdir(directory):
                continue
            for hexdigest in sorted(os.listdir(directory)):
                try:
                    out.append(p.parse_digest(f"{algorithm}:{hexdigest}"))
                except DigestInvalid:
                    continue
    return out
