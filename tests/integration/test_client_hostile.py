"""`dockyard image pull|push` against registries that misbehave, run as the real CLI: fake
registries in this process (aiohttp in a thread, or a raw socket that answers garbage) on
loopback addresses answer non-HTTP bytes, truncated or oversized bodies, documents of the wrong
shape, redirects to a second host (which must never see the registry's credentials, nor be
reached from HTTPS over plain HTTP without --insecure) and 416s to resumed downloads; each fault
must end in exit code 1 and exactly one error line naming the registry or reference and what was
wrong, never a traceback, and partial downloads must be used, resumed or reported as the issue
asks. A `sitecustomize` shim makes `registry.test` resolve to 127.0.0.1 and `*.invalid` fail to
resolve, so no traffic leaves loopback."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
from aiohttp import web

from dockyard import pki
from tests.integration.conftest import free_port, sha256

BIN = Path(sys.executable).parent
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REPO = "hostile/app"
# What the pull prints per blob on stderr besides errors: "<12 hex>: Pull complete".
PROGRESS = re.compile(r"[0-9a-f]{12}: ")
# A registry name off loopback (for the client) that the shim resolves to 127.0.0.1.
OFF_LOOPBACK = "registry.test"
# A registry name whose look-up the shim fails, as DNS would.
UNKNOWN_HOST = "registry.invalid"
# Loaded by every `dockyard` the tests run (PYTHONPATH): name resolution without DNS traffic.
SHIM = f'''"""Test shim: {OFF_LOOPBACK} is 127.0.0.1, *.invalid does not resolve."""
import socket

_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, *args, **kwargs):
    if host == "{OFF_LOOPBACK}":
        host = "127.0.0.1"
    elif isinstance(host, str) and host.endswith(".invalid"):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = getaddrinfo
'''
# Bytes in a manifest or config the client must refuse (the limit is 4 MiB).
OVERSIZED = 5 * 1024 * 1024
# Bytes a fake registry streams as one chunked manifest to see how much the client reads.
STREAMED = 64 * 1024 * 1024

Hook = Callable[[web.Request, str], Awaitable[Optional[web.StreamResponse]]]


@dataclass
class FakeImage:
    """One image as a registry stores it: manifest bytes and blobs by digest."""

    manifest: bytes
    blobs: dict[str, bytes]
    config: str
    layer: Optional[str]


def make_image(config: Optional[bytes] = None, padding: int = 0) -> FakeImage:
    """A one-layer OCI image (a gzipped tar of ~200 kB); `config` replaces its config (and then
    the image has no layers), `padding` makes the config that many bytes bigger."""
    blobs: dict[str, bytes] = {}
    layers: list[dict[str, Any]] = []
    layer_digest = None
    if config is None:
        tar_bytes = io.BytesIO()
        with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
            payload = os.urandom(200_000)
            info = tarfile.TarInfo("data.bin")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        layer = gzip.compress(tar_bytes.getvalue(), mtime=0)
        layer_digest = sha256(layer)
        blobs[layer_digest] = layer
        layers.append({"mediaType": OCI_LAYER, "digest": layer_digest, "size": len(layer)})
        doc: dict[str, Any] = {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(tar_bytes.getvalue())]},
        }
        if padding:
            doc["padding"] = "x" * padding
        config = json.dumps(doc).encode()
    blobs[sha256(config)] = config
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": layers,
    }
    return FakeImage(json.dumps(manifest).encode(), blobs, sha256(config), layer_digest)


def range_response(request: web.Request, data: bytes) -> web.Response:
    """The blob as a registry serves it: whole, or from a Range start (206), or 416 past it."""
    wanted = request.headers.get("Range")
    if not wanted:
        return web.Response(body=data, content_type="application/octet-stream")
    start = int(wanted.removeprefix("bytes=").split("-")[0])
    if start >= len(data):
        return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
    return web.Response(
        body=data[start:],
        status=206,
        headers={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"},
    )


@dataclass
class Fake:
    """A registry serving one image as distribution does (Range included), unless a test's hook
    answers first; `seen` holds (method, path with query, headers) of every request."""

    image: FakeImage
    basic: Optional[str] = None  # the Authorization it insists on, if any
    manifest_hook: Optional[Hook] = None
    blob_hook: Optional[Hook] = None
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def requests_for(self, digest: str) -> list[dict[str, str]]:
        return [headers for method, path, headers in self.seen if digest in path]

    def app(self) -> web.Application:
        async def v2(request: web.Request) -> web.StreamResponse:
            self.seen.append((request.method, request.path_qs, dict(request.headers)))
            if self.basic and request.headers.get("Authorization") != self.basic:
                return web.json_response(
                    {"errors": [{"code": "UNAUTHORIZED", "message": "credentials needed"}]},
                    status=401,
                    headers={"WWW-Authenticate": 'Basic realm="fake"'},
                )
            tail = request.match_info["tail"]
            if tail == "":
                return web.json_response({})
            kind, _, name = tail.removeprefix(f"{REPO}/").partition("/")
            hook = self.manifest_hook if kind == "manifests" else self.blob_hook
            if hook is not None:
                answer = await hook(request, name)
                if answer is not None:
                    return answer
            if kind == "manifests":
                return web.Response(body=self.image.manifest, content_type=OCI_MANIFEST)
            if name in self.image.blobs:
                return range_response(request, self.image.blobs[name])
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)

        app = web.Application()
        app.router.add_route("*", "/v2/{tail:.*}", v2)
        return app


@contextmanager
def serving(
    app: web.Application, host: str = "127.0.0.1", tls: Optional[ssl.SSLContext] = None
) -> Iterator[str]:
    """`app` served on `host` (a free port) from a thread; yields `host:port`."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    ready = threading.Event()
    ports: list[int] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, host, 0, ssl_context=tls).start())
        ports.append(runner.addresses[0][1])
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10), "the fake registry did not start"
    try:
        yield f"{host}:{ports[0]}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


