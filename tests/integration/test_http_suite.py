"""An HTTP-level conformance suite of our own for every endpoint and error of the OCI
Distribution Spec v1.1 that dockyard serves, run against dockyard *and* Debian's CNCF
distribution 2.8 so both are compared on the same checks. Where distribution 2.8 does not do
what the spec asks (it predates v1.1), the check is a strict xfail on distribution only."""

from __future__ import annotations

import http.client
import json
import os
import socket

import pytest

from tests.integration.conftest import (
    RegistryServer,
    image_manifest,
    location_path,
    push_blob,
    sha256,
    with_digest,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


def check(registry: RegistryServer, ok: bool, gap: str, detail: object = "") -> None:
    """Assert `ok`; on distribution 2.8, a known `gap` must still fail and is reported as xfail
    (if distribution ever passes, the test fails so the note gets removed)."""
    if registry.kind == "distribution":
        if ok:
            pytest.fail(f"distribution 2.8 now passes ({gap}): remove the gap note")
        pytest.xfail(f"distribution 2.8: {gap}")
    assert ok, detail


_loc = location_path
_with_digest = with_digest


# ---- base ------------------------------------------------------------------------------------
def test_base_endpoint(registry: RegistryServer) -> None:
    reply = registry.request("GET", "/v2/")
    assert reply.status == 200
    assert reply.headers["docker-distribution-api-version"] == "registry/2.0"


# ---- blob uploads ------------------------------------------------------------------------------
def test_monolithic_post_with_digest(registry: RegistryServer) -> None:
    data = os.urandom(100_000)
    digest = sha256(data)
    reply = registry.request("POST", f"/v2/suite/mono/blobs/uploads/?digest={digest}", body=data)
    check(registry, reply.status == 201, "no single-POST monolithic upload", reply.status)
    assert reply.headers["docker-content-digest"] == digest
    assert _loc(reply.headers["location"]).endswith(f"/v2/suite/mono/blobs/{digest}")
    head = registry.request("HEAD", f"/v2/suite/mono/blobs/{digest}")
    assert head.status == 200 and head.headers["content-length"] == str(len(data))
    assert head.headers["docker-content-digest"] == digest
    got = registry.request("GET", f"/v2/suite/mono/blobs/{digest}")
    assert got.status == 200 and got.body == data


def test_post_then_put(registry: RegistryServer) -> None:
    data = os.urandom(5000)
    reply = registry.request("POST", "/v2/suite/postput/blobs/uploads/")
    assert reply.status == 202 and reply.headers["range"] == "0-0"
    put = registry.request(
        "PUT",
        _with_digest(reply.headers["location"], sha256(data)),
        body=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert put.status == 201
    assert registry.request("GET", f"/v2/suite/postput/blobs/{sha256(data)}").body == data


def test_streamed_patch_then_put(registry: RegistryServer) -> None:
    data = os.urandom(300_000)
    start = registry.request("POST", "/v2/suite/stream/blobs/uploads/")
    patch = registry.request(
        "PATCH",
        _loc(start.headers["location"]),
        body=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert patch.status == 202
    assert patch.headers["range"] == f"0-{len(data) - 1}"
    put = registry.request("PUT", _with_digest(patch.headers["location"], sha256(data)))
    assert put.status == 201
    assert registry.request("GET", f"/v2/suite/stream/blobs/{sha256(data)}").body == data


def test_chunked_patches_status_and_out_of_order(registry: RegistryServer) -> None:
    data = os.urandom(20_000)
    a, b = data[:12_000], data[12_000:]
    start = registry.request("POST", "/v2/suite/chunks/blobs/uploads/")
    first = registry.request(
        "PATCH",
        _loc(start.headers["location"]),
        body=a,
        headers={"Content-Range": f"0-{len(a) - 1}", "Content-Type": "application/octet-stream"},
    )
    assert first.status == 202 and first.headers["range"] == f"0-{len(a) - 1}"
    status = registry.request("GET", _loc(first.headers["location"]))
    assert status.status == 204 and status.headers["range"] == f"0-{len(a) - 1}"
    repeated = registry.request(
        "PATCH",
        _loc(first.headers["location"]),
        body=a,
        headers={"Content-Range": f"0-{len(a) - 1}", "Content-Type": "application/octet-stream"},
    )
    check(registry, repeated.status == 416, "a repeated chunk is appended again", repeated)
    gap = registry.request(
        "PATCH",
        _loc(first.headers["location"]),
        body=b,
        headers={
            "Content-Range": f"{len(a) + 10}-{len(data) + 9}",
            "Content-Type": "application/octet-stream",
        },
    )
    assert gap.status == 416
    second = registry.request(
        "PATCH",
        _loc(first.headers["location"]),
        body=b,
        headers={
            "Content-Range": f"{len(a)}-{len(data) - 1}",
            "Content-Type": "application/octet-stream",
        },
    )
    assert second.status == 202 and second.headers["range"] == f"0-{len(data) - 1}"
    put = registry.request("PUT", _with_digest(second.headers["location"], sha256(data)))
    assert put.status == 201
    assert registry.request("GET", f"/v2/suite/chunks/blobs/{sha256(data)}").body == data


def test_cancel_upload(registry: RegistryServer) -> None:
    start = registry.request("POST", "/v2/suite/cancel/blobs/uploads/")
    location = _loc(start.headers["location"])
    assert registry.request("DELETE", location).status == 204
    gone = registry.request("GET", location)
    assert gone.status == 404 and "BLOB_UPLOAD_UNKNOWN" in gone.error_codes()


def test_unknown_upload(registry: RegistryServer) -> None:
    reply = registry.request(
        "GET", "/v2/suite/unknown/blobs/uploads/7b1c6e4e-0000-4000-8000-000000000000"
    )
    assert reply.status == 404
    check(
        registry,
        "BLOB_UPLOAD_UNKNOWN" in reply.error_codes(),
        "answers BLOB_UPLOAD_INVALID for an unknown upload",
        reply.error_codes(),
    )


def test_digest_mismatch_on_put(registry: RegistryServer) -> None:
    start = registry.request("POST", "/v2/suite/mismatch/blobs/uploads/")
    reply = registry.request(
        "PUT",
        _with_digest(start.headers["location"], sha256(b"other")),
        body=b"content",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert reply.status == 400 and "DIGEST_INVALID" in reply.error_codes()
    assert registry.request("HEAD", f"/v2/suite/mismatch/blobs/{sha256(b'content')}").status == 404


@pytest.mark.parametrize(
    "digest", ["sha256:abc", "md5:d41d8cd98f00b204e9800998ecf8427e", "sha256:" + "G" * 64]
)
def test_invalid_digest_parameter(registry: RegistryServer, digest: str) -> None:
    start = registry.request("POST", "/v2/suite/baddigest/blobs/uploads/")
    reply = registry.request(
        "PUT",
        _with_digest(start.headers["location"], digest),
        body=b"x",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert reply.status == 400 and "DIGEST_INVALID" in reply.error_codes()


# ---- blobs ---------------------------------------------------------------------------------
def test_range_requests(registry: RegistryServer) -> None:
    data = os.urandom(10_000)
    digest = push_blob(registry, "suite/range", data)
    part = registry.request(
        "GET", f"/v2/suite/range/blobs/{digest}", headers={"Range": "bytes=100-1099"}
    )
    assert part.status == 206 and part.body == data[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(data)}"
    tail = registry.request(
        "GET", f"/v2/suite/range/blobs/{digest}", headers={"Range": "bytes=9000-"}
    )
    assert tail.status == 206 and tail.body == data[9000:]


def test_unsatisfiable_range(registry: RegistryServer) -> None:
    digest = push_blob(registry, "suite/range416", b"0123456789")
    try:
        reply = registry.request(
            "GET", f"/v2/suite/range416/blobs/{digest}", headers={"Range": "bytes=50-60"}
        )
        status = reply.status
    except http.client.HTTPException:
        status = 0
    check(registry, status == 416, "breaks the connection on an unsatisfiable range", status)


def test_downloads_keep_alive_and_survive_abandoned_ones(registry: RegistryServer) -> None:
    """Two whole downloads (and a range) on one keep-alive connection come back byte-exact, and
    clients that hang up mid-download leave the registry serving everyone else."""
    data = os.urandom(6 * 1024 * 1024 + 123)
    digest = push_blob(registry, "suite/download", data)
    path = f"/v2/suite/download/blobs/{digest}"
    conn = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=30)
    try:
        for headers in ({}, {"Range": "bytes=1000-"}, {}):
            conn.request("GET", path, headers=headers)
            reply = conn.getresponse()
            body = reply.read()
            assert body == (data[1000:] if headers else data), (reply.status, len(body))
            assert reply.status == (206 if headers else 200)
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", registry.port), timeout=30) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert sock.recv(65536)  # some of it, then hang up
        conn.request("GET", path)
        reply = conn.getresponse()
        assert reply.status == 200 and reply.read() == data
    finally:
        conn.close()
    assert registry.request("GET", "/v2/").status == 200


def test_blob_unknown_and_not_linked(registry: RegistryServer) -> None:
    missing = registry.request("GET", f"/v2/suite/unknown/blobs/{sha256(b'nothing here')}")
    assert missing.status == 404 and "BLOB_UNKNOWN" in missing.error_codes()
    digest = push_blob(registry, "suite/owner", b"private layer")
    other = registry.request("HEAD", f"/v2/suite/stranger/blobs/{digest}")
    assert other.status == 404


def test_cross_repository_mount(registry: RegistryServer) -> None:
    digest = push_blob(registry, "suite/mountsrc", b"shared layer bytes")
    mounted = registry.request(
        "POST", f"/v2/suite/mountdst/blobs/uploads/?mount={digest}&from=suite/mountsrc"
    )
    assert mounted.status == 201 and mounted.headers["docker-content-digest"] == digest
    assert registry.request("HEAD", f"/v2/suite/mountdst/blobs/{digest}").status == 200
    fallback = registry.request(
        "POST", f"/v2/suite/mountdst2/blobs/uploads/?mount={digest}&from=suite/nothere"
    )
    assert fallback.status == 202 and fallback.headers.get("location")


def test_blob_delete(registry: RegistryServer) -> None:
    digest = push_blob(registry, "suite/blobdel", b"to be deleted")
    assert registry.request("DELETE", f"/v2/suite/blobdel/blobs/{digest}").status == 202
    assert registry.request("HEAD", f"/v2/suite/blobdel/blobs/{digest}").status == 404


# ---- manifests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("media", [OCI_MANIFEST, DOCKER_MANIFEST])
def test_manifest_put_get_head(registry: RegistryServer, media: str) -> None:
    raw = image_manifest(registry, "suite/manifest", [os.urandom(1000)], media)
    put = registry.request(
        "PUT", "/v2/suite/manifest/manifests/v1", body=raw, headers={"Content-Type": media}
    )
    assert put.status == 201
    digest = put.headers["docker-content-digest"]
    assert digest == sha256(raw)
    for ref in ("v1", digest):
        got = registry.request(
            "GET", f"/v2/suite/manifest/manifests/{ref}", headers={"Accept": media}
        )
        assert got.status == 200 and got.body == raw
        assert got.headers["content-type"] == media
        assert got.headers["docker-content-digest"] == digest
        head = registry.request(
            "HEAD", f"/v2/suite/manifest/manifests/{ref}", headers={"Accept": media}
        )
        assert head.status == 200 and head.headers["content-length"] == str(len(raw))


def test_manifest_put_by_digest(registry: RegistryServer) -> None:
    raw = image_manifest(registry, "suite/bydigest", [b"layer"])
    put = registry.request(
        "PUT",
        f"/v2/suite/bydigest/manifests/{sha256(raw)}",
        body=raw,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert put.status == 201
    wrong = registry.request(
        "PUT",
        f"/v2/suite/bydigest/manifests/{sha256(b'x')}",
        body=raw,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert wrong.status == 400 and "DIGEST_INVALID" in wrong.error_codes()


def test_manifest_blob_unknown(registry: RegistryServer) -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(b"missing config"),
            "size": 14,
        },
        "layers": [],
    }
    reply = registry.request(
        "PUT",
        "/v2/suite/blobunknown/manifests/v1",
        body=json.dumps(doc).encode(),
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert reply.status == 400 and "MANIFEST_BLOB_UNKNOWN" in reply.error_codes()


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"schemaVersion": 1}', b'{"schemaVersion": 2, "config": 5}'],
    ids=["not-json", "array", "schema1", "bad-config"],
)
def test_manifest_invalid(registry: RegistryServer, body: bytes) -> None:
    reply = registry.request(
        "PUT",
        "/v2/suite/invalid/manifests/v1",
        body=body,
        headers={"Content-Type": OCI_MANIFEST},
    )
    ok = reply.status == 400 and "MANIFEST_INVALID" in reply.error_codes()
    if body.startswith(b'{"schemaVersion": 1'):
        check(registry, ok, "a schema 1 body under an OCI Content-Type is a 500", reply.status)
    assert ok, (reply.status, reply.body[:200])


def test_manifest_over_4_mib(registry: RegistryServer) -> None:
    raw = image_manifest(
        registry,
        "suite/huge",
        [b"layer"],
        extra={"annotations": {"padding": "x" * (4 * 1024 * 1024 + 10)}},
    )
    reply = registry.request(
        "PUT", "/v2/suite/huge/manifests/v1", body=raw, headers={"Content-Type": OCI_MANIFEST}
    )
    assert reply.status in (400, 413) and reply.error_codes()


def test_manifest_unknown(registry: RegistryServer) -> None:
    push_blob(registry, "suite/nomanifest", b"exists")
    reply = registry.request("GET", "/v2/suite/nomanifest/manifests/nope")
    assert reply.status == 404 and "MANIFEST_UNKNOWN" in reply.error_codes()


@pytest.mark.parametrize("media", [OCI_INDEX, DOCKER_LIST])
def test_index_and_manifest_list(registry: RegistryServer, media: str) -> None:
    child_media = OCI_MANIFEST if media == OCI_INDEX else DOCKER_MANIFEST
    raw = image_manifest(registry, "suite/index", [os.urandom(500)], child_media)
    registry.request(
        "PUT",
        f"/v2/suite/index/manifests/{sha256(raw)}",
        body=raw,
        headers={"Content-Type": child_media},
    )
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media,
            "manifests": [
                {
                    "mediaType": child_media,
                    "digest": sha256(raw),
                    "size": len(raw),
                    "platform": {"architecture": "amd64", "os": "linux"},
                }
            ],
        }
    ).encode()
    put = registry.request(
        "PUT", "/v2/suite/index/manifests/multi", body=index, headers={"Content-Type": media}
    )
    assert put.status == 201
    got = registry.request("GET", "/v2/suite/index/manifests/multi", headers={"Accept": media})
    assert got.status == 200 and got.body == index and got.headers["content-type"] == media


def test_index_referencing_unknown_manifest(registry: RegistryServer) -> None:
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": sha256(b"no such manifest"), "size": 16}
            ],
        }
    ).encode()
    reply = registry.request(
        "PUT", "/v2/suite/badindex/manifests/v1", body=index, headers={"Content-Type": OCI_INDEX}
    )
    assert reply.status == 400
    assert "MANIFEST_BLOB_UNKNOWN" in reply.error_codes()


