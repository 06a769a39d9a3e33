"""Regression tests for the upload integrity items of issue 9 (1 and 11): content at a digest never
changes, so a chunk whose headers came before the closing PUT and whose body came after it is
refused and never written into the committed blob (one worker or several sharing the root), a
chunk, finish or cancel that meets a chunk in flight is refused and leaves the upload whole, and
a refused chunk (a Content-Range that does not match its body, a body cut short) leaves the
upload exactly as it was, data and running digest, so the upload goes on and finishes right.
Orderings are made with the protocol's own signals (`100 Continue`, the upload's `Range`),
never with sleeps."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import pytest

from dockyard.registry import paths as p
from tests.integration.conftest import (
    RegistryServer,
    Reply,
    location_path,
    make_server,
    sha256,
    with_digest,
)

# Seconds a state the test waits for (bytes written, a chunk taken back) may take to appear.
WAIT_SECONDS = 20.0
# The registry's BODY_STALL_SECONDS (dockyard.registry.app): how long a body may send nothing.
BODY_STALL_SECONDS = 30.0


@contextmanager
def _server(tmp_path: Path, workers: int = 1) -> Iterator[RegistryServer]:
    server = make_server("dockyard", tmp_path / "dockyard", serve_args=["--workers", str(workers)])
    try:
        yield server
    finally:
        server.stop()


def _started(server: RegistryServer, repo: str, prefix: bytes) -> str:
    """A new upload in `repo` holding `prefix` (one PATCH); its location."""
    start = server.request("POST", f"/v2/{repo}/blobs/uploads/")
    assert start.status == 202, (start.status, start.body[:300])
    reply = server.request(
        "PATCH",
        location_path(start.headers["location"]),
        body=prefix,
        headers={"Content-Range": f"0-{len(prefix) - 1}"},
    )
    assert reply.status == 202, (reply.status, reply.body[:300])
    return location_path(reply.headers["location"])


def _size(server: RegistryServer, location: str) -> int:
    """The upload's size from its status's Range (uploads here hold more than one byte)."""
    reply = server.request("GET", location)
    assert reply.status == 204, (reply.status, reply.body[:300])
    return int(reply.headers["range"].split("-")[1]) + 1


def _wait_until(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not done():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{key}: {value}" for key, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk_head(location: str, start: int, length: int, expect: bool = False) -> bytes:
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Length": str(length),
        "Content-Range": f"{start}-{start + length - 1}",
    }
    if expect:
        headers["Expect"] = "100-continue"
    return _head("PATCH", location, headers)


def _connect(server: RegistryServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def _wait_continue(sock: socket.socket) -> None:
    """Read the interim `100 Continue`: the registry took the request's headers and its
    handler is reading the body."""
    head = b""
    while b"\r\n\r\n" not in head:
        piece = sock.recv(1)
        assert piece, f"connection closed before 100 Continue: {head!r}"
        head += piece
    assert head.startswith(b"HTTP/1.1 100"), head


def _answer(sock: socket.socket) -> Reply:
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body)


def _blob_file(server: RegistryServer, digest: str) -> Path:
    parsed = p.parse_digest(digest)
    return server.root / "data" / p.path_for(p.BlobData(parsed))


def _assert_blob_sound(server: RegistryServer, repo: str, digest: str) -> None:
    """The blob at `digest` is served and stored as bytes hashing to `digest`."""
    reply = server.request("GET", f"/v2/{repo}/blobs/{digest}")
    assert reply.status == 200, (reply.status, reply.body[:300])
    assert sha256(reply.body) == digest, "the registry serves other bytes than the digest's"
    stored = _blob_file(server, digest).read_bytes()
    assert sha256(stored) == digest, "the blob file on disk no longer hashes to its digest"


def _finish_with(
    server: RegistryServer, repo: str, location: str, prefix: bytes, body: bytes
) -> None:
    """The upload (holding `prefix`) still takes `body` as its next chunk and finishes with the
    digest of both: what a refused chunk must leave possible."""
    accepted = server.request(
        "PATCH",
        location,
        body=body,
        headers={"Content-Range": f"{len(prefix)}-{len(prefix) + len(body) - 1}"},
    )
    assert accepted.status == 202, (accepted.status, accepted.body[:300])
    digest = sha256(prefix + body)
    put = server.request("PUT", with_digest(location, digest))
    assert put.status == 201, (put.status, put.body[:300])
    _assert_blob_sound(server, repo, digest)


def _late_body(
    server: RegistryServer, location: str, at: int, body: bytes, between: Callable[[], Reply]
) -> tuple[Reply, Reply]:
    """Send a chunk's headers, wait for `100 Continue`, run `between` on another connection,
    then send the chunk's body: (the reply of `between`, the chunk's reply)."""
    with _connect(server) as sock:
        sock.sendall(_chunk_head(location, at, len(body), expect=True))
        _wait_continue(sock)
        middle = between()
        sock.sendall(body)
        return middle, _answer(sock)


# ---- item 1: a committed blob never changes ------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_chunk_body_after_the_put_never_reaches_the_blob(tmp_path: Path, workers: int) -> None:
    """The attack: a PATCH's headers before the closing PUT, its body after the 201."""
    repo = "integrity/attack"
    prefix = b"committed bytes\n" * 256
    digest = sha256(prefix)
    tail = b"appended after the commit\n" * 64
    with _server(tmp_path, workers) as server:
        location = _started(server, repo, prefix)
        put, patch = _late_body(
            server,
            location,
            len(prefix),
            tail,
            lambda: server.request("PUT", with_digest(location, digest)),
        )
        if put.status == 201:
            assert patch.status != 202, "a chunk was accepted after its upload was committed"
            assert patch.status in (400, 404), (patch.status, patch.body[:300])
            _assert_blob_sound(server, repo, digest)
        else:
            # The chunk held the upload: the PUT is refused, the chunk lands in the upload.
            assert put.status == 400 and put.error_codes() == ["BLOB_UPLOAD_INVALID"], put
            assert patch.status == 202, (patch.status, patch.body[:300])
            whole = server.request("PUT", with_digest(location, sha256(prefix + tail)))
            assert whole.status == 201, (whole.status, whole.body[:300])
            _assert_blob_sound(server, repo, sha256(prefix + tail))
        assert server.request("GET", location).status == 404


