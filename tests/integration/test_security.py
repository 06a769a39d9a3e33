"""The registry's security and operational configuration, end to end on loopback: htpasswd
(bcrypt only), TLS 1.2 minimum (TLS 1.1 refused), client certificates (clientcas), read-only
mode, the health endpoint, REGISTRY_* environment overrides, config errors and upload purging."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dockyard import pki as fleet_pki
from dockyard.registry.probe import wait_ready
from tests.integration.conftest import free_port, make_server, push_blob, write_config

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fleet CA with a server and a client certificate, made by dockyard.pki itself."""
    base = tmp_path_factory.mktemp("pki")
    fleet_pki.ensure_server_cert(base, "server", ["localhost"], ["127.0.0.1"])
    fleet_pki.ensure_client_cert(base, "client")
    return base


def _tls_get(port: int, ca: Path, client: Path | None = None) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client.with_suffix(".crt")), str(client.with_suffix(".key")))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            head = tls.recv(100).decode()
            return int(head.split()[1])


def test_tls_serves_1_2_and_refuses_1_1(pki: Path, tmp_path: Path) -> None:
    server = make_server(
        "dockyard",
        tmp_path / "tls",
        extra={
            "http.tls": {"certificate": str(pki / "server.crt"), "key": str(pki / "server.key")}
        },
    )
    try:
        assert _tls_get(server.port, pki / "ca.crt") == 200

        def s_client(version: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    "openssl",
                    "s_client",
                    f"-{version}",
                    "-cipher",
                    "DEFAULT@SECLEVEL=0",
                    "-connect",
                    server.address,
                    "-CAfile",
                    str(pki / "ca.crt"),
                ],
                input="",
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )

        assert s_client("tls1_2").returncode == 0
        old = s_client("tls1_1")
        assert old.returncode != 0
        assert "Cipher is (NONE)" in old.stdout
    finally:
        server.stop()


def test_client_certificates_are_required_with_clientcas(pki: Path, tmp_path: Path) -> None:
    server = make_server(
        "dockyard",
        tmp_path / "mtls",
        extra={
            "http.tls": {
                "certificate": str(pki / "server.crt"),
                "key": str(pki / "server.key"),
                "clientcas": [str(pki / "ca.crt")],
            }
        },
    )
    try:
        assert _tls_get(server.port, pki / "ca.crt", client=pki / "client") == 200
        with pytest.raises((ssl.SSLError, ConnectionResetError, ValueError, IndexError)):
            _tls_get(server.port, pki / "ca.crt")
    finally:
        server.stop()


