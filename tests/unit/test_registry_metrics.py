"""The registry's Prometheus metrics (`http.debug.addr` with `http.debug.prometheus`), read from
the real registry's debug listener on loopback with prometheus_client's own parser after known
requests: requests by method, route template and status, latency, bytes in and out, uploads in
progress, garbage collections, storage health; one CollectorRegistry per application."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from dockyard.registry import gc
from dockyard.registry.app import RegistryApp
from dockyard.registry.config import ConfigError, load_config
from dockyard.registry.driver import FilesystemDriver
from dockyard.registry.store import Registry
from tests.integration.conftest import free_port
from tests.unit.registry_live import sample, scrape, start_registry, wait_until


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_request_counters_latency_and_bytes_after_known_requests(tmp_path: Path) -> None:
    debug = free_port()
    server = start_registry(tmp_path, [], debug_port=debug)
    try:
        before = scrape(debug)
        blob = b"0123456789" * 100
        digest = sha256(blob)
        for _ in range(3):
            assert server.request("GET", "/v2/").status == 200
        put = server.request("POST", f"/v2/m/repo/blobs/uploads/?digest={digest}", blob)
        assert put.status == 201
        assert server.request("GET", f"/v2/m/repo/blobs/{digest}").status == 200
        assert server.request("HEAD", f"/v2/m/repo/blobs/{digest}").status == 200
        assert server.request("GET", f"/v2/m/other/blobs/{digest}").status == 404
        assert server.request("GET", "/nowhere").status == 404
        samples = scrape(debug)
    finally:
        server.stop()
    requests = "registry_http_requests_total"
    blobs = "/v2/<name>/blobs/<digest>"
    uploads = "/v2/<name>/blobs/uploads/"
    # the probe that waited for the start asked /v2/ too: count from the first scrape on
    base = sample(before, requests, method="GET", route="/v2/", code="200")
    assert sample(samples, requests, method="GET", route="/v2/", code="200") == base + 3
    assert sample(samples, requests, method="POST", route=uploads, code="201") == 1
    assert sample(samples, requests, method="GET", route=blobs, code="200") == 1
    assert sample(samples, requests, method="HEAD", route=blobs, code="200") == 1
    assert sample(samples, requests, method="GET", route=blobs, code="404") == 1
    assert sample(samples, requests, method="GET", route="other", code="404") == 1
    # route templates, never raw paths
    assert not any("m/repo" in str(labels) or "sha256" in str(labels) for _n, labels in samples)
    latency = "registry_http_request_duration_seconds"
    assert sample(samples, f"{latency}_count", method="GET", route=blobs) == 2
    assert sample(samples, f"{latency}_bucket", method="GET", route=blobs, le="+Inf") == 2
    assert sample(samples, f"{latency}_sum", method="GET", route=blobs) > 0
    assert sample(samples, "registry_http_received_bytes_total", route=uploads) == len(blob)
    # the GET's body; a HEAD sends none
    assert sample(samples, "registry_http_sent_bytes_total", route=blobs) >= len(blob)
    assert sample(samples, "registry_http_sent_bytes_total", route=blobs) < 2 * len(blob)
    assert sample(samples, "registry_uploads_in_progress") == 0
    assert sample(samples, "registry_storage_healthy") == 1
    assert sample(samples, "registry_gc_runs_total") == 0


def test_uploads_in_progress_and_gc_totals(tmp_path: Path) -> None:
    debug = free_port()
    server = start_registry(tmp_path, [], debug_port=debug)
    try:
        start = server.request("POST", "/v2/gc/repo/blobs/uploads/")
        assert start.status == 202
        body = b"unreferenced blob"
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            head = (
                f"PATCH {start.headers['location']} HTTP/1.1\r\nHost: {server.address}\r\n"
                f"Content-Length: {len(body)}\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            sock.sendall(head.encode() + body[:5])  # the body's rest has not come yet
            wait_until(
                "an upload in progress",
                lambda: sample(scrape(debug), "registry_uploads_in_progress") == 1,
            )
            sock.sendall(body[5:])
            assert sock.recv(100).startswith(b"HTTP/1.1 202")
        wait_until(
            "no upload in progress",
            lambda: sample(scrape(debug), "registry_uploads_in_progress") == 0,
        )
        digest = sha256(body)
        location = start.headers["location"]
        assert server.request("PUT", f"{location}?digest={digest}").status == 201
        # garbage-collect (its own process in production): its totals are in the storage root
        registry = Registry(FilesystemDriver(str(tmp_path / "data")), delete_enabled=True)
        result = gc.collect(registry, grace_seconds=0, log=lambda line: None)
        assert result.deleted_blobs == [digest]
        gc.collect(registry, grace_seconds=0, log=lambda line: None)
        gc.collect(registry, dry_run=True, grace_seconds=0, log=lambda line: None)  # not counted
        samples = scrape(debug)
    finally:
        server.stop()
    assert sample(samples, "registry_gc_runs_total") == 2
    assert sample(samples, "registry_gc_blobs_swept_total") == 1
    assert sample(samples, "registry_gc_manifests_deleted_total") == 0


def test_the_debug_listener_serves_health_and_metrics_apart_from_the_api(tmp_path: Path) -> None:
    debug = free_port()
    server = start_registry(
        tmp_path, [], extra={"http.debug": {"addr": f"127.0.0.1:{debug}", "prometheus": {
            "enabled": True, "path": "/internal/metrics"}}},
    )  # fmt: skip
    try:
        assert "registry_http_requests_total" in {n for n, _l in scrape(debug, "/internal/metrics")}
        with socket.create_connection(("127.0.0.1", debug), timeout=10) as sock:
            sock.sendall(b"GET /debug/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"{}")
        # the API's port does not serve the metrics
        assert server.request("GET", "/internal/metrics").status == 404
    finally:
        server.stop()


def test_each_app_has_its_own_collector_registry(tmp_path: Path) -> None:
    config = load_config(
        text=f"version: 0.1\nstorage: {{filesystem: {{rootdirectory: {tmp_path}}}}}\n",
        environ={},
    )
    first, second = RegistryApp(config), RegistryApp(config)
    first.metrics.observe("GET", "/v2/", 200, 0.01, 0, 2)
    assert first.metrics.registry is not second.metrics.registry
    assert (
        first.metrics.registry.get_sample_value(
            "registry_http_requests_total", {"method": "GET", "route": "/v2/", "code": "200"}
        )
        == 1
    )
    assert (
        second.metrics.registry.get_sample_value(
            "registry_http_requests_total", {"method": "GET", "route": "/v2/", "code": "200"}
        )
        is None
    )
    assert REGISTRY.get_sample_value("registry_http_requests_total", {}) is None


@pytest.mark.parametrize(
    ("http", "message"),
    [
        ("{debug: {addr: 'localhost'}}", "http.debug.addr: 'localhost' is not host:port"),
        ("{debug: {addr: ':5000'}}", "http.debug.addr: ':5000' must differ from http.addr"),
        (
            "{debug: {prometheus: {enabled: yes please}}}",
            "http.debug.prometheus.enabled: 'yes please' is not a boolean",
        ),
        (
            "{debug: {prometheus: {path: metrics}}}",
            "http.debug.prometheus.path: 'metrics' is not valid; valid: an absolute URL path",
        ),
    ],
)
def test_invalid_debug_settings_are_named(http: str, message: str) -> None:
    text = f"version: 0.1\nstorage: {{filesystem: {{rootdirectory: /srv/r}}}}\nhttp: {http}\n"
    with pytest.raises(ConfigError) as caught:
        load_config(text=text, environ={})
    assert message in str(caught.value)
