"""Durability of dockyard's registry on disk: a server killed (SIGKILL) at random instants of
pushes leaves no partial blob and no empty or dangling link visible; a resumable upload
survives a restart; concurrent pushes of the same blob are safe; the temp files of a killed
writer are swept once stale, never while a write may still rename them."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
import time
import uuid
from pathlib import Path

from tests.integration.conftest import (
    RegistryServer,
    image_manifest,
    location_path,
    make_server,
    patch_chunks,
    push_blob,
    sha256,
    with_digest,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
# Kill rounds; each pushes for a random 0–400 ms, then SIGKILLs the server.
KILL_ROUNDS = 12
# Seconds a started registry may take to sweep stale temp files (it does so in the background).
SWEEP_TIMEOUT = 15.0
# The /debug/health entry that reports stale temp files the sweep left.
TEMP_HEALTH_CHECK = "storagedriver_filesystem_tempfiles"


def assert_storage_consistent(root: Path) -> dict[str, int]:
    """Every visible blob hashes to its name; every link names a digest whose blob exists."""
    v2 = root / "docker" / "registry" / "v2"
    counts = {"blobs": 0, "links": 0}
    for data in (v2 / "blobs").rglob("data") if (v2 / "blobs").exists() else []:
        algorithm, hexdigest = data.parent.parent.parent.name, data.parent.name
        assert hashlib.new(algorithm, data.read_bytes()).hexdigest() == hexdigest, data
        counts["blobs"] += 1
    repos = v2 / "repositories"
    for link in repos.rglob("link") if repos.exists() else []:
        text = link.read_text().strip()
        assert text.startswith("sha256:") and len(text) == 71, f"bad link {link}: {text!r}"
        if "_uploads" in link.parts:
            continue
        blob = v2 / "blobs" / "sha256" / text[7:9] / text[7:] / "data"
        assert blob.exists(), f"{link} points to a missing blob {text}"
        counts["links"] += 1
    return counts


def _pusher(server: RegistryServer, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    i = 0
    while not stop.is_set() and i < 50:
        i += 1
        try:
            layer = rng.randbytes(rng.randint(1, 3_000_000))
            start = server.request("POST", "/v2/kill/test/blobs/uploads/")
            location = location_path(start.headers["location"])
            location = patch_chunks(server, location, layer, 256 * 1024, check=False)
            server.request("PUT", with_digest(location, sha256(layer)))
            raw = image_manifest(server, "kill/test", [layer[:1000]])
            server.request(
                "PUT",
                f"/v2/kill/test/manifests/t{seed}-{i}",
                body=raw,
                headers={"Content-Type": OCI_MANIFEST},
            )
        except (OSError, KeyError, AssertionError):
            return


def test_sigkill_at_any_instant_leaves_no_partial_state(tmp_path: Path) -> None:
    server = make_server("dockyard", tmp_path / "kill")
    data_root = tmp_path / "kill" / "data"
    rng = random.Random(1234)
    try:
        for round_ in range(KILL_ROUNDS):
            stop = threading.Event()
            threads = [
                threading.Thread(target=_pusher, args=(server, stop, round_ * 10 + n))
                for n in range(2)
            ]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.0, 0.4))
            server.stop(signal.SIGKILL)
            stop.set()
            for t in threads:
                t.join(timeout=30)
            assert_storage_consistent(data_root)
            server.start()
            assert server.request("GET", "/v2/").status == 200
        counts = assert_storage_consistent(data_root)
        assert counts["blobs"] > 0 and counts["links"] > 0
    finally:
        server.stop()


def test_resumable_upload_survives_a_restart(tmp_path: Path) -> None:
    server = make_server("dockyard", tmp_path / "resume")
    try:
        data = os.urandom(3_000_000)
        half = len(data) // 2
        start = server.request("POST", "/v2/resume/me/blobs/uploads/")
        first = server.request(
            "PATCH",
            location_path(start.headers["location"]),
            body=data[:half],
            headers={"Content-Range": f"0-{half - 1}", "Content-Type": "application/octet-stream"},
        )
        assert first.status == 202
        location = location_path(first.headers["location"])
        server.stop(signal.SIGKILL)
        server.start()
        status = server.request("GET", location)
        assert status.status == 204 and status.headers["range"] == f"0-{half - 1}"
        second = server.request(
            "PATCH",
            location,
            body=data[half:],
            headers={
                "Content-Range": f"{half}-{len(data) - 1}",
                "Content-Type": "application/octet-stream",
            },
        )
        assert second.status == 202
        done = server.request("PUT", with_digest(second.headers["location"], sha256(data)))
        assert done.status == 201
        assert server.request("GET", f"/v2/resume/me/blobs/{sha256(data)}").body == data
    finally:
        server.stop()


def test_concurrent_pushes_of_the_same_blob(dockyard_server: RegistryServer) -> None:
    data = os.urandom(4_000_000)
    results: list[int] = []

    def push(n: int) -> None:
        start = dockyard_server.request("POST", f"/v2/same/r{n}/blobs/uploads/")
        reply = dockyard_server.request(
            "PUT",
            with_digest(start.headers["location"], sha256(data)),
            body=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        results.append(reply.status)

    threads = [threading.Thread(target=push, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [201] * 8
    for n in range(8):
        assert dockyard_server.request("GET", f"/v2/same/r{n}/blobs/{sha256(data)}").body == data
    root = dockyard_server.root / "data"
    assert assert_storage_consistent(root)["blobs"] == 1
    assert not list(root.rglob("_uploads/*/data"))
    assert not list(root.rglob(".tmp-*"))


def test_a_blob_that_exists_is_not_written_again(dockyard_server: RegistryServer) -> None:
    data = b"written once"
    digest = push_blob(dockyard_server, "once/a", data)
    blob = next((dockyard_server.root / "data").rglob(f"{digest[7:]}/data"))
    before = blob.stat().st_ino, blob.stat().st_mtime_ns
    push_blob(dockyard_server, "once/b", data)
    assert (blob.stat().st_ino, blob.stat().st_mtime_ns) == before


def _plant_temp_files(v2: Path, repo: str, tag: str, raw: bytes, age: float) -> list[Path]:
    """A temp file, written `age` seconds ago, beside each kind of file the driver stages: a
    manifest's blob data, its revision link, a layer link and the tag's current link."""
    manifest = sha256(raw)[7:]
    layer = json.loads(raw)["layers"][0]["digest"][7:]
    repo_dir = v2 / "repositories" / repo
    directories = [
        v2 / "blobs" / "sha256" / manifest[:2] / manifest,
        repo_dir / "_manifests" / "revisions" / "sha256" / manifest,
        repo_dir / "_layers" / "sha256" / layer,
        repo_dir / "_manifests" / "tags" / tag / "current",
    ]
    planted = []
    when = time.time() - age
    for directory in directories:
        assert directory.is_dir(), directory
        path = directory / f".tmp-{uuid.uuid4().hex[:8]}"
        path.write_bytes(b"a write its killed writer never renamed")
        os.utime(path, (when, when))
        planted.append(path)
    return planted


def test_stale_temp_files_are_swept_at_start_and_reported(tmp_path: Path) -> None:
    """Temp files a killed server left (hours old) are removed when a registry starts; younger
    ones (a write in progress, perhaps by another registry on the root) are kept. A read-only
    registry leaves them and /debug/health reports them, without failing (200)."""
    base = tmp_path / "temps"
    server = make_server("dockyard", base)
    try:
        raw = image_manifest(server, "temps/app", [b"layer of a crashed push"])
        reply = server.request(
            "PUT", "/v2/temps/app/manifests/v1", body=raw, headers={"Content-Type": OCI_MANIFEST}
        )
        assert reply.status == 201
    finally:
        server.stop()
    v2 = base / "data" / "docker" / "registry" / "v2"
    stale = _plant_temp_files(v2, "temps/app", "v1", raw, age=3 * 3600)
    live = _plant_temp_files(v2, "temps/app", "v1", raw, age=0)
    recent = _plant_temp_files(v2, "temps/app", "v1", raw, age=1800)  # within the safe age
    server.start()
    try:
        deadline = time.monotonic() + SWEEP_TIMEOUT
        while any(path.exists() for path in stale) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [path for path in stale if path.exists()] == []
        assert all(path.exists() for path in live + recent)
        health = server.request("GET", "/debug/health")
        assert health.status == 200 and health.json() == {}
        assert server.request("GET", "/v2/temps/app/manifests/v1").body == raw
    finally:
        server.stop()

    stale = _plant_temp_files(v2, "temps/app", "v1", raw, age=3 * 3600)
    readonly = make_server(
        "dockyard",
        tmp_path / "readonly",
        extra={
            "storage.filesystem.rootdirectory": str(base / "data"),
            "storage.maintenance.readonly.enabled": True,
        },
    )
    try:
        deadline = time.monotonic() + SWEEP_TIMEOUT
        health = readonly.request("GET", "/debug/health")
        while TEMP_HEALTH_CHECK not in health.json() and time.monotonic() < deadline:
            time.sleep(0.1)
            health = readonly.request("GET", "/debug/health")
        assert health.status == 200
        assert health.json()[TEMP_HEALTH_CHECK].startswith(f"{len(stale)} stale temp files")
        assert all(path.exists() for path in stale)
    finally:
        readonly.stop()