@contextmanager
def raw_server(answer: bytes) -> Iterator[str]:
    """A TCP server on 127.0.0.1 that reads a request (or a TLS hello), answers `answer` —
    whatever bytes — and closes; yields `127.0.0.1:port`."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(answer)
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(65536):  # drain, so the close sends no reset
                        pass
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("shim")
    (directory / "sitecustomize.py").write_text(SHIM)
    return directory


@pytest.fixture
def cli(shim: Path, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs `dockyard image <args> --root <tmp>/store --driver vfs` with the shim loaded."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), env.get("PYTHONPATH")) if p)

    def run(*args: str, stdin: Optional[str] = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "dockyard"), "image", *args, "--root", str(tmp_path / "store")]
            + ["--driver", "vfs"],
            capture_output=True,
            text=True,
            input=stdin,
            env=env,
            timeout=120,
            check=False,
        )

    return run


def one_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit code 1, no traceback, exactly one error line (besides per-blob progress lines),
    and that line holds every needle."""
    assert proc.returncode == 1, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if not PROGRESS.match(line)]
    assert len(errors) == 1, proc.stderr
    line = errors[0]
    assert line.startswith("dockyard: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def pulled(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "Image sha256:" in proc.stdout


def partial_of(tmp_path: Path, digest: str) -> Path:
    tmp = tmp_path / "store" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp / f"download-{digest[7:]}.partial"


def blob_in_store(tmp_path: Path, digest: str) -> Path:
    return tmp_path / "store" / "blobs" / "sha256" / digest[7:]


# ---- item 6: garbage, truncation, wrong shapes, names ----------------------------------------
@pytest.mark.parametrize(
    ("answer", "fault"),
    [
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", "does not speak HTTP"),
        (b"\x00\xff\xfegarbage\r\n\r\n", "does not speak HTTP"),
        (b"", "closed the connection without answering"),
    ],
    ids=["ssh-banner", "binary", "silent-close"],
)
def test_a_reply_that_is_not_http_is_one_line(answer: bytes, fault: str, cli: Any) -> None:
    with raw_server(answer) as address:
        one_error(cli("pull", f"{address}/{REPO}:1"), address, fault)


def test_a_truncated_manifest_is_one_line(cli: Any) -> None:
    image = make_image()
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: " + OCI_MANIFEST.encode() + b"\r\n"
        b"Content-Length: " + str(len(image.manifest)).encode() + b"\r\n\r\n"
    )
    with raw_server(head + image.manifest[: len(image.manifest) // 2]) as address:
        one_error(cli("pull", f"{address}/{REPO}:1"), address, "truncated")


@pytest.mark.parametrize(
    ("body", "media", "fault"),
    [
        (b"[]", OCI_MANIFEST, "the manifest is an array, not a JSON object"),
        (b'"manifest"', OCI_MANIFEST, "the manifest is a string, not a JSON object"),
        (
            json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode(),
            OCI_MANIFEST,
            "the manifest has no config",
        ),
        (
            json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": []}).encode(),
            OCI_MANIFEST,
            "config is an array, not an object",
        ),
        (
            json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": {"digest": "sha256:../../../etc/passwd", "size": 10},
                }
            ).encode(),
            OCI_MANIFEST,
            "config has no sha256 digest",
        ),
        (b"{not json", OCI_MANIFEST, "the manifest is not JSON"),
        (
            b"<!DOCTYPE html><html><body><h1>Sign in</h1></body></html>",
            "text/html",
            "answered an HTML page where the manifest should be",
        ),
    ],
    ids=["array", "string", "no-config", "config-array", "bad-digest", "not-json", "html"],
)
def test_a_manifest_of_the_wrong_shape_is_one_line(
    body: bytes, media: str, fault: str, cli: Any
) -> None:
    async def manifest(request: web.Request, name: str) -> web.StreamResponse:
        return web.Response(body=body, headers={"Content-Type": media})

    fake = Fake(make_image(), manifest_hook=manifest)
    with serving(fake.app()) as address:
        one_error(cli("pull", f"{address}/{REPO}:1"), f"{address}/{REPO}:1", fault)


