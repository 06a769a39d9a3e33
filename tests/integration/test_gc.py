"""Garbage collection: dockyard's mark and sweep deletes exactly what CNCF distribution's
`garbage-collect` deletes on the same root (with and without --delete-untagged), a dry run
deletes nothing, and online collection while pushes go on loses nothing referenced."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from dockyard.registry import gc
from dockyard.registry.driver import FilesystemDriver
from dockyard.registry.store import Registry
from tests.integration.conftest import (
    RegistryServer,
    Reply,
    image_manifest,
    make_server,
    push_blob,
    sha256,
    write_config,
)
from tests.integration.test_durability import assert_storage_consistent

BIN = Path(sys.executable).parent
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _blobs(root: Path) -> set[str]:
    base = root / "docker" / "registry" / "v2" / "blobs" / "sha256"
    return {p.parent.name for p in base.rglob("data")} if base.exists() else set()


def _populate(server: RegistryServer) -> None:
    """Two repos: a tagged image, an image whose tag moved (old manifest untagged), a deleted
    manifest, and a layer pushed but never referenced."""
    keep = image_manifest(server, "gc/app", [b"base layer", b"app layer v1"])
    server.request(
        "PUT", "/v2/gc/app/manifests/v1", body=keep, headers={"Content-Type": OCI_MANIFEST}
    )
    old = image_manifest(server, "gc/app", [b"base layer", b"app layer v2-old"])
    server.request(
        "PUT", "/v2/gc/app/manifests/v2", body=old, headers={"Content-Type": OCI_MANIFEST}
    )
    new = image_manifest(server, "gc/app", [b"base layer", b"app layer v2-new"])
    server.request(
        "PUT", "/v2/gc/app/manifests/v2", body=new, headers={"Content-Type": OCI_MANIFEST}
    )
    gone = image_manifest(server, "gc/other", [b"other layer only"])
    put = server.request(
        "PUT", "/v2/gc/other/manifests/x", body=gone, headers={"Content-Type": OCI_MANIFEST}
    )
    server.request("DELETE", f"/v2/gc/other/manifests/{put.headers['docker-content-digest']}")
    push_blob(server, "gc/app", b"dangling layer nobody references")


def _gc(kind: str, config: Path, *flags: str, grace: str = "0") -> subprocess.CompletedProcess[str]:
    """Run a collector; dockyard's with --grace 0 (offline, as distribution's) unless told."""
    if kind == "dockyard":
        grace_flags = ["--grace", grace] if grace else []
        cmd = [
            str(BIN / "dockyard"),
            "registry",
            "garbage-collect",
            *flags,
            *grace_flags,
            str(config),
        ]
    else:
        cmd = ["docker-registry", "garbage-collect", *flags, str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _twin_roots(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    server = make_server("distribution", tmp_path / "src")
    try:
        _populate(server)
    finally:
        server.stop()
    roots = []
    for name in ("for-dockyard", "for-distribution"):
        base = tmp_path / name
        shutil.copytree(tmp_path / "src" / "data", base / "data")
        roots.append(base)
    configs = [write_config(base, 5999) for base in roots]
    return roots[0] / "data", roots[1] / "data", configs[0], configs[1]


def test_gc_deletes_what_distribution_deletes(tmp_path: Path) -> None:
    ours, theirs, our_config, their_config = _twin_roots(tmp_path)
    before = _blobs(ours)
    _gc("dockyard", our_config)
    _gc("distribution", their_config)
    assert _blobs(ours) == _blobs(theirs)
    assert len(_blobs(ours)) < len(before)
    assert_storage_consistent(ours)


def test_gc_delete_untagged_matches_distribution(tmp_path: Path) -> None:
    ours, theirs, our_config, their_config = _twin_roots(tmp_path)
    _gc("dockyard", our_config, "--delete-untagged")
    _gc("distribution", their_config, "--delete-untagged")
    assert _blobs(ours) == _blobs(theirs)
    revisions = "docker/registry/v2/repositories/gc/app/_manifests/revisions/sha256"
    assert sorted(os.listdir(ours / revisions)) == sorted(os.listdir(theirs / revisions))


def test_dry_run_deletes_nothing(tmp_path: Path) -> None:
    ours, _, our_config, _ = _twin_roots(tmp_path)
    before = _blobs(ours)
    out = _gc("dockyard", our_config, "--dry-run", "--delete-untagged").stdout
    assert "eligible for deletion" in out and "dry run" in out
    assert _blobs(ours) == before


def test_served_images_still_pull_after_gc(tmp_path: Path) -> None:
    ours, _, our_config, _ = _twin_roots(tmp_path)
    _gc("dockyard", our_config, "--delete-untagged")
    server = make_server(
        "dockyard", tmp_path / "after", extra={"storage.filesystem.rootdirectory": str(ours)}
    )
    try:
        for tag in ("v1", "v2"):
            reply = server.request("GET", f"/v2/gc/app/manifests/{tag}")
            assert reply.status == 200
            for layer in reply.json()["layers"] + [reply.json()["config"]]:
                assert server.request("HEAD", f"/v2/gc/app/blobs/{layer['digest']}").status == 200
    finally:
        server.stop()


# Online collection: pushers reuse old unreferenced blobs (older than the grace period, so a
# sweep would take them) while collections run. The invariant: every manifest the registry
# accepted (201) still has all its blobs.
PUSHERS, PUSHES_EACH, GC_RUNS = 4, 12, 6


def test_online_gc_loses_nothing_referenced(tmp_path: Path) -> None:
    server = make_server("dockyard", tmp_path / "online")
    root = tmp_path / "online" / "data"
    try:
        old_layers = [os.urandom(200_000) for _ in range(PUSHERS * PUSHES_EACH)]
        old_digests = [push_blob(server, "online/seed", layer) for layer in old_layers]
        past = time.time() - 7200
        for blob in (root / "docker/registry/v2/blobs").rglob("data"):
            os.utime(blob, (past, past))
        accepted: list[tuple[str, str]] = []
        failures: list[int] = []
        lock = threading.Lock()

        def pusher(n: int) -> None:
            rng = random.Random(n)
            for i in range(PUSHES_EACH):
                repo = f"online/p{n}"
                index = n * PUSHES_EACH + i
                # the old blob is mounted (exists already: no upload), a new one is uploaded
                server.request(
                    "POST",
                    f"/v2/{repo}/blobs/uploads/?mount={old_digests[index]}&from=online/seed",
                )
                raw = image_manifest(server, repo, [rng.randbytes(50_000)])
                doc = json.loads(raw)
                doc["layers"].append(
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": old_digests[index],
                        "size": len(old_layers[index]),
                    }
                )
                body = json.dumps(doc).encode()
                reply = server.request(
                    "PUT",
                    f"/v2/{repo}/manifests/t{i}",
                    body=body,
                    headers={"Content-Type": OCI_MANIFEST},
                )
                with lock:
                    if reply.status == 201:
                        accepted.append((repo, f"t{i}"))
                    else:
                        failures.append(reply.status)

        threads = [threading.Thread(target=pusher, args=(n,)) for n in range(PUSHERS)]
        for t in threads:
            t.start()
        for _ in range(GC_RUNS):
            # the default grace period: fresh uploads are kept, the old seed blobs are not
            _gc("dockyard", tmp_path / "online" / "config.yml", grace="")
        for t in threads:
            t.join(timeout=120)
        _gc("dockyard", tmp_path / "online" / "config.yml", grace="")
        assert accepted, failures
        assert set(failures) <= {400}
        for repo, tag in accepted:
            reply = server.request("GET", f"/v2/{repo}/manifests/{tag}")
            assert reply.status == 200
            for layer in reply.json()["layers"] + [reply.json()["config"]]:
                head = server.request("HEAD", f"/v2/{repo}/blobs/{layer['digest']}")
                assert head.status == 200, (repo, tag, layer["digest"])
        assert_storage_consistent(root)
    finally:
        server.stop()


def _put_manifest(server: RegistryServer, repo: str, reference: str, raw: bytes) -> Reply:
    media = json.loads(raw)["mediaType"]
    return server.request(
        "PUT", f"/v2/{repo}/manifests/{reference}", body=raw, headers={"Content-Type": media}
    )


def _index(*children: bytes) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": sha256(child),
                    "size": len(child),
                    "platform": {"architecture": f"arch{n}", "os": "linux"},
                }
                for n, child in enumerate(children)
            ],
        }
    ).encode()


def _assert_pulls(server: RegistryServer, repo: str, raw: bytes) -> None:
    reply = server.request("GET", f"/v2/{repo}/manifests/{sha256(raw)}")
    assert reply.status == 200, (reply.status, reply.body[:300])
    assert reply.body == raw
    for blob in reply.json()["layers"] + [reply.json()["config"]]:
        assert server.request("HEAD", f"/v2/{repo}/blobs/{blob['digest']}").status == 200, blob


def test_gc_keeps_a_child_manifest_pushed_within_the_grace(tmp_path: Path) -> None:
    """A multi-arch push sends its children by digest, then the index: an online
    `--delete-untagged` between the two must not take a child (the index PUT got
    MANIFEST_BLOB_UNKNOWN). The grace period is what protects it: with --grace 0 it goes."""
    server = make_server("dockyard", tmp_path / "multiarch")
    config = tmp_path / "multiarch" / "config.yml"
    try:
        child = image_manifest(server, "gc/multi", [b"amd64 layer"])
        assert _put_manifest(server, "gc/multi", sha256(child), child).status == 201
        _gc("dockyard", config, "--delete-untagged", grace="")  # the default grace
        reply = _put_manifest(server, "gc/multi", "latest", _index(child))
        assert reply.status == 201, (reply.status, reply.body[:300])
        _assert_pulls(server, "gc/multi", child)

        orphan = image_manifest(server, "gc/multi", [b"arm64 layer"])
        assert _put_manifest(server, "gc/multi", sha256(orphan), orphan).status == 201
        _gc("dockyard", config, "--delete-untagged", grace="0")
        gone = server.request("GET", f"/v2/gc/multi/manifests/{sha256(orphan)}")
        assert gone.status == 404
        late = _put_manifest(server, "gc/multi", "late", _index(child, orphan))
        assert late.status == 400 and late.error_codes() == ["MANIFEST_BLOB_UNKNOWN"]
        _assert_pulls(server, "gc/multi", child)  # the tagged index keeps its child
    finally:
        server.stop()


def test_gc_keeps_a_manifest_pushed_again_or_tagged_while_it_marks(tmp_path: Path) -> None:
    """Two untagged manifests (and their blobs) older than the grace are doomed when marking
    reads the repository; while it marks, one is pushed again by digest and the other is
    tagged. The sweep must keep both with every blob they reference (the tagged one used to
    keep its manifest but lose its blobs, the other was deleted)."""
    base = tmp_path / "race"
    server = make_server("dockyard", base)
    try:
        anchor = image_manifest(server, "gc/race", [b"anchor layer"])
        assert _put_manifest(server, "gc/race", "anchor", anchor).status == 201
        again = image_manifest(server, "gc/race", [b"pushed again layer"])
        tagged = image_manifest(server, "gc/race", [b"tagged meanwhile layer"])
        for raw in (again, tagged):
            assert _put_manifest(server, "gc/race", sha256(raw), raw).status == 201
        past = time.time() - 7200
        for path in (base / "data").rglob("*"):
            if path.is_file():
                os.utime(path, (past, past))
        racing: list[int] = []

        def log(line: str) -> None:
            if "marking manifest" in line and not racing:  # marking, not yet sweeping
                racing.append(_put_manifest(server, "gc/race", sha256(again), again).status)
                racing.append(_put_manifest(server, "gc/race", "now", tagged).status)

        registry = Registry(FilesystemDriver(str(base / "data")), delete_enabled=True)
        result = gc.collect(registry, delete_untagged=True, log=log)
        assert racing == [201, 201]
        assert result.deleted_manifests == []
        for raw in (anchor, again, tagged):
            _assert_pulls(server, "gc/race", raw)
        assert_storage_consistent(base / "data")
    finally:
        server.stop()
