"""Regression tests for the registry protocol hardening of issue 9: manifest bodies read whole
however slowly they arrive (plain HTTP and TLS), bcrypt kept off the event loop and failing
addresses slowed down, passwords beyond bcrypt's 72 bytes, deeply nested, non-UTF-8 and
out-of-range manifests refused as MANIFEST_INVALID, `n=0` pages without a Link, every error
answered with the spec's JSON and one of its codes (aiohttp's own errors included), and 416s
carrying `Content-Range: bytes */size`. Checks that belong in the conformance suite run against
dockyard and distribution 2.8 alike, with the suite's `check` for distribution's known gaps."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from dockyard import pki as fleet_pki
from tests.integration.conftest import (
    RegistryServer,
    Reply,
    image_manifest,
    make_server,
    push_blob,
    sha256,
)
from tests.integration.test_http_suite import check

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
# The error codes of the OCI Distribution Spec v1.1 ("Error Codes").
SPEC_CODES = {
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
}
# Seconds between the pieces of a body sent slowly: enough for the registry to read each apart.
PAUSE = 0.05


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _answer(sock: socket.socket) -> Reply:
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body)


def _send_slowly(sock: socket.socket, head: bytes, body: bytes, pieces: int) -> Reply:
    """Send the head, then the body in `pieces` writes with a pause before each; the answer."""
    sock.sendall(head)
    step = -(-len(body) // pieces)
    for offset in range(0, len(body), step):
        time.sleep(PAUSE)
        sock.sendall(body[offset : offset + step])
    return _answer(sock)


def _manifest_put_head(repo: str, size: int) -> bytes:
    return (
        f"PUT /v2/{repo}/manifests/v1 HTTP/1.1\r\nHost: registry\r\n"
        f"Content-Type: {OCI_MANIFEST}\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    ).encode()


def _padded(raw: bytes, size: int) -> bytes:
    """The manifest `raw` with an annotation that brings it to about `size` bytes."""
    doc = json.loads(raw)
    doc["annotations"] = {"org.example.padding": "x" * size}
    return json.dumps(doc).encode()


def _put_manifest(registry: RegistryServer, repo: str, body: bytes) -> Reply:
    return registry.request(
        "PUT", f"/v2/{repo}/manifests/v1", body=body, headers={"Content-Type": OCI_MANIFEST}
    )


def _htpasswd(path: Path, user: str, password: str, cost: int) -> None:
    subprocess.run(
        ["htpasswd", "-Bbc", "-C", str(cost), str(path), user, password],
        check=True,
        capture_output=True,
    )


def _auth_server(tmp_path: Path, password: str, cost: int, kind: str = "dockyard") -> Any:
    """A registry asking for alice's `password`. One dockyard process: what it remembers of
    checks and failures is its own, and these tests follow one address through one memory."""
    _htpasswd(tmp_path / "htpasswd", "alice", password, cost)
    auth = {"realm": "hardening", "path": str(tmp_path / "htpasswd")}
    extra = {"auth.htpasswd": auth}
    return make_server(kind, tmp_path / kind, extra=extra, serve_args=["--workers", "1"])


# ---- item 2: a manifest body is read to its end, however many reads it takes -----------------
def test_manifest_sent_in_slow_pieces_is_read_whole(registry: RegistryServer) -> None:
    raw = _padded(image_manifest(registry, "hardening/slow", [b"slow layer"]), 300_000)
    with socket.create_connection(("127.0.0.1", registry.port), timeout=30) as sock:
        reply = _send_slowly(sock, _manifest_put_head("hardening/slow", len(raw)), raw, 6)
    assert reply.status == 201, (reply.status, reply.body[:300])
    got = registry.request(
        "GET", f"/v2/hardening/slow/manifests/{sha256(raw)}", headers={"Accept": OCI_MANIFEST}
    )
    assert got.status == 200 and got.body == raw


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("pki")
    fleet_pki.ensure_server_cert(base, "server", ["localhost"], ["127.0.0.1"])
    return base


def test_manifest_sent_in_slow_pieces_over_tls_is_read_whole(pki: Path, tmp_path: Path) -> None:
    tls = {"certificate": str(pki / "server.crt"), "key": str(pki / "server.key")}
    server = make_server("dockyard", tmp_path / "tls", extra={"http.tls": tls})
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    try:
        config = b'{"architecture": "amd64", "os": "linux"}'
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=30)
        conn.request("POST", "/v2/hardening/tls/blobs/uploads/")
        started = conn.getresponse()
        started.read()
        location = started.getheader("Location", "")
        conn.request("PUT", f"{location}?digest={sha256(config)}", body=config)
        assert conn.getresponse().status == 201
        conn.close()
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [],
            "annotations": {"org.example.padding": "y" * 60_000},
        }
        raw = json.dumps(doc).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as plain:
            with context.wrap_socket(plain, server_hostname="127.0.0.1") as sock:
                reply = _send_slowly(sock, _manifest_put_head("hardening/tls", len(raw)), raw, 5)
        assert reply.status == 201, (reply.status, reply.body[:300])
    finally:
        server.stop()


# ---- item 6: bcrypt off the event loop, failing addresses slowed down ------------------------
def test_bcrypt_checks_leave_the_event_loop_free(tmp_path: Path) -> None:
    """Eight wrong passwords at once against a cost-12 user (about 0.3 s of CPU each): a user
    whose password was checked before is answered at once, while those checks still go on."""
    server = _auth_server(tmp_path, "right", cost=12)
    try:
        assert server.request("GET", "/v2/", headers=_basic("alice", "right")).status == 200
        answered: list[tuple[int, float]] = []
        sent = threading.Barrier(9, timeout=30)

        def wrong(number: int) -> None:
            token = _basic("alice", f"wrong-{number}")["Authorization"]
            with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
                sock.sendall(
                    f"GET /v2/ HTTP/1.1\r\nHost: registry\r\nAuthorization: {token}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                sent.wait()
                reply = _answer(sock)
            answered.append((reply.status, time.monotonic()))

        threads = [threading.Thread(target=wrong, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        sent.wait()
        time.sleep(0.2)  # the registry has read the wrong ones and is checking them
        took = []
        for _ in range(5):
            begun = time.monotonic()
            reply = server.request("GET", "/v2/", headers=_basic("alice", "right"))
            took.append(time.monotonic() - begun)
            assert reply.status == 200
        valid_done = time.monotonic()
        for thread in threads:
            thread.join(timeout=120)
        before = [status for status, at in answered if at <= valid_done]
        assert len(before) < 8, f"the valid requests ({took}) waited for every wrong one"
        assert max(took) < 1.0, took
        assert len(answered) == 8 and {status for status, _ in answered} <= {401, 429}, answered
    finally:
        server.stop()


def test_repeated_failures_from_one_address_are_slowed_down(tmp_path: Path) -> None:
    """A fast hash (cost 4), so any slowness is the registry's: after five failures in a row an
    address's 401s come later and later (the eighth at least half a second), more than two
    checks of it at once are answered 429 with Retry-After, and a right password still gets in
    and starts it afresh."""
    server = _auth_server(tmp_path, "right", cost=4)
    try:
        waits = []
        for number in range(8):
            begun = time.monotonic()
            reply = server.request("GET", "/v2/", headers=_basic("alice", f"wrong-{number}"))
            waits.append(time.monotonic() - begun)
            assert reply.status == 401 and reply.error_codes() == ["UNAUTHORIZED"]
        assert waits[-1] >= 0.5, waits
        replies: list[Reply] = []

        def wrong(number: int) -> None:
            replies.append(server.request("GET", "/v2/", headers=_basic("alice", f"w{number}")))

        threads = [threading.Thread(target=wrong, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        refused = [r for r in replies if r.status == 429]
        assert refused and all(r.error_codes() == ["TOOMANYREQUESTS"] for r in refused)
        assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
        assert server.request("GET", "/v2/", headers=_basic("alice", "right")).status == 200
        begun = time.monotonic()
        assert server.request("GET", "/v2/", headers=_basic("alice", "wrong")).status == 401
        assert time.monotonic() - begun < 0.5
    finally:
        server.stop()


# ---- item 7: bcrypt uses a password's first 72 bytes ------------------------------------------
@pytest.mark.parametrize("kind", ["dockyard", "distribution"])
def test_passwords_longer_than_72_bytes(kind: str, tmp_path: Path) -> None:
    password = "p" * 72 + "-and-beyond"
    server = _auth_server(tmp_path, password, cost=4, kind=kind)
    try:
        assert server.request("GET", "/v2/", headers=_basic("alice", password)).status == 200
        # bcrypt's definition: only the first 72 bytes count
        same = "p" * 72 + "-something-else"
        assert server.request("GET", "/v2/", headers=_basic("alice", same)).status == 200
        other = "q" + password[1:]
        assert server.request("GET", "/v2/", headers=_basic("alice", other)).status == 401
    finally:
        server.stop()


# ---- item 8: deeply nested bodies are MANIFEST_INVALID, never a 500 ---------------------------
def test_deeply_nested_manifest_is_invalid(registry: RegistryServer) -> None:
    wrong = []
    for depth in (5_000, 100_000):
        for body in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
            reply = _put_manifest(registry, "hardening/nested", body)
            if reply.status != 400 or reply.error_codes() != ["MANIFEST_INVALID"]:
                wrong.append((depth, body[:2], reply.status, reply.body[:100]))
    check(registry, not wrong, "an object 5000 deep without schemaVersion is a 500", wrong)
    if registry.kind == "dockyard":  # dockyard's own limit, far below the parser's
        raw = image_manifest(registry, "hardening/nested", [b"nested layer"])
        doc = json.loads(raw)
        doc["org.example.deep"] = json.loads("[" * 100 + "]" * 100)
        reply = _put_manifest(registry, "hardening/nested", json.dumps(doc).encode())
        assert reply.status == 400 and reply.error_codes() == ["MANIFEST_INVALID"]


# ---- item 9: n=0 is an empty page without a Link ----------------------------------------------
def test_page_of_zero_has_no_link(registry: RegistryServer) -> None:
    raw = image_manifest(registry, "hardening/zero", [b"zero layer"])
    assert _put_manifest(registry, "hardening/zero", raw).status == 201
    catalog = registry.request("GET", "/v2/_catalog?n=0")
    assert catalog.status == 200 and catalog.json()["repositories"] == []
    assert "link" not in catalog.headers, catalog.headers["link"]
    tags = registry.request("GET", "/v2/hardening/zero/tags/list?n=0")
    assert tags.status == 200
    ok = tags.json()["tags"] == [] and "link" not in tags.headers
    check(registry, ok, "tags/list ignores n", (tags.json(), tags.headers.get("link")))


# ---- item 10: every error is the spec's JSON with a spec code ---------------------------------
def _raw_request(registry: RegistryServer, data: bytes) -> Reply:
    with socket.create_connection(("127.0.0.1", registry.port), timeout=30) as sock:
        sock.sendall(data)
        return _answer(sock)


ODD_REQUESTS: dict[str, tuple[str, str, Optional[bytes]]] = {
    "encoded-traversal-digest": ("GET", "/v2/hardening/odd/blobs/sha256:..%2f..%2fetc", None),
    "newline-in-name": ("GET", "/v2/hardening%0a/tags/list", None),
    "newline-at-end": ("GET", "/v2/hardening/odd/tags/list%0a", None),
    "no-such-endpoint": ("GET", "/v2/hardening/odd/nothing/here", None),
    "outside-v2": ("GET", "/nothing", None),
    "bad-tag": ("GET", "/v2/hardening/odd/manifests/-bad", None),
    "bad-page-size": ("GET", "/v2/_catalog?n=abc", None),
}
RAW_REQUESTS: dict[str, bytes] = {
    "request-line-too-long": b"GET /v2/"
    + b"a" * 10_000
    + b"/tags/list HTTP/1.1\r\nHost: r\r\n\r\n",
    "header-without-colon": b"GET /v2/ HTTP/1.1\r\nHost: r\r\nNo colon here\r\n\r\n",
    "not-http": b"HELLO THERE\r\n\r\n",
}


@pytest.mark.parametrize("case", [*ODD_REQUESTS, *RAW_REQUESTS])
def test_errors_are_spec_json(registry: RegistryServer, case: str) -> None:
    if case in ODD_REQUESTS:
        method, path, body = ODD_REQUESTS[case]
        reply = registry.request(method, path, body=body)
    else:
        reply = _raw_request(registry, RAW_REQUESTS[case])
    codes = reply.error_codes()
    ok = (
        400 <= reply.status < 500
        and reply.headers.get("content-type", "").startswith("application/json")
        and bool(codes)
        and set(codes) <= SPEC_CODES
    )
    check(registry, ok, f"{case}: not the spec's JSON error", (reply.status, reply.body[:300]))


# ---- item 12: a 416 carries Content-Range: bytes */size ---------------------------------------
@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "bytes=5-2", "bytes=50-60"])
def test_unsatisfiable_range_has_content_range(registry: RegistryServer, header: str) -> None:
    digest = push_blob(registry, "hardening/range", b"0123456789")
    try:
        reply: Optional[Reply] = registry.request(
            "GET", f"/v2/hardening/range/blobs/{digest}", headers={"Range": header}
        )
    except http.client.HTTPException:
        reply = None
    ok = (
        reply is not None
        and reply.status == 416
        and reply.headers.get("content-range") == "bytes */10"
    )
    detail = (reply.status, reply.headers) if reply else "connection broken"
    check(registry, ok, f"{header}: no 416 with Content-Range", detail)


# ---- item 14: UTF-8 JSON only, sizes within int64 ---------------------------------------------
@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-16", "utf-32", "utf-8-sig"])
def test_manifest_must_be_utf8(registry: RegistryServer, encoding: str) -> None:
    raw = image_manifest(registry, "hardening/encoding", [b"encoded layer"])
    reply = _put_manifest(registry, "hardening/encoding", raw.decode().encode(encoding))
    assert reply.status == 400 and reply.error_codes() == ["MANIFEST_INVALID"], reply.status


def test_descriptor_sizes_within_int64(registry: RegistryServer) -> None:
    raw = image_manifest(registry, "hardening/size", [b"sized layer"])
    for size in (2**63 - 1, 10**40, 2**63, -1):
        doc = json.loads(raw)
        doc["layers"][0]["size"] = size
        reply = _put_manifest(registry, "hardening/size", json.dumps(doc).encode())
        if size == 2**63 - 1:
            assert reply.status == 201, reply.body[:200]
            continue
        ok = reply.status == 400 and reply.error_codes() == ["MANIFEST_INVALID"]
        if size < 0:
            check(registry, ok, "a negative size is accepted", reply.status)
        assert ok, (size, reply.status, reply.body[:200])


# ---- failures counted per (address, user); unknown names cost a bcrypt check too -------------
def _two_user_server(tmp_path: Path) -> Any:
    """A registry with alice (password "right") and carol ("carol-right"), cost 4, one process."""
    server = _auth_server(tmp_path, "right", cost=4)
    subprocess.run(
        ["htpasswd", "-Bb", "-C", "4", str(tmp_path / "htpasswd"), "carol", "carol-right"],
        check=True,
        capture_output=True,
    )
    server.stop()  # the file is read at start: start again with carol in it
    server.start()
    return server


def _fail_alice(server: RegistryServer, count: int) -> None:
    for number in range(count):
        reply = server.request("GET", "/v2/", headers=_basic("alice", f"wrong-{number}"))
        assert reply.status == 401, (reply.status, reply.body[:300])


def test_a_failing_user_does_not_lock_out_others_behind_its_address(tmp_path: Path) -> None:
    """Behind one address (a NAT), alice's host keeps failing, two checks at once and past the
    back-off; carol, whose right password is not remembered yet, gets in (200, not 429): the
    back-off and its cap on checks at once count per address and user name. Before, carol got
    429 "too many failed logins from this address"."""
    server = _two_user_server(tmp_path)
    try:
        _fail_alice(server, 8)
        replies: list[Reply] = []

        def wrong(number: int) -> None:
            replies.append(server.request("GET", "/v2/", headers=_basic("alice", f"w{number}")))

        threads = [threading.Thread(target=wrong, args=(n,)) for n in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)  # both are waiting out their delays (2 s and more)
        carol = server.request("GET", "/v2/", headers=_basic("carol", "carol-right"))
        assert carol.status == 200, (carol.status, carol.body[:300])
        for thread in threads:
            thread.join(timeout=60)
        assert [r.status for r in replies] == [401, 401], [r.status for r in replies]
    finally:
        server.stop()


def test_a_login_resets_only_its_own_users_failures(tmp_path: Path) -> None:
    """An attacker holding carol's account interleaves carol's logins with guesses at alice's
    password: alice's 401s stay delayed. Before, any success from the address started the
    address afresh and the guesses were never slowed down."""
    server = _two_user_server(tmp_path)
    try:
        _fail_alice(server, 8)
        assert server.request("GET", "/v2/", headers=_basic("carol", "carol-right")).status == 200
        begun = time.monotonic()
        assert server.request("GET", "/v2/", headers=_basic("alice", "guess")).status == 401
        assert time.monotonic() - begun >= 0.5, "carol's login reset alice's back-off"
        # alice's own right password does start her afresh
        assert server.request("GET", "/v2/", headers=_basic("alice", "right")).status == 200
        begun = time.monotonic()
        assert server.request("GET", "/v2/", headers=_basic("alice", "wrong")).status == 401
        assert time.monotonic() - begun < 0.5
    finally:
        server.stop()


def test_unknown_users_cost_a_bcrypt_check_like_known_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user name that does not exist is checked against a stand-in hash of the users' cost,
    on the same bounded pool, so a 401's timing does not tell which names exist (checked by
    the path taken, not by timing). Before, unknown names were answered without bcrypt."""
    from dockyard.registry import auth as auth_module
    from dockyard.registry.errors import Unauthorized

    _htpasswd(tmp_path / "htpasswd", "alice", "right", cost=5)
    users = auth_module.load_htpasswd(str(tmp_path / "htpasswd"))
    checked: list[tuple[bytes, bytes]] = []
    real = auth_module.bcrypt_ok

    def recording(password: bytes, stored: bytes) -> bool:
        checked.append((password, stored))
        return real(password, stored)

    monkeypatch.setattr(auth_module, "bcrypt_ok", recording)
    auth = auth_module.BasicAuth("hardening", users)

    async def attempt(user: str, password: str) -> None:
        header = _basic(user, password)["Authorization"]
        with pytest.raises(Unauthorized):
            await auth.check(header, "192.0.2.7")

    try:
        asyncio.run(attempt("mallory", "guess"))
        asyncio.run(attempt("alice", "guess"))
    finally:
        auth.close()
    assert [password for password, _ in checked] == [b"guess", b"guess"], checked
    unknown, known = checked[0][1], checked[1][1]
    assert known == users["alice"]
    assert unknown != known and unknown[:7] == known[:7].replace(b"$2y$", b"$2b$"), unknown
