"""Durability of dockyard's registry on disk: a server killed (SIGKILL) at random instants of
pushes leaves no partial blob and no empty or dangling link visible; a resumable upload
survives a restart; concurrent pushes of the same blob are safe."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time
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
