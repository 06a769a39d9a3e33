"""The registry's stores on the in-memory driver: blobs, linked blobs and the catalog, uploads
(chunks whole or not at all, the lock, finishing, purging) and manifests, tags and referrers —
with driver errors arriving as the store's typed errors, and the layout distribution's."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any

import pytest

from dockyard.mediatypes import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST
from dockyard.registry import paths as p
from dockyard.registry.errors import (
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestUnknown,
    NameUnknown,
    PathNotFound,
    RangeInvalid,
    TooLarge,
    Unavailable,
)
from dockyard.registry.manifeststore import MANIFEST_MAX
from dockyard.registry.memdriver import MemoryDriver
from dockyard.registry.store import Registry


class Clock:
    """A settable clock for the memory driver (files written 'long ago')."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def digest_of(data: bytes) -> p.Digest:
    return p.Digest("sha256", hashlib.sha256(data).hexdigest())


def push_blob(registry: Registry, name: str, data: bytes) -> p.Digest:
    status = registry.uploads.start(name)
    with registry.uploads.append(name, status.upload_id) as appender:
        appender.write(data)
    return registry.uploads.finish(name, status.upload_id, digest_of(data))


def image_manifest(config: p.Digest, layers: list[p.Digest], **extra: Any) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": str(config), "size": 1},
        "layers": [{"mediaType": OCI_LAYER, "digest": str(d), "size": 1} for d in layers],
        **extra,
    }
    return json.dumps(doc).encode()


@pytest.fixture
def registry() -> Registry:
    return Registry(MemoryDriver())


def test_blob_errors_are_the_store_s_not_the_driver_s(registry: Registry) -> None:
    missing = digest_of(b"nothing")
    for call in (
        lambda: registry.blobs.size(missing),
        lambda: registry.blobs.content(missing),
        lambda: registry.blobs.open(missing),
        lambda: registry.blobs.delete(missing),
        lambda: registry.linked.repo_blob_size("app", missing),
        lambda: registry.linked.unlink_blob("app", missing),
    ):
        with pytest.raises(BlobUnknown) as caught:
            call()
        assert isinstance(caught.value.__cause__, PathNotFound)


def test_a_blob_is_served_from_a_repository_only_through_its_link(registry: Registry) -> None:
    digest = push_blob(registry, "one", b"layer bytes")
    assert registry.linked.repo_blob_size("one", digest) == len(b"layer bytes")
    assert registry.blobs.exists(digest)
    with pytest.raises(BlobUnknown):
        registry.linked.repo_blob_size("two", digest)  # the blob exists, but not in "two"
    assert not registry.linked.mount_blob("two", "three", digest)  # "three" lacks it
    assert registry.linked.mount_blob("two", "one", digest)
    assert registry.linked.repo_blob_size("two", digest) == len(b"layer bytes")


def test_blob_digests_come_from_the_layout_and_skip_what_is_no_blob(registry: Registry) -> None:
    digests = {push_blob(registry, "app", data) for data in (b"a", b"b", b"c")}
    driver = registry.driver
    driver.put_content(f"{p.ROOT_PREFIX}/blobs/sha256/zz/not-a-digest/data", b"x")
    driver.put_content(f"{p.ROOT_PREFIX}/blobs/md5/ab/{'ab' * 16}/data", b"x")
    wrong_prefix = "cd" + "ab" * 31
    driver.put_content(f"{p.ROOT_PREFIX}/blobs/sha256/ab/{wrong_prefix}/data", b"x")
    assert set(registry.blobs.digests()) == digests


def test_the_catalog_finds_nested_repositories_only(registry: Registry) -> None:
    push_blob(registry, "lib/app", b"1")
    push_blob(registry, "lib/app/sub", b"2")
    push_blob(registry, "zeta", b"3")
    registry.uploads.start("only/uploads")
    assert registry.catalog() == ["lib/app", "lib/app/sub", "zeta"]
    assert registry.catalog(with_uploads=True) == ["lib/app", "lib/app/sub", "only/uploads", "zeta"]