@pytest.mark.parametrize(
    ("config", "fault"),
    [
        (b"[]", "is an array, not a JSON object"),
        (b'{"rootfs": []}', "rootfs.diff_ids is not a list of sha256 digests"),
        (b"\xff\xfe not json", "is not JSON (not UTF-8 text)"),
    ],
    ids=["array", "rootfs-array", "not-json"],
)
def test_a_config_of_the_wrong_shape_is_one_line(config: bytes, fault: str, cli: Any) -> None:
    fake = Fake(make_image(config=config))
    with serving(fake.app()) as address:
        one_error(cli("pull", f"{address}/{REPO}:1"), f"{address}/{REPO}:1", "config", fault)


def test_a_reference_with_a_port_that_is_no_number_is_one_line(cli: Any) -> None:
    one_error(cli("pull", "127.0.0.1:abc/x:1"), "'127.0.0.1:abc/x:1'", "port 'abc'")


def test_a_push_to_a_registry_that_answers_garbage_is_one_line(cli: Any) -> None:
    fake = Fake(make_image())
    with serving(fake.app()) as address:
        pulled(cli("pull", f"{address}/{REPO}:1"))
        source = f"{address}/{REPO}:1"
    with raw_server(b"\x15\x03\x01 garbage, not HTTP\r\n") as garbage:
        proc = cli("push", f"{garbage}/{REPO}:2", "--from", source)
        one_error(proc, garbage, "does not speak HTTP")


def test_plain_http_off_loopback_says_to_give_insecure(cli: Any) -> None:
    fake = Fake(make_image())
    with serving(fake.app()) as address:
        port = address.rsplit(":", 1)[1]
        ref = f"{OFF_LOOPBACK}:{port}/{REPO}:1"
        line = one_error(cli("pull", ref), f"{OFF_LOOPBACK}:{port}", "plain HTTP", "--insecure")
        assert "WRONG_VERSION_NUMBER" not in line
        pulled(cli("pull", ref, "--insecure"))


def test_a_refused_port_names_the_host(cli: Any) -> None:
    address = f"127.0.0.1:{free_port()}"
    one_error(cli("pull", f"{address}/{REPO}:1"), f"cannot connect to {address}", "refused")


def test_a_failed_host_lookup_names_the_host(cli: Any) -> None:
    one_error(
        cli("pull", f"{UNKNOWN_HOST}:5000/{REPO}:1"), f"look up the registry host {UNKNOWN_HOST}"
    )


def test_a_truncated_blob_keeps_its_partial_and_the_next_pull_resumes(
    cli: Any, tmp_path: Path
) -> None:
    image = make_image()
    assert image.layer is not None
    data = image.blobs[image.layer]
    half = len(data) // 2
    cut = [True]

    async def blob(request: web.Request, name: str) -> Optional[web.StreamResponse]:
        if name != image.layer or not cut[0]:
            return None
        cut[0] = False
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[:half])
        assert request.transport is not None
        request.transport.close()  # the connection drops mid-body
        return response

    fake = Fake(image, blob_hook=blob)
    with serving(fake.app()) as address:
        one_error(cli("pull", f"{address}/{REPO}:1"), address, image.layer, "truncated")
        assert partial_of(tmp_path, image.layer).stat().st_size == half
        pulled(cli("pull", f"{address}/{REPO}:1"))
    assert [h.get("Range") for h in fake.requests_for(image.layer)] == [None, f"bytes={half}-"]
    assert not partial_of(tmp_path, image.layer).exists()
    assert blob_in_store(tmp_path, image.layer).read_bytes() == data


