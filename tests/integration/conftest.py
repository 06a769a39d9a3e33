"""Registries on loopback for the integration tests: dockyard's and Debian's CNCF distribution
(`docker-registry`), each started from a distribution-format config.yml on a free port with a
fresh storage root, and a small HTTP client that sends exactly what a test says."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

from dockyard.registry.probe import probe

BIN = Path(sys.executable).parent
# Seconds a registry may take to answer /v2/ after it was started.
START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error_codes(self) -> list[str]:
        try:
            return [e["code"] for e in self.json()["errors"]]
        except (ValueError, KeyError, TypeError):
            return []


@dataclass
class RegistryServer:
    kind: str
    root: Path
    port: int
    config_path: Path
    process: Optional[subprocess.Popen[bytes]] = None
    log_path: Optional[Path] = None
    extra: dict[str, Any] = field(default_factory=dict)
    # extra arguments of `dockyard registry serve` (e.g. --workers)
    serve_args: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.kind == "dockyard":
            return [
                str(BIN / "dockyard"),
                "registry",
                "serve",
                "--config",
                str(self.config_path),
                *self.serve_args,
            ]
        return ["docker-registry", "serve", str(self.config_path)]

    def start(self) -> None:
        """Start and return once this process serves: dockyard tells READY=1 on its notify
        socket (it binds only after any predecessor let go of the port), then `/v2/` must
        answer as a registry. An open TCP port proves nothing: a dying worker of a killed
        registry can still hold it, and a client it accepts is reset when it dies."""
        assert self.log_path is not None
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        env = dict(os.environ)
        notify: Optional[socket.socket] = None
        if self.kind == "dockyard":
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            name = f"dockyard-test-{os.getpid()}-{uuid.uuid4().hex}"
            notify.bind("\0" + name)
            env["NOTIFY_SOCKET"] = "@" + name
        try:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=log, env=env)
            deadline = time.monotonic() + START_TIMEOUT
            if notify is not None:
                self._wait_notified(notify, deadline)
            self._wait_answering(deadline)
        finally:
            if notify is not None:
                notify.close()

    def _exited(self) -> None:
        assert self.process is not None and self.log_path is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.kind} exited:\n{self.log_path.read_text()[-2000:]}")

    def _wait_notified(self, notify: socket.socket, deadline: float) -> None:
        notify.settimeout(0.1)
        while True:
            self._exited()
            try:
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    return
            except TimeoutError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} never told READY=1 on port {self.port}")

    def _wait_answering(self, deadline: float) -> None:
        url, cafile, client = f"http://{self.address}", None, None
        tls = self.extra.get("http.tls")
        if tls:  # the tests' certificates sit beside the CA that issued them (dockyard.pki)
            base = Path(tls["certificate"]).parent
            url, cafile = f"https://{self.address}", str(base / "ca.crt")
            if tls.get("clientcas"):
                client = (str(base / "client.crt"), str(base / "client.key"))
        while True:
            self._exited()
            answer = probe(url, cafile, client_cert=client)
            if answer.ready:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} on {self.port} never answered: {answer.detail}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def request(
        self,
        method: str,
        path: str,
        body: Optional[bytes] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()


def write_config(root: Path, port: int, extra: Optional[dict[str, Any]] = None) -> Path:
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {
            "filesystem": {"rootdirectory": str(root / "data")},
            "delete": {"enabled": True},
        },
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    for key, value in (extra or {}).items():
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    path = root / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session", autouse=True)
def _tools() -> None:
    missing = [t for t in ("docker-registry", "skopeo") if shutil.which(t) is None]
    assert not missing, f"missing {missing}: run `make engine` (scripts/ensure-engine.sh)"


def make_server(
    kind: str,
    base: Path,
    extra: Optional[dict[str, Any]] = None,
    start: bool = True,
    serve_args: Optional[list[str]] = None,
) -> RegistryServer:
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = RegistryServer(
        kind,
        base,
        port,
        write_config(base, port, extra),
        extra=extra or {},
        serve_args=serve_args or [],
    )
    server.log_path = base / "server.log"
    if start:
        server.start()
    return server


@pytest.fixture(params=["dockyard", "distribution"], scope="module")
def registry(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegistryServer]:
    server = make_server(request.param, tmp_path_factory.mktemp(request.param))
    yield server
    server.stop()


@pytest.fixture
def dockyard_server(tmp_path: Path) -> Iterator[RegistryServer]:
    server = make_server("dockyard", tmp_path / "dockyard")
    yield server
    server.stop()


def location_path(location: str) -> str:
    """A Location header (absolute or relative) as a path with its query."""
    if "://" in location:
        location = "/" + location.split("://", 1)[1].split("/", 1)[1]
    return location


def with_digest(location: str, digest: str) -> str:
    sep = "&" if "?" in location else "?"
    return f"{location_path(location)}{sep}digest={digest}"


def patch_chunks(
    server: RegistryServer, location: str, data: bytes, step: int, check: bool = True
) -> str:
    """PATCH `data` to an upload in `step`-byte chunks with Content-Range, each on a new
    connection; returns the Location of the last reply (202s asserted when `check`)."""
    for offset in range(0, len(data), step):
        chunk = data[offset : offset + step]
        reply = server.request(
            "PATCH",
            location,
            body=chunk,
            headers={
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                "Content-Type": "application/octet-stream",
            },
        )
        if check:
            assert reply.status == 202, (reply.status, reply.body[:200])
        location = location_path(reply.headers["location"])
    return location


def push_blob(server: RegistryServer, repo: str, data: bytes) -> str:
    """POST then PUT with the body: the upload every registry version supports."""
    digest = sha256(data)
    start = server.request("POST", f"/v2/{repo}/blobs/uploads/")
    assert start.status == 202, (start.status, start.body[:300])
    reply = server.request(
        "PUT",
        with_digest(start.headers["location"], digest),
        body=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert reply.status == 201, (reply.status, reply.body[:300])
    return digest


def image_manifest(
    server: RegistryServer,
    repo: str,
    layers: list[bytes],
    media: str = "application/vnd.oci.image.manifest.v1+json",
    extra: Optional[dict[str, Any]] = None,
) -> bytes:
    """Push config and layers, return the manifest bytes (not pushed)."""
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(layer) for layer in layers]},
        }
    ).encode()
    config_media = (
        "application/vnd.oci.image.config.v1+json"
        if "oci" in media
        else "application/vnd.docker.container.image.v1+json"
    )
    layer_media = (
        "application/vnd.oci.image.layer.v1.tar"
        if "oci" in media
        else "application/vnd.docker.image.rootfs.diff.tar.gzip"
    )
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media,
        "config": {
            "mediaType": config_media,
            "digest": push_blob(server, repo, config),
            "size": len(config),
        },
        "layers": [
            {"mediaType": layer_media, "digest": push_blob(server, repo, layer), "size": len(layer)}
            for layer in layers
        ],
    }
    doc.update(extra or {})
    return json.dumps(doc).encode()