@pytest.mark.parametrize("ending", ["finish", "cancel"])
def test_chunk_to_an_ended_upload_is_unknown(tmp_path: Path, ending: str) -> None:
    """A chunk whose upload finished or was cancelled while its body was on the way is
    BLOB_UPLOAD_UNKNOWN, as one sent after the end is."""
    repo = f"integrity/{ending}"
    prefix = b"first chunk\n" * 100
    digest = sha256(prefix)
    with _server(tmp_path) as server:
        location = _started(server, repo, prefix)
        if ending == "finish":
            end = lambda: server.request("PUT", with_digest(location, digest))  # noqa: E731
            ended_with = 201
        else:
            end = lambda: server.request("DELETE", location)  # noqa: E731
            ended_with = 204
        ended, late = _late_body(server, location, len(prefix), b"late bytes", end)
        assert ended.status == ended_with, (ended.status, ended.body[:300])
        assert late.status == 404 and late.error_codes() == ["BLOB_UPLOAD_UNKNOWN"], late
        after = server.request(
            "PATCH",
            location,
            body=b"after the end",
            headers={"Content-Range": f"{len(prefix)}-{len(prefix) + 12}"},
        )
        assert after.status == 404 and after.error_codes() == ["BLOB_UPLOAD_UNKNOWN"], after
        if ending == "finish":
            _assert_blob_sound(server, repo, digest)
        else:
            assert not _blob_file(server, digest).exists()