def test_manifest_delete(registry: RegistryServer) -> None:
    raw = image_manifest(registry, "suite/mdel", [b"layer for deletion"])
    put = registry.request(
        "PUT", "/v2/suite/mdel/manifests/gone", body=raw, headers={"Content-Type": OCI_MANIFEST}
    )
    digest = put.headers["docker-content-digest"]
    assert registry.request("DELETE", f"/v2/suite/mdel/manifests/{digest}").status == 202
    reply = registry.request("GET", f"/v2/suite/mdel/manifests/{digest}")
    assert reply.status == 404 and "MANIFEST_UNKNOWN" in reply.error_codes()
    assert registry.request("GET", "/v2/suite/mdel/manifests/gone").status == 404


# ---- tags and catalog ---------------------------------------------------------------------------
def test_tags_list_and_pagination(registry: RegistryServer) -> None:
    raw = image_manifest(registry, "suite/tags", [b"tagged layer"])
    for tag in ("c", "a", "b", "d"):
        assert (
            registry.request(
                "PUT",
                f"/v2/suite/tags/manifests/{tag}",
                body=raw,
                headers={"Content-Type": OCI_MANIFEST},
            ).status
            == 201
        )
    full = registry.request("GET", "/v2/suite/tags/tags/list")
    assert full.status == 200 and sorted(full.json()["tags"]) == ["a", "b", "c", "d"]
    check(registry, full.json()["tags"] == ["a", "b", "c", "d"], "tags are not sorted", full.json())
    page = registry.request("GET", "/v2/suite/tags/tags/list?n=2")
    assert page.json()["tags"] == ["a", "b"]
    assert 'rel="next"' in page.headers["link"] and "last=b" in page.headers["link"]
    rest = registry.request("GET", "/v2/suite/tags/tags/list?n=2&last=b")
    assert rest.json()["tags"] == ["c", "d"]


