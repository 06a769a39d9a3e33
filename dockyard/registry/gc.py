"""Garbage collection, mark and sweep over distribution's layout — and safe while the registry
keeps serving pushes: blobs younger than a grace period are never swept (an upload whose
manifest has not arrived yet), untagged manifests pushed within it are kept with everything they
reference (the children of an index still being pushed), and the sweep runs under an exclusive
lock that manifest writers share, after marking again every manifest written, tagged or pushed
again since marking began."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Callable

from dockyard.registry import paths as p
from dockyard.registry.errors import BlobUnknown, DigestInvalid, ManifestInvalid, ManifestUnknown
from dockyard.registry.manifest import parse_manifest
from dockyard.registry.manifeststore import media_type_of
from dockyard.registry.store import Registry

# Default age below which an unreferenced blob, or an untagged manifest, is kept (the manifest
# or index that will reference it may be on its way).
DEFAULT_GRACE_SECONDS = 3600.0


@dataclass
class GCResult:
    marked: set[str] = field(default_factory=set)
    deleted_blobs: list[str] = field(default_factory=list)
    kept_young: list[str] = field(default_factory=list)
    deleted_manifests: list[tuple[str, str]] = field(default_factory=list)
    # untagged manifests (repository, digest) kept because they were pushed within the grace
    kept_young_manifests: list[tuple[str, str]] = field(default_factory=list)


def _young(revisions: dict[p.Digest, float], grace_seconds: float) -> set[p.Digest]:
    """The revisions pushed less than `grace_seconds` ago (a clock ahead makes them young)."""
    now = time.time()
    return {digest for digest, pushed in revisions.items() if now - pushed < grace_seconds}


def _tagged(registry: Registry, name: str) -> set[p.Digest]:
    out: set[p.Digest] = set()
    try:
        tags = registry.manifests.tags(name)
    except ManifestUnknown:
        return out
    for tag in tags:
        try:
            out.add(registry.manifests.resolve(name, tag))
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
                raw = self.registry.blobs.content(digest)
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
    registry: Registry,
    name: str,
    revisions: dict[p.Digest, float],
    delete_untagged: bool,
    grace_seconds: float,
) -> tuple[set[p.Digest], set[p.Digest]]:
    """(manifests to keep, manifests to delete) of one repository: with `delete_untagged`, the
    tagged ones and those pushed within the grace period are kept, with their closure."""
    if not delete_untagged:
        return set(revisions), set()
    roots = (_tagged(registry, name) | _young(revisions, grace_seconds)) & set(revisions)
    keep = _closure(registry, name, roots, set(revisions))
    return keep, set(revisions) - keep


def _closure(
    registry: Registry, name: str, roots: set[p.Digest], revisions: set[p.Digest]
) -> set[p.Digest]:
    """`roots` with every revision of `name` they reach: index children and referrers."""
    keep = set(roots)
    pending = list(roots)
    while pending:
        digest = pending.pop()
        try:
            raw = registry.blobs.content(digest)
            manifest = parse_manifest(raw, media_type_of(raw))
        except (BlobUnknown, ManifestInvalid):
            continue
        children = set(manifest.manifests) & revisions
        referrers = {
            p.parse_digest(d["digest"]) for d in registry.manifests.referrers(name, digest)
        } & revisions
        new = (children | referrers) - keep
        keep |= new
        pending.extend(new)
    return keep


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
    doomed: dict[str, set[p.Digest]] = {}
    seen: dict[str, set[p.Digest]] = {}
    for name in registry.catalog():
        revisions = registry.manifests.revisions(name)
        seen[name] = set(revisions)
        keep, doomed[name] = _keep_set(registry, name, revisions, delete_untagged, grace_seconds)
        if delete_untagged:
            young = sorted(_young(revisions, grace_seconds) - _tagged(registry, name), key=str)
            result.kept_young_manifests += [(name, str(d)) for d in young]
        marker.mark_manifests(name, keep)

    with registry.gc_lock(exclusive=True):
        # No manifest PUT runs from here on. Kept, with everything they reference: manifests
        # written while we marked, and doomed ones tagged or pushed again meanwhile (a PUT
        # writes the revision link anew, so the push is within the grace period again). A
        # manifest pushed less than the grace period before this point is thus never deleted,
        # and an index PUT after the sweep finds every child pushed within it.
        for name in registry.catalog():
            revisions = registry.manifests.revisions(name)
            fresh = set(revisions) - seen.get(name, set())
            rescued: set[p.Digest] = set()
            if doomed.get(name):
                now_kept = _tagged(registry, name) | _young(revisions, grace_seconds)
                rescued = doomed[name] & now_kept
            roots = fresh | rescued
            if delete_untagged and roots:
                roots = _closure(registry, name, roots, set(revisions))
            marker.mark_manifests(name, roots)
        for name, digest in [(n, d) for n in sorted(doomed) for d in sorted(doomed[n], key=str)]:
            if str(digest) in marker.marked:
                continue
            log(f"{name}: manifest eligible for deletion: {digest}")
            result.deleted_manifests.append((name, str(digest)))
            if not dry_run:
                try:
                    registry.manifests.delete(name, str(digest))
                except ManifestUnknown:
                    pass
        for blob in registry.blobs.digests():
            if str(blob) in marker.marked:
                continue
            try:
                age = time.time() - registry.blobs.modified(blob)
            except BlobUnknown:
                continue
            if age < grace_seconds:
                result.kept_young.append(str(blob))
                continue
            log(f"blob eligible for deletion: {blob}")
            result.deleted_blobs.append(str(blob))
            if not dry_run:
                try:
                    registry.blobs.delete(blob)
                except BlobUnknown:
                    pass
        if result.deleted_blobs and not dry_run:
            _drop_dangling_layer_links(registry, log)
        if not dry_run:
            registry.record_gc(len(result.deleted_blobs), len(result.deleted_manifests))
    result.marked = marker.marked
    log(
        f"{len(marker.marked)} blobs marked, {len(result.deleted_blobs)} blobs and "
        f"{len(result.deleted_manifests)} manifests eligible for deletion"
        + (
            f", {len(result.kept_young)} unreferenced blobs younger than the grace period kept"
            if result.kept_young
            else ""
        )
        + (
            f", {len(result.kept_young_manifests)} untagged manifests pushed within the grace"
            " period kept"
            if result.kept_young_manifests
            else ""
        )
        + (" (dry run: nothing deleted)" if dry_run else "")
    )
    return result


def _drop_dangling_layer_links(registry: Registry, log: Callable[[str], None]) -> None:
    """Remove `_layers` links whose blob was swept (distribution 2.8 leaves them dangling)."""
    for name in registry.catalog(with_uploads=True):
        for named, digest in list(registry.linked.layer_links(name)):
            if not registry.blobs.exists(digest):
                registry.linked.remove_layer_link(name, named)
                log(f"{name}: removed the link to swept blob {digest}")