@pytest.mark.parametrize("second", ["PATCH", "PUT", "DELETE"])
def test_request_meeting_a_chunk_in_flight_is_refused(tmp_path: Path, second: str) -> None:
    """While a chunk is being written (half its body in), another chunk, a PUT or a DELETE of
    the same upload is refused at once (any worker), and the chunk goes on whole."""
    repo = f"integrity/busy-{second.lower()}"
    prefix = b"prefix\n" * 100
    first_half, second_half = b"a" * 65536, b"b" * 3000
    chunk = first_half + second_half
    whole = prefix + chunk
    with _server(tmp_path, workers=2) as server:
        location = _started(server, repo, prefix)
        with _connect(server) as sock:
            sock.sendall(_chunk_head(location, len(prefix), len(chunk)) + first_half)
            written = len(prefix) + len(first_half)
            _wait_until(lambda: _size(server, location) == written, "half the chunk written")
            if second == "PATCH":
                reply = server.request(
                    "PATCH",
                    location,
                    body=b"c" * 100,
                    headers={"Content-Range": f"{written}-{written + 99}"},
                )
            elif second == "PUT":
                reply = server.request("PUT", with_digest(location, sha256(whole)))
            else:
                reply = server.request("DELETE", location)
            assert reply.status == 400, (reply.status, reply.body[:300])
            assert reply.error_codes() == ["BLOB_UPLOAD_INVALID"], reply.body[:300]
            sock.sendall(second_half)
            patch = _answer(sock)
        assert patch.status == 202, (patch.status, patch.body[:300])
        assert patch.headers["range"] == f"0-{len(whole) - 1}"
        put = server.request("PUT", with_digest(location, sha256(whole)))
        assert put.status == 201, (put.status, put.body[:300])
        _assert_blob_sound(server, repo, sha256(whole))
        assert server.request("GET", f"/v2/{repo}/blobs/{sha256(whole)}").body == whole


# ---- item 11: a refused chunk leaves the upload as it was ------------------------------------
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_chunk_not_matching_its_content_range_is_taken_back(tmp_path: Path, framing: str) -> None:
    """A chunk whose Content-Range claims 10 bytes but whose body has 7 is refused, whether
    the length is known from Content-Length before the body or only once it is read (chunked
    transfer encoding); the upload keeps its Range and finishes with the right digest."""
    repo = f"integrity/range-{framing}"
    prefix = b"0123456789"
    short, good = b"x" * 7, b"y" * 10
    claimed = f"{len(prefix)}-{len(prefix) + len(good) - 1}"
    with _server(tmp_path) as server:
        location = _started(server, repo, prefix)
        if framing == "content-length":
            refused = server.request(
                "PATCH", location, body=short, headers={"Content-Range": claimed}
            )
        else:
            with _connect(server) as sock:
                head = _head(
                    "PATCH",
                    location,
                    {
                        "Content-Type": "application/octet-stream",
                        "Content-Range": claimed,
                        "Transfer-Encoding": "chunked",
                    },
                )
                sock.sendall(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(short), short))
                refused = _answer(sock)
        assert refused.status in (400, 416), (refused.status, refused.body[:300])
        assert _size(server, location) == len(prefix), "the refused chunk's bytes stayed"
        accepted = server.request("PATCH", location, body=good, headers={"Content-Range": claimed})
        assert accepted.status == 202, (accepted.status, accepted.body[:300])
        assert accepted.headers["range"] == f"0-{len(prefix + good) - 1}"
        digest = sha256(prefix + good)
        put = server.request("PUT", with_digest(location, digest))
        assert put.status == 201, (put.status, put.body[:300])
        _assert_blob_sound(server, repo, digest)


