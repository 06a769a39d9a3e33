"""Garbage collection on the in-memory driver, whose clock ages what is written: the mark and
sweep through the store's API only, the grace period for blobs and for untagged manifests (with
what they reference), the `_layers` links of swept blobs, dry runs, and a manifest pushed while
marking runs."""

from __future__ import annotations

import json

import pytest

from dockyard.mediatypes import OCI_INDEX, OCI_MANIFEST
from dockyard.registry import gc
from dockyard.registry.memdriver import MemoryDriver
from dockyard.registry.store import Registry
from tests.unit.test_registry_store import Clock, digest_of, image_manifest, push_blob

HOUR = 3600.0


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.offset = -2 * HOUR  # everything written is old, until a test says otherwise
    return clock


@pytest.fixture
def registry(clock: Clock) -> Registry:
    return Registry(MemoryDriver(clock))


def quiet(_line: str) -> None:
    pass


def test_unreferenced_old_blobs_are_swept_and_the_rest_kept(
    registry: Registry, clock: Clock
) -> None:
    config, layer = push_blob(registry, "app", b"{}"), push_blob(registry, "app", b"layer")
    orphan = push_blob(registry, "app", b"orphan")
    registry.manifests.put("app", "v1", image_manifest(config, [layer]), OCI_MANIFEST)
    clock.offset = 0.0
    young = push_blob(registry, "app", b"young orphan")  # its manifest may be on its way
    result = gc.collect(registry, log=quiet)
    assert result.deleted_blobs == [str(orphan)]
    assert result.kept_young == [str(young)]
    assert not registry.blobs.exists(orphan)
    assert {config, layer, young} <= set(registry.blobs.digests())
    # the swept blob's _layers link went with it (distribution leaves it dangling)
    assert not registry.linked.repo_has_blob("app", orphan)
    assert [held for _, held in registry.linked.layer_links("app")].count(orphan) == 0


def test_a_dry_run_deletes_nothing(registry: Registry) -> None:
    orphan = push_blob(registry, "app", b"orphan")
    result = gc.collect(registry, dry_run=True, log=quiet)
    assert result.deleted_blobs == [str(orphan)]
    assert registry.blobs.exists(orphan)
    assert registry.linked.repo_has_blob("app", orphan)


def test_untagged_manifests_go_with_delete_untagged_unless_young(
    registry: Registry, clock: Clock
) -> None:
    config = push_blob(registry, "app", b"{}")
    old_layer, young_layer = push_blob(registry, "app", b"old"), push_blob(registry, "app", b"new")
    untagged_old = image_manifest(config, [old_layer])
    old_digest, _ = registry.manifests.put("app", str(digest_of(untagged_old)), untagged_old, "")
    clock.offset = 0.0
    child = image_manifest(config, [young_layer])
    child_digest, _ = registry.manifests.put("app", str(digest_of(child)), child, OCI_MANIFEST)
    result = gc.collect(registry, delete_untagged=True, log=quiet)
    assert result.deleted_manifests == [("app", str(old_digest))]
    assert result.kept_young_manifests == [("app", str(child_digest))]
    assert str(old_layer) in result.deleted_blobs
    assert registry.blobs.exists(young_layer) and registry.blobs.exists(config)
    assert registry.manifests.has_revision("app", child_digest)


def test_a_tagged_index_keeps_its_old_untagged_children(registry: Registry) -> None:
    config, layer = push_blob(registry, "app", b"{}"), push_blob(registry, "app", b"layer")
    child = image_manifest(config, [layer])
    child_digest, _ = registry.manifests.put("app", str(digest_of(child)), child, OCI_MANIFEST)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": str(child_digest), "size": 1}],
        }
    ).encode()
    registry.manifests.put("app", "multi", index, OCI_INDEX)
    result = gc.collect(registry, delete_untagged=True, log=quiet)
    assert result.deleted_manifests == [] and result.deleted_blobs == []
    assert registry.blobs.exists(layer)


def test_a_manifest_pushed_while_marking_keeps_what_it_references(registry: Registry) -> None:
    config = push_blob(registry, "app", b"{}")
    registry.manifests.put("app", "v1", image_manifest(config, []), OCI_MANIFEST)
    late_layer = push_blob(registry, "app", b"pushed before its manifest")
    pushed: list[str] = []

    def log(line: str) -> None:
        if "marking manifest" in line and not pushed:  # marking has begun: a push arrives
            raw = image_manifest(config, [late_layer])
            pushed.append(str(registry.manifests.put("app", "v2", raw, OCI_MANIFEST)[0]))

    result = gc.collect(registry, log=log)
    assert pushed
    assert result.deleted_blobs == []
    assert registry.blobs.exists(late_layer)


def test_gc_goes_through_the_store_not_around_it(registry: Registry) -> None:
    """A driver with no local paths at all (the memory driver) collects like the filesystem."""
    orphan = push_blob(registry, "lib/deep/app", b"orphan")
    assert not hasattr(registry.driver, "local_path")
    result = gc.collect(registry, grace_seconds=HOUR, log=quiet)
    assert result.deleted_blobs == [str(orphan)]
    assert registry.catalog() == ["lib/deep/app"]