def test_tags_of_unknown_repository(registry: RegistryServer) -> None:
    reply = registry.request("GET", "/v2/suite/neverpushed/tags/list")
    assert reply.status == 404 and "NAME_UNKNOWN" in reply.error_codes()


def test_catalog_pagination(registry: RegistryServer) -> None:
    for name in ("catalog/x1", "catalog/x2", "catalog/x3"):
        raw = image_manifest(registry, name, [name.encode()])
        registry.request(
            "PUT", f"/v2/{name}/manifests/latest", body=raw, headers={"Content-Type": OCI_MANIFEST}
        )
    full = registry.request("GET", "/v2/_catalog?n=1000").json()["repositories"]
    assert {"catalog/x1", "catalog/x2", "catalog/x3"} <= set(full)
    assert full == sorted(full)
    page = registry.request("GET", "/v2/_catalog?n=1&last=catalog/x1")
    assert page.json()["repositories"] == ["catalog/x2"]
    assert 'rel="next"' in page.headers["link"]


def test_invalid_pagination(registry: RegistryServer) -> None:
    reply = registry.request("GET", "/v2/_catalog?n=abc")
    check(registry, reply.status == 400, "ignores a non-numeric n", reply.status)


# ---- referrers (OCI 1.1) -----------------------------------------------------------------------
def test_referrers_api(registry: RegistryServer) -> None:
    subject_raw = image_manifest(registry, "suite/refs", [b"subject layer"])
    subject = registry.request(
        "PUT",
        "/v2/suite/refs/manifests/v1",
        body=subject_raw,
        headers={"Content-Type": OCI_MANIFEST},
    )
    subject_digest = subject.headers["docker-content-digest"]
    empty = push_blob(registry, "suite/refs", b"{}")
    descriptors = []
    for artifact in ("application/vnd.example.sbom", "application/vnd.example.signature"):
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact,
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": empty,
                "size": 2,
            },
            "layers": [],
            "subject": {
                "mediaType": OCI_MANIFEST,
                "digest": subject_digest,
                "size": len(subject_raw),
            },
            "annotations": {"org.example.kind": artifact},
        }
        raw = json.dumps(doc).encode()
        put = registry.request(
            "PUT",
            f"/v2/suite/refs/manifests/{sha256(raw)}",
            body=raw,
            headers={"Content-Type": OCI_MANIFEST},
        )
        assert put.status == 201
        check(
            registry,
            put.headers.get("oci-subject") == subject_digest,
            "no referrers API (OCI distribution spec 1.1)",
            put.headers,
        )
        descriptors.append(sha256(raw))
    reply = registry.request("GET", f"/v2/suite/refs/referrers/{subject_digest}")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith(OCI_INDEX)
    body = reply.json()
    assert body["mediaType"] == OCI_INDEX
    assert sorted(m["digest"] for m in body["manifests"]) == sorted(descriptors)
    filtered = registry.request(
        "GET",
        f"/v2/suite/refs/referrers/{subject_digest}?artifactType=application/vnd.example.sbom",
    )
    assert filtered.headers["oci-filters-applied"] == "artifactType"
    assert [m["artifactType"] for m in filtered.json()["manifests"]] == [
        "application/vnd.example.sbom"
    ]
    none = registry.request("GET", f"/v2/suite/refs/referrers/{sha256(b'no subject')}")
    assert none.status == 200 and none.json()["manifests"] == []