def test_htpasswd_bcrypt(tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    subprocess.run(
        ["htpasswd", "-Bbc", str(htpasswd), "alice", "s3cret pass"], check=True, capture_output=True
    )
    server = make_server(
        "dockyard",
        tmp_path / "auth",
        extra={"auth.htpasswd": {"realm": "dockyard-test", "path": str(htpasswd)}},
    )
    try:
        anonymous = server.request("GET", "/v2/")
        assert anonymous.status == 401
        assert anonymous.headers["www-authenticate"] == 'Basic realm="dockyard-test"'
        assert anonymous.error_codes() == ["UNAUTHORIZED"]
        import base64

        def auth(user: str, password: str) -> dict[str, str]:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            return {"Authorization": f"Basic {token}"}

        assert server.request("GET", "/v2/", headers=auth("alice", "wrong")).status == 401
        assert server.request("GET", "/v2/", headers=auth("bob", "s3cret pass")).status == 401
        assert server.request("GET", "/v2/", headers=auth("alice", "s3cret pass")).status == 200
        assert server.request("GET", "/debug/health").status == 200
    finally:
        server.stop()


def test_htpasswd_without_bcrypt_is_refused_at_start(tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    subprocess.run(
        ["htpasswd", "-mbc", str(htpasswd), "alice", "pw"], check=True, capture_output=True
    )
    server = make_server(
        "dockyard",
        tmp_path / "md5",
        start=False,
        extra={"auth.htpasswd": {"realm": "r", "path": str(htpasswd)}},
    )
    proc = subprocess.run(server.command(), capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode != 0
    assert "entry for 'alice' is not bcrypt" in proc.stderr


def test_read_only_mode(tmp_path: Path) -> None:
    server = make_server("dockyard", tmp_path / "ro")
    digest = push_blob(server, "ro/repo", b"before read-only")
    server.stop()
    server = make_server(
        "dockyard",
        tmp_path / "ro2",
        extra={
            "storage.filesystem.rootdirectory": str(tmp_path / "ro" / "data"),
            "storage.maintenance.readonly.enabled": True,
        },
    )
    try:
        assert server.request("HEAD", f"/v2/ro/repo/blobs/{digest}").status == 200
        refused = server.request("POST", "/v2/ro/repo/blobs/uploads/")
        assert refused.status == 405 and refused.error_codes() == ["UNSUPPORTED"]
        assert "read-only" in refused.json()["errors"][0]["message"]
    finally:
        server.stop()


def test_health_reports_storage_failure(tmp_path: Path) -> None:
    root = tmp_path / "health-root"
    server = make_server(
        "dockyard",
        tmp_path / "health",
        extra={
            "storage.filesystem.rootdirectory": str(root),
            "health.storagedriver": {"enabled": True, "interval": "100ms", "threshold": 2},
        },
    )
    try:
        push_blob(server, "health/x", b"data")
        assert server.request("GET", "/debug/health").status == 200
        shutil.rmtree(root)
        deadline = time.monotonic() + 10
        status = 200
        while time.monotonic() < deadline and status == 200:
            time.sleep(0.1)
            status = server.request("GET", "/debug/health").status
        assert status == 503
        assert "storagedriver_filesystem" in server.request("GET", "/debug/health").json()
    finally:
        server.stop()


def test_health_reports_storage_that_hangs(tmp_path: Path) -> None:
    """A hard NFS mount whose server is gone never fails a probe: the call blocks in the kernel.
    The health check must count a probe that has not answered within the interval as a failure
    (503 after `threshold` intervals) and recover with the first answer. It used to await the
    probe for ever and report 200 through the whole outage."""
    import asyncio
    import threading

    from dockyard.registry.app import RegistryApp
    from dockyard.registry.config import load_config

    config = load_config(
        text=(
            "version: 0.1\n"
            f"storage:\n  filesystem: {{rootdirectory: {tmp_path / 'data'}}}\n"
            "health: {storagedriver: {enabled: true, interval: 50ms, threshold: 2}}\n"
        )
    )
    app = RegistryApp(config, background=False)
    storage_back = threading.Event()
    probes: list[str] = []

    def hanging_probe() -> None:
        probes.append(threading.current_thread().name)
        storage_back.wait(30)

    app.registry.driver.probe = hanging_probe  # type: ignore[method-assign]

    async def scenario() -> tuple[int, int, int]:
        loop_task = asyncio.create_task(app._health_loop())
        deadline = time.monotonic() + 10
        while app.health_failures < config.health_threshold and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        during = app.health_failures
        storage_back.set()
        while app.health_failures and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        after = app.health_failures
        loop_task.cancel()
        return during, after, len(probes)

    during, after, started = asyncio.run(scenario())
    assert during >= config.health_threshold  # reported while the storage hung
    assert after == 0  # and recovered with its first answer
    assert probes[0] == "storage-health-probe"
    assert started <= 3  # never a pile of stuck probe threads: one at a time


def test_environment_overrides_the_config(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, 1)  # the file's port is overridden below
    env = {
        **os.environ,
        "REGISTRY_HTTP_ADDR": f"127.0.0.1:{port}",
        "REGISTRY_STORAGE_DELETE_ENABLED": "false",
    }
    proc = subprocess.Popen(
        [str(BIN / "dockyard"), "registry", "serve", "--config", str(config)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_ready(f"http://127.0.0.1:{port}", 15).ready  # an answer, not a port
        from tests.integration.conftest import RegistryServer

        server = RegistryServer("dockyard", tmp_path, port, config)
        digest = push_blob(server, "env/repo", b"x")
        assert server.request("DELETE", f"/v2/env/repo/blobs/{digest}").status == 405
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("log.level", "loud", "log.level: 'loud' is not valid; valid: error, warn, info, debug"),
        (
            "http.tls",
            {"certificate": "/c", "key": "/k", "minimumtls": "tls1.1"},
            "http.tls.minimumtls: 'tls1.1' is not allowed",
        ),
        (
            "storage.maintenance.uploadpurging.age",
            "a week",
            "storage.maintenance.uploadpurging.age: 'a week' is not a duration",
        ),
        ("http.addr", "5000", "http.addr: '5000' is not host:port"),
    ],
)
def test_invalid_config_is_a_clear_error(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    config = write_config(tmp_path, free_port(), {key: value})
    proc = subprocess.run(
        [str(BIN / "dockyard"), "registry", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert message in proc.stderr


def test_unknown_key_is_a_warning(tmp_path: Path) -> None:
    server = make_server("dockyard", tmp_path / "warn", extra={"storage.frobnicate": True})
    try:
        assert server.request("GET", "/v2/").status == 200
        assert server.log_path is not None
        assert "unknown configuration key storage.frobnicate" in server.log_path.read_text()
    finally:
        server.stop()


def test_upload_purging_by_age(tmp_path: Path) -> None:
    server = make_server(
        "dockyard",
        tmp_path / "purge",
        extra={
            "storage.maintenance.uploadpurging": {
                "enabled": True,
                "age": "1s",
                "interval": "500ms",
                "dryrun": False,
            }
        },
    )
    try:
        start = server.request("POST", "/v2/purge/me/blobs/uploads/")
        location = start.headers["location"]
        deadline = time.monotonic() + 10
        status = 204
        while time.monotonic() < deadline and status == 204:
            time.sleep(0.25)
            status = server.request("GET", location).status
        assert status == 404
    finally:
        server.stop()


def test_purge_spares_an_upload_whose_start_time_is_not_written_yet(tmp_path: Path) -> None:
    """An upload directory without a readable startedat (one starting this instant, or one a
    crash left) is dated by the directory: purged when that is old, never while it is new. A
    purge used to take it for stale at once and delete an upload being created (a 500)."""
    from dockyard.registry.app import RegistryApp
    from dockyard.registry.config import load_config
    from dockyard.registry.paths import UploadRoot, UploadStartedAt, path_for

    root = tmp_path / "data"
    config = load_config(
        text=(
            "version: 0.1\n"
            f"storage:\n  filesystem: {{rootdirectory: {root}}}\n"
            "  maintenance: {uploadpurging: {enabled: true, age: 1h, interval: 1h}}\n"
        )
    )
    app = RegistryApp(config)
    fresh = app.registry.start_upload("purge/race")
    old = app.registry.start_upload("purge/race")
    for status in (fresh, old):
        (root / path_for(UploadStartedAt("purge/race", status.upload_id))).unlink()
    two_hours_ago = time.time() - 7200
    os.utime(root / path_for(UploadRoot("purge/race", old.upload_id)), (two_hours_ago,) * 2)
    assert app.purge_uploads() == [("purge/race", old.upload_id)]
    assert app.registry.upload_status("purge/race", fresh.upload_id).size == 0


def test_registry_wait_means_a_verified_registry_answers(pki: Path, tmp_path: Path) -> None:
    """`dockyard registry wait` (the deploy's readiness step): ready only when /v2/ is answered
    by a registry over TLS verified against the CA; an open port of something else is not."""
    tls = {"certificate": str(pki / "server.crt"), "key": str(pki / "server.key")}
    servers = [make_server(kind, tmp_path / kind, extra={"http.tls": tls}) for kind in KINDS]
    other = socket.create_server(("127.0.0.1", 0))
    try:
        for server in servers:
            url = f"https://127.0.0.1:{server.port}"
            ok = _dockyard("registry", "wait", url, "--ca-file", str(pki / "ca.crt"))
            assert ok.returncode == 0 and "is ready" in ok.stdout, ok.stderr
            untrusted = _dockyard("registry", "wait", url, "--timeout", "0.5")
            assert untrusted.returncode == 1
            assert "certificate not trusted" in untrusted.stderr
            assert "Traceback" not in untrusted.stderr
        silent = f"http://127.0.0.1:{other.getsockname()[1]}"
        closed = _dockyard("registry", "wait", silent, "--timeout", "0.5")
        assert closed.returncode == 1
        assert f"the registry at {silent} did not answer" in closed.stderr
    finally:
        other.close()
        for server in servers:
            server.stop()


KINDS = ("dockyard", "distribution")


def _dockyard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dockyard"), *args], capture_output=True, text=True, timeout=60, check=False
    )