def test_a_refused_chunk_leaves_the_upload_as_it_was(registry: Registry) -> None:
    status = registry.uploads.start("app")
    with registry.uploads.append("app", status.upload_id) as appender:
        appender.write(b"first ")
    with pytest.raises(RuntimeError), registry.uploads.append("app", status.upload_id) as appender:
        appender.write(b"garbage that never completes")
        raise RuntimeError("the body was cut short")
    assert registry.uploads.status("app", status.upload_id).size == len(b"first ")
    with pytest.raises(RangeInvalid):
        with registry.uploads.append("app", status.upload_id, start=0):
            pass  # a repeated chunk
    with registry.uploads.append("app", status.upload_id, start=6) as appender:
        appender.write(b"second")
    expected = digest_of(b"first second")
    assert registry.uploads.finish("app", status.upload_id, expected) == expected
    assert registry.blobs.content(expected) == b"first second"


def test_a_chunk_while_another_holds_the_upload_is_refused_at_once(registry: Registry) -> None:
    status = registry.uploads.start("app")
    with registry.uploads.append("app", status.upload_id):
        with pytest.raises(BlobUploadInvalid):
            with registry.uploads.append("app", status.upload_id):
                pass
        with pytest.raises(BlobUploadInvalid):
            registry.uploads.finish("app", status.upload_id, digest_of(b""))
        with pytest.raises(BlobUploadInvalid):
            registry.uploads.cancel("app", status.upload_id)


def test_a_finished_upload_is_gone_and_its_content_never_changes(registry: Registry) -> None:
    status = registry.uploads.start("app")
    with registry.uploads.append("app", status.upload_id) as appender:
        appender.write(b"content")
    digest = registry.uploads.finish("app", status.upload_id, digest_of(b"content"))
    with pytest.raises(BlobUploadUnknown):
        with registry.uploads.append("app", status.upload_id):
            pass
    with pytest.raises(BlobUploadUnknown):
        registry.uploads.status("app", status.upload_id)
    assert registry.blobs.content(digest) == b"content"


def test_a_wrong_digest_removes_the_upload(registry: Registry) -> None:
    status = registry.uploads.start("app")
    with registry.uploads.append("app", status.upload_id) as appender:
        appender.write(b"content")
    with pytest.raises(DigestInvalid):
        registry.uploads.finish("app", status.upload_id, digest_of(b"other"))
    with pytest.raises(BlobUploadUnknown):
        registry.uploads.status("app", status.upload_id)
    assert not registry.blobs.exists(digest_of(b"content"))


def test_an_upload_resumes_in_another_process_from_storage(registry: Registry) -> None:
    status = registry.uploads.start("app")
    with registry.uploads.append("app", status.upload_id) as appender:
        appender.write(b"written by one ")
    other = Registry(registry.driver)  # another worker: no digest state in memory
    with other.uploads.append("app", status.upload_id) as appender:
        appender.write(b"finished by another")
    data = b"written by one finished by another"
    assert other.uploads.finish("app", status.upload_id, digest_of(data)) == digest_of(data)
    assert registry.uploads.forget_gone() == 1


def test_purging_removes_stale_uploads_only() -> None:
    clock = Clock()
    registry = Registry(MemoryDriver(clock))
    stale, fresh = registry.uploads.start("app"), registry.uploads.start("app")
    two_hours_ago = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 7200))
    registry.driver.put_content(  # as distribution writes it: nanoseconds
        p.path_for(p.UploadStartedAt("app", stale.upload_id)),
        f"{two_hours_ago}.123456789Z".encode(),
    )
    # uploads without a start time are dated by their directory
    clock.offset = -7200.0
    undated = registry.uploads.start("other")
    registry.driver.delete(p.path_for(p.UploadStartedAt("other", undated.upload_id)))
    clock.offset = 0.0
    registry.driver.delete(p.path_for(p.UploadStartedAt("app", fresh.upload_id)))
    lines: list[str] = []
    expected = [("app", stale.upload_id), ("other", undated.upload_id)]
    assert registry.uploads.purge(3600, dry_run=True, log=lines.append) == expected
    assert registry.uploads.status("app", stale.upload_id).size == 0  # dry run: still there
    assert registry.uploads.purge(3600, log=lines.append) == expected
    for name, upload_id in expected:
        with pytest.raises(BlobUploadUnknown):
            registry.uploads.status(name, upload_id)
    assert registry.uploads.status("app", fresh.upload_id).size == 0
    assert any("would remove" in line for line in lines)