# ---- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["UPPER/case", "a..b", "-lead", "trail-", "x" * 300])
def test_invalid_names(registry: RegistryServer, name: str) -> None:
    reply = registry.request("GET", f"/v2/{name}/tags/list")
    ok = reply.status == 400 and "NAME_INVALID" in reply.error_codes()
    if registry.kind == "distribution" and reply.status == 404:
        check(registry, ok, "invalid names fall through its router as 404", reply.status)
    if len(name) > 255:
        check(registry, ok, "a name over 255 characters is a 500", reply.status)
    assert ok, reply.status


@pytest.mark.parametrize(
    "path",
    [
        "/v2/a/../../../etc/passwd/blobs/sha256:" + "0" * 64,
        "/v2/a/%2e%2e/%2e%2e/etc/tags/list",
        "/v2/a/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd",
        "/v2/a/manifests/..%2f..%2fx",
    ],
)
def test_path_traversal_is_refused(registry: RegistryServer, path: str) -> None:
    reply = registry.request("GET", path)
    # A redirect to the cleaned path (distribution) or a 4xx (dockyard): never served, never 5xx.
    assert 300 <= reply.status < 500
    if registry.kind == "dockyard":
        assert 400 <= reply.status < 500


def test_truncated_upload_leaves_no_blob(registry: RegistryServer) -> None:
    data = os.urandom(50_000)
    start = registry.request("POST", "/v2/suite/truncated/blobs/uploads/")
    location = _loc(start.headers["location"])
    with socket.create_connection(("127.0.0.1", registry.port)) as sock:
        sock.sendall(
            f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data[:20_000]
        )
    status = registry.request("GET", location)
    assert status.status in (204, 404)
    put = registry.request("PUT", _with_digest(location, sha256(data)))
    assert put.status in (400, 404)
    assert registry.request("HEAD", f"/v2/suite/truncated/blobs/{sha256(data)}").status == 404
    assert registry.request("GET", "/v2/").status == 200


def test_unsupported_method(registry: RegistryServer) -> None:
    reply = registry.request("DELETE", "/v2/suite/x/tags/list")
    assert 400 <= reply.status < 500