@pytest.mark.parametrize("size", [64 * 1024, 8 * 1024 * 1024])
def test_body_cut_short_leaves_the_upload_as_it_was(tmp_path: Path, size: int) -> None:
    """A chunk whose client goes away mid-body (fewer bytes than its Content-Length) is taken
    back once some of it was written, small bodies (written as they come) and large ones
    (written in batches by a thread) alike; the upload then goes on and finishes right."""
    repo = f"integrity/cut-{size}"
    prefix = b"kept\n" * 200
    body = hashlib.sha256(b"seed").digest() * (size // 32)
    sent = body[: size // 2]
    with _server(tmp_path) as server:
        location = _started(server, repo, prefix)
        with _connect(server) as sock:
            sock.sendall(_chunk_head(location, len(prefix), len(body)) + sent)
            _wait_until(lambda: _size(server, location) > len(prefix), "part of the chunk written")
        _wait_until(lambda: _size(server, location) == len(prefix), "the cut chunk taken back")
        _finish_with(server, repo, location, prefix, body)


# ---- request bodies that stop: refused after the stall timeout, the upload as it was --------
def test_bodies_that_stop_are_refused_and_their_connections_closed(tmp_path: Path) -> None:
    """A chunk whose body stops halfway and a manifest whose body never comes are refused once
    no byte came for BODY_STALL_SECONDS (400 with the spec's code, the connection closed), and
    the chunk's bytes are taken back. Before, both waited for as long as the client kept the
    connection."""
    repo = "integrity/stall"
    prefix = b"kept\n" * 200
    body = hashlib.sha256(b"stall").digest() * 1024
    with _server(tmp_path) as server:
        location = _started(server, repo, prefix)
        with _connect(server) as chunk, _connect(server) as manifest:
            chunk.settimeout(BODY_STALL_SECONDS + WAIT_SECONDS)
            manifest.settimeout(BODY_STALL_SECONDS + WAIT_SECONDS)
            chunk.sendall(_chunk_head(location, len(prefix), len(body)) + body[: len(body) // 2])
            manifest.sendall(
                _head(
                    "PUT",
                    f"/v2/{repo}/manifests/t",
                    {
                        "Content-Type": "application/vnd.oci.image.manifest.v1+json",
                        "Content-Length": "1000",
                    },
                )
                + b"{"
            )
            _wait_until(lambda: _size(server, location) > len(prefix), "part of the chunk written")
            begun = time.monotonic()
            replies = {"chunk": _answer(chunk), "manifest": _answer(manifest)}
            assert time.monotonic() - begun < BODY_STALL_SECONDS + WAIT_SECONDS
            for sock in (chunk, manifest):
                assert sock.recv(1) == b"", "the connection was left open"
        codes = {name: (r.status, r.error_codes()) for name, r in replies.items()}
        assert codes == {
            "chunk": (400, ["BLOB_UPLOAD_INVALID"]),
            "manifest": (400, ["MANIFEST_INVALID"]),
        }, codes
        assert all(r.headers.get("connection") == "close" for r in replies.values())
        assert _size(server, location) == len(prefix), "the stalled chunk's bytes stayed"
        _finish_with(server, repo, location, prefix, body)


# ---- Content-Encoding: bodies are stored as sent, never inflated --------------------------
def test_compressed_bodies_are_stored_as_sent(tmp_path: Path) -> None:
    """A chunk sent with `Content-Encoding: gzip` is stored as its gzip bytes (4 MiB of zeros
    compress to a few KiB: before, the registry inflated them into the upload), and a gzipped
    manifest is not taken for the JSON inside it (a manifest is the bytes sent)."""
    repo = "integrity/gzip"
    inflated = bytes(4 * 1024 * 1024)
    packed = gzip.compress(inflated)
    with _server(tmp_path) as server:
        start = server.request("POST", f"/v2/{repo}/blobs/uploads/")
        assert start.status == 202, (start.status, start.body[:300])
        reply = server.request(
            "PATCH",
            location_path(start.headers["location"]),
            body=packed,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"},
        )
        assert reply.status == 202, (reply.status, reply.body[:300])
        assert reply.headers["range"] == f"0-{len(packed) - 1}", reply.headers["range"]
        location = location_path(reply.headers["location"])
        put = server.request("PUT", with_digest(location, sha256(packed)))
        assert put.status == 201, (put.status, put.body[:300])
        _assert_blob_sound(server, repo, sha256(packed))
        assert _blob_file(server, sha256(packed)).stat().st_size == len(packed)

        config = b"{}"
        config_digest = sha256(config)
        start = server.request("POST", f"/v2/{repo}/blobs/uploads/?digest={config_digest}", config)
        assert start.status == 201, (start.status, start.body[:300])
        media = "application/vnd.oci.image.manifest.v1+json"
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": media,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": [],
            }
        ).encode()
        zipped = server.request(
            "PUT",
            f"/v2/{repo}/manifests/zipped",
            body=gzip.compress(manifest),
            headers={"Content-Type": media, "Content-Encoding": "gzip"},
        )
        assert (zipped.status, zipped.error_codes()) == (400, ["MANIFEST_INVALID"]), zipped.body
        assert server.request("GET", f"/v2/{repo}/manifests/zipped").status == 404
        assert server.request("GET", f"/v2/{repo}/manifests/{sha256(manifest)}").status == 404