def test_manifests_by_tag_and_digest_and_their_errors(registry: Registry) -> None:
    config, layer = push_blob(registry, "app", b"{}"), push_blob(registry, "app", b"layer")
    raw = image_manifest(config, [layer])
    digest, _ = registry.manifests.put("app", "v1", raw, OCI_MANIFEST)
    assert registry.manifests.get("app", "v1") == (digest, raw, OCI_MANIFEST)
    assert registry.manifests.get("app", str(digest))[1] == raw
    assert registry.manifests.tags("app") == ["v1"]
    with pytest.raises(ManifestUnknown):
        registry.manifests.get("app", "v2")
    with pytest.raises(NameUnknown):
        registry.manifests.get("nothing", "v1")
    with pytest.raises(NameUnknown):
        registry.manifests.tags("nothing")
    with pytest.raises(ManifestBlobUnknown):
        registry.manifests.put("other", "v1", raw, OCI_MANIFEST)  # blobs not linked there
    with pytest.raises(DigestInvalid):
        registry.manifests.put("app", str(digest_of(b"else")), raw, OCI_MANIFEST)
    with pytest.raises(TooLarge):
        registry.manifests.put("app", "big", b" " * (MANIFEST_MAX + 1), OCI_MANIFEST)


def test_deleting_a_manifest_removes_its_tags_and_referrer_link(registry: Registry) -> None:
    config, layer = push_blob(registry, "app", b"{}"), push_blob(registry, "app", b"layer")
    subject, _ = registry.manifests.put("app", "v1", image_manifest(config, [layer]), "")
    sig = image_manifest(
        config,
        [],
        artifactType="application/example.sig",
        subject={"mediaType": OCI_MANIFEST, "digest": str(subject), "size": 1},
    )
    referrer, _ = registry.manifests.put("app", str(digest_of(sig)), sig, OCI_MANIFEST)
    [descriptor] = registry.manifests.referrers("app", subject)
    assert descriptor["digest"] == str(referrer)
    assert descriptor["artifactType"] == "application/example.sig"
    registry.manifests.delete("app", str(referrer))
    assert registry.manifests.referrers("app", subject) == []
    registry.manifests.delete("app", str(subject))
    assert registry.manifests.tags("app") == []
    with pytest.raises(ManifestUnknown):
        registry.manifests.delete("app", str(subject))


def test_the_layout_written_is_distribution_s(registry: Registry) -> None:
    config = push_blob(registry, "lib/app", b"{}")
    raw = image_manifest(config, [])
    digest, _ = registry.manifests.put("lib/app", "latest", raw, OCI_MANIFEST)
    repo = f"{p.ROOT_PREFIX}/repositories/lib/app"
    files = {info.path for info in registry.driver.walk(p.ROOT_PREFIX)}
    assert files == {
        f"{p.ROOT_PREFIX}/blobs/sha256/{config.hex[:2]}/{config.hex}/data",
        f"{p.ROOT_PREFIX}/blobs/sha256/{digest.hex[:2]}/{digest.hex}/data",
        f"{repo}/_layers/sha256/{config.hex}/link",
        f"{repo}/_manifests/revisions/sha256/{digest.hex}/link",
        f"{repo}/_manifests/tags/latest/current/link",
        f"{repo}/_manifests/tags/latest/index/sha256/{digest.hex}/link",
    }
    for path in files:  # the inverse of path_for, wherever a path names a digest
        if path.endswith("/current/link"):
            with pytest.raises(DigestInvalid):
                p.digest_from_path(path)
        else:
            assert p.digest_from_path(path) in (config, digest)


def test_writers_share_the_gc_lock_and_a_sweep_excludes_them(registry: Registry) -> None:
    config = push_blob(registry, "app", b"{}")
    raw = image_manifest(config, [])
    done = threading.Event()

    def push() -> None:
        registry.manifests.put("app", "v1", raw, OCI_MANIFEST)
        done.set()

    with registry.gc_lock(exclusive=True):
        thread = threading.Thread(target=push)
        thread.start()
        assert not done.wait(0.3)  # the PUT waits for the sweep
    assert done.wait(5)
    thread.join(5)
    with registry.gc_lock(exclusive=False):
        registry.manifests.put("app", "v2", raw, OCI_MANIFEST)  # writers share it


def test_a_failing_storage_is_unavailable(registry: Registry) -> None:
    registry.check_storage()

    class Broken(MemoryDriver):
        def list(self, path: str) -> list[str]:
            raise PermissionError(13, "Permission denied")

    with pytest.raises(Unavailable) as caught:
        Registry(Broken()).check_storage()
    assert "PermissionError" in caught.value.message