# ---- item 10: manifests and configs bounded --------------------------------------------------
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_oversized_manifest_is_refused_after_reading_the_limit(framing: str, cli: Any) -> None:
    image = make_image()
    doc = json.loads(image.manifest)
    prefix = json.dumps(doc)[:-1].encode() + b', "padding": "'
    suffix = b'"}'
    sent = [0]

    async def manifest(request: web.Request, name: str) -> web.StreamResponse:
        if framing == "content-length":
            body = prefix + b"x" * OVERSIZED + suffix
            return web.Response(body=body, content_type=OCI_MANIFEST)
        response = web.StreamResponse(headers={"Content-Type": OCI_MANIFEST})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            await response.write(prefix)
            for _ in range(STREAMED // (1024 * 1024)):
                await response.write(b"x" * (1024 * 1024))
                sent[0] += 1024 * 1024
            await response.write(suffix)
            await response.write_eof()
        except (ConnectionError, OSError):
            pass  # the client hung up: what it was sent is counted
        return response

    fake = Fake(image, manifest_hook=manifest)
    with serving(fake.app()) as address:
        ref = f"{address}/{REPO}:1"
        one_error(cli("pull", ref), ref, "manifest is larger than 4 MiB")
    assert not fake.requests_for(image.config)
    if framing == "chunked":
        assert sent[0] < STREAMED // 2, f"the client read {sent[0]} bytes of a manifest"


def test_an_oversized_config_is_refused_before_its_download(cli: Any) -> None:
    image = make_image(padding=OVERSIZED)
    fake = Fake(image)
    with serving(fake.app()) as address:
        ref = f"{address}/{REPO}:1"
        one_error(cli("pull", ref), ref, "more than the 4 MiB a config may have")
    assert not fake.requests_for(image.config)


# ---- item 3: partial downloads ---------------------------------------------------------------
def test_a_complete_partial_is_verified_and_used_without_a_request(
    cli: Any, tmp_path: Path
) -> None:
    image = make_image()
    assert image.layer is not None
    partial_of(tmp_path, image.layer).write_bytes(image.blobs[image.layer])
    fake = Fake(image)
    with serving(fake.app()) as address:
        pulled(cli("pull", f"{address}/{REPO}:1"))
    assert fake.requests_for(image.layer) == []
    assert not partial_of(tmp_path, image.layer).exists()
    assert blob_in_store(tmp_path, image.layer).read_bytes() == image.blobs[image.layer]


def test_a_complete_partial_that_hashes_wrong_is_downloaded_again(cli: Any, tmp_path: Path) -> None:
    image = make_image()
    assert image.layer is not None
    partial_of(tmp_path, image.layer).write_bytes(os.urandom(len(image.blobs[image.layer])))
    fake = Fake(image)
    with serving(fake.app()) as address:
        pulled(cli("pull", f"{address}/{REPO}:1"))
    assert [h.get("Range") for h in fake.requests_for(image.layer)] == [None]
    assert blob_in_store(tmp_path, image.layer).read_bytes() == image.blobs[image.layer]


def test_a_registry_answering_416_is_asked_for_the_whole_blob(cli: Any, tmp_path: Path) -> None:
    """A registry whose storage will not serve ranges answers 416 to every resumed download."""
    image = make_image()
    assert image.layer is not None
    data = image.blobs[image.layer]
    partial_of(tmp_path, image.layer).write_bytes(data[: len(data) // 3])

    async def blob(request: web.Request, name: str) -> Optional[web.StreamResponse]:
        if "Range" in request.headers:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        return None

    fake = Fake(image, blob_hook=blob)
    with serving(fake.app()) as address:
        pulled(cli("pull", f"{address}/{REPO}:1"))
    ranges = [h.get("Range") for h in fake.requests_for(image.layer)]
    assert ranges == [f"bytes={len(data) // 3}-", None]
    assert blob_in_store(tmp_path, image.layer).read_bytes() == data


def test_fsck_helper_reports_stale_partials_but_not_resumable_ones(
    cli: Any, tmp_path: Path
) -> None:
    from dockyard.client.registry import stale_partials
    from dockyard.layers.store import ImageStore

    image = make_image()
    with serving(Fake(image).app()) as address:
        pulled(cli("pull", f"{address}/{REPO}:1"))
    complete = os.urandom(1000)
    partial_of(tmp_path, sha256(complete)).write_bytes(complete)
    resumable = os.urandom(1000)
    partial_of(tmp_path, sha256(resumable)).write_bytes(resumable[:500])
    partial_of(tmp_path, image.config).write_bytes(image.blobs[image.config][:10])
    (tmp_path / "store" / "tmp" / "download-not-a-digest.partial").write_bytes(b"x")
    found = stale_partials(ImageStore(str(tmp_path / "store"), "vfs"))
    assert len(found) == 3, found
    assert any(sha256(complete)[7:] in line and "complete download" in line for line in found)
    assert any(image.config in line and "in the store already" in line for line in found)
    assert any("download-not-a-digest.partial" in line for line in found)
    assert not any(sha256(resumable)[7:] in line for line in found)
    fsck = subprocess.run(
        [str(BIN / "dockyard"), "store", "fsck", "--root", str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    stale = [line for line in fsck.stdout.splitlines() if line.startswith("STALE ")]
    assert len(stale) == 3 and sha256(complete)[7:] in "\n".join(stale), fsck.stdout


# ---- item 5: blob redirects ------------------------------------------------------------------
def object_store(image: FakeImage, seen: list[dict[str, str]]) -> web.Application:
    """Object storage behind a registry: blobs at /bucket/<hex>?signature, Range served."""

    async def get(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        assert request.query.get("X-Signature") == "s1gn3d"
        return range_response(request, image.blobs["sha256:" + request.match_info["hex"]])

    app = web.Application()
    app.router.add_get("/bucket/{hex}", get)
    return app


def test_blob_redirects_are_followed_without_the_registry_credentials(
    cli: Any, tmp_path: Path
) -> None:
    image = make_image()
    assert image.layer is not None
    data = image.blobs[image.layer]
    partial_of(tmp_path, image.layer).write_bytes(data[: len(data) // 2])
    store_seen: list[dict[str, str]] = []
    with serving(object_store(image, store_seen), host="127.0.0.2") as bucket:

        async def blob(request: web.Request, name: str) -> web.StreamResponse:
            status = 307 if name == image.layer else 302
            location = f"http://{bucket}/bucket/{name[7:]}?X-Signature=s1gn3d"
            return web.Response(status=status, headers={"Location": location})

        basic = "Basic " + base64.b64encode(b"puller:pw").decode()
        fake = Fake(image, basic=basic, blob_hook=blob)
        with serving(fake.app()) as address:
            ref = f"{address}/{REPO}:1"
            pulled(cli("pull", ref, "--username", "puller", "--password-stdin", stdin="pw\n"))
    assert len(store_seen) == 2
    assert all("Authorization" not in headers for headers in store_seen), store_seen
    assert sorted(h.get("Range", "") for h in store_seen) == ["", f"bytes={len(data) // 2}-"]
    # the registry itself was sent the credentials (so there were some to leak)
    assert any(h.get("Authorization") == basic for h in fake.requests_for(image.layer))
    assert blob_in_store(tmp_path, image.layer).read_bytes() == data


def test_a_redirect_loop_ends_after_a_few_hops(cli: Any) -> None:
    image = make_image()
    hops = [0]

    async def blob(request: web.Request, name: str) -> web.StreamResponse:
        hops[0] += 1
        location = f"/v2/{REPO}/blobs/{name}?hop={hops[0]}"
        return web.Response(status=307, headers={"Location": location})

    fake = Fake(image, blob_hook=blob)
    with serving(fake.app()) as address:
        one_error(cli("pull", f"{address}/{REPO}:1"), address, "redirected", "more than 5 times")
    assert hops[0] <= 2 * 6  # config and layer: the first GET and five hops each


def test_a_redirect_from_https_to_plain_http_needs_insecure(cli: Any, tmp_path: Path) -> None:
    pki.ensure_server_cert(tmp_path / "pki", "server", [], ["127.0.0.1"])
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "pki" / "server.crt", tmp_path / "pki" / "server.key")
    ca = str(tmp_path / "pki" / "ca.crt")
    image = make_image()
    store_seen: list[dict[str, str]] = []
    with serving(object_store(image, store_seen), host="127.0.0.2") as bucket:

        async def blob(request: web.Request, name: str) -> web.StreamResponse:
            location = f"http://{bucket}/bucket/{name[7:]}?X-Signature=s1gn3d"
            return web.Response(status=307, headers={"Location": location})

        fake = Fake(image, blob_hook=blob)
        with serving(fake.app(), tls=tls) as address:
            ref = f"{address}/{REPO}:1"
            one_error(
                cli("pull", ref, "--ca-file", ca),
                address,
                f"from HTTPS to plain HTTP on {bucket}",
                "--insecure",
            )
            assert store_seen == []
            pulled(cli("pull", ref, "--ca-file", ca, "--insecure"))
    assert len(store_seen) == 2
