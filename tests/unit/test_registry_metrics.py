"""The registry's Prometheus metrics (`http.debug.addr` with `http.debug.prometheus`), read from
the real registry's debug listener on loopback with prometheus_client's own parser after known
requests: requests by method, route template and status, latency, bytes in and out, uploads in
progress, garbage collections, storage health; one CollectorRegistry per application; with
several `--workers`, every process's share counted once (prometheus_client's multiprocess mode)
in a private per-run directory that a restart never reuses and a stop removes."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import stat
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, values
from prometheus_client.parser import text_string_to_metric_families

from dockyard.registry import gc
from dockyard.registry.app import RegistryApp
from dockyard.registry.config import ConfigError, load_config
from dockyard.registry.driver import FilesystemDriver
from dockyard.registry.metrics import RegistryMetrics, share_metrics, unshare_metrics
from dockyard.registry.store import Registry
from tests.integration.conftest import free_port
from tests.unit.registry_live import (
    Receiver,
    endpoint,
    sample,
    scrape,
    start_registry,
    wait_until,
)

# Requests a multi-worker test sends, each on a new connection (the kernel hands each accepted
# connection to whichever worker takes it first).
SPREAD_REQUESTS = 200
# Blob uploads a multi-worker test pushes, each on a new connection.
SPREAD_UPLOADS = 20
# Prefix of the per-run metrics directory (dockyard.registry.metrics.SHARED_PREFIX).
METRICS_DIR_PREFIX = "dockyard-registry-metrics-"


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


def _metrics_dirs(run: Path) -> list[Path]:
    return sorted(p for p in run.iterdir() if p.name.startswith(METRICS_DIR_PREFIX))


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temp directory the registry started by the test uses (TMPDIR, inherited)."""
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("TMPDIR", str(run))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    return run


def test_every_worker_s_requests_are_counted_once(tmp_path: Path, run_dir: Path) -> None:
    debug = free_port()
    server = start_registry(tmp_path, [], debug_port=debug, workers=2)
    blobs = [f"blob {i} of the spread".encode() for i in range(SPREAD_UPLOADS)]
    try:
        before = scrape(debug)
        body = b""
        for _ in range(SPREAD_REQUESTS):  # server.request: a new connection each time
            reply = server.request("GET", "/v2/")
            assert reply.status == 200
            body = reply.body
        for i, blob in enumerate(blobs):
            path = f"/v2/spread/r{i}/blobs/uploads/?digest={sha256(blob)}"
            assert server.request("POST", path, blob).status == 201
        samples = scrape(debug)
    finally:
        server.stop()
    assert server.process is not None and server.process.returncode == 0

    def grew(name: str, **labels: str) -> float:
        return sample(samples, name, **labels) - sample(before, name, **labels)

    requests = "registry_http_requests_total"
    latency = "registry_http_request_duration_seconds"
    uploads = "/v2/<name>/blobs/uploads/"
    assert grew(requests, method="GET", route="/v2/", code="200") == SPREAD_REQUESTS
    assert grew(f"{latency}_count", method="GET", route="/v2/") == SPREAD_REQUESTS
    assert grew(f"{latency}_bucket", method="GET", route="/v2/", le="+Inf") == SPREAD_REQUESTS
    assert grew("registry_http_sent_bytes_total", route="/v2/") == SPREAD_REQUESTS * len(body)
    assert sample(samples, requests, method="POST", route=uploads, code="201") == SPREAD_UPLOADS
    assert sample(samples, f"{latency}_count", method="POST", route=uploads) == SPREAD_UPLOADS
    received = sum(len(blob) for blob in blobs)
    assert sample(samples, "registry_http_received_bytes_total", route=uploads) == received
    assert sample(samples, "registry_uploads_in_progress") == 0
    # the state read at scrape time once, not once per process
    assert sample(samples, "registry_storage_healthy") == 1
    assert sample(samples, "registry_gc_runs_total") == 0


def test_every_worker_s_notification_counters_are_counted_once(
    tmp_path: Path, run_dir: Path
) -> None:
    receiver = Receiver().start()
    debug = free_port()
    server = start_registry(tmp_path, [endpoint("hook", receiver)], debug_port=debug, workers=2)
    try:
        for i in range(SPREAD_UPLOADS):
            blob = f"notified blob {i}".encode()
            path = f"/v2/notified/r{i}/blobs/uploads/?digest={sha256(blob)}"
            assert server.request("POST", path, blob).status == 201
        wait_until("every push delivered", lambda: len(receiver.delivered()) == SPREAD_UPLOADS)

        def all_counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            samples = scrape(debug)
            delivered = sample(samples, "registry_notifications_delivered_total", endpoint="hook")
            return samples if delivered == SPREAD_UPLOADS else {}

        samples = wait_until("the deliveries counted", all_counted)
    finally:
        server.stop()
        receiver.stop()
    assert sample(samples, "registry_notifications_events_total", endpoint="hook") == SPREAD_UPLOADS
    assert sample(samples, "registry_notifications_pending", endpoint="hook") == 0
    assert sample(samples, "registry_notifications_dropped_total", endpoint="hook") == 0
    assert sample(samples, "registry_notifications_failures_total", endpoint="hook") == 0


def test_the_metrics_directory_is_private_fresh_at_each_start_and_removed(
    tmp_path: Path, run_dir: Path
) -> None:
    debug = free_port()
    server = start_registry(tmp_path, [], debug_port=debug, workers=2)
    try:
        for _ in range(5):
            assert server.request("GET", "/v2/_catalog").status == 200
        catalog = {"method": "GET", "route": "/v2/_catalog", "code": "200"}
        assert sample(scrape(debug), "registry_http_requests_total", **catalog) == 5
        (first,) = _metrics_dirs(run_dir)
        status = first.stat()
        assert stat.S_IMODE(status.st_mode) == 0o700
        assert status.st_uid == os.geteuid()
        assert (tmp_path / "data") not in first.parents
        # a registry killed outright leaves its directory behind...
        server.stop(signal.SIGKILL)
        assert first.is_dir()
        # ...which the next start never reads (its counts would leak) and removes
        server.start()
        samples = scrape(debug)
        assert sample(samples, "registry_http_requests_total", **catalog) == 0
        (second,) = _metrics_dirs(run_dir)
        assert second != first
        assert stat.S_IMODE(second.stat().st_mode) == 0o700
    finally:
        server.stop()
    assert server.process is not None and server.process.returncode == 0
    assert _metrics_dirs(run_dir) == []


def test_a_dead_worker_stops_the_registry_and_its_metrics_directory(
    tmp_path: Path, run_dir: Path
) -> None:
    debug = free_port()
    server = start_registry(tmp_path, [], debug_port=debug, workers=2)
    try:
        assert server.process is not None
        primary = server.process.pid
        (directory,) = _metrics_dirs(run_dir)

        def workers() -> set[int]:
            # every process keeps its live gauge (uploads in progress) in a file named by its pid
            names = (p.stem for p in directory.glob("gauge_livesum_*.db"))
            return {int(name.rsplit("_", 1)[1]) for name in names} - {primary}

        (worker,) = wait_until("the worker's metric file", workers)
        assert sample(scrape(debug), "registry_uploads_in_progress") == 0
        os.kill(worker, signal.SIGKILL)
        assert server.process.wait(timeout=30) == 1  # the registry stops whole, as before
    finally:
        server.stop()
    assert _metrics_dirs(run_dir) == []
    log = (tmp_path / "server.log").read_text()
    assert f"worker {worker} exited (signal 9): stopping the registry" in log
    assert "Traceback" not in log


def test_shared_metrics_skip_a_file_another_process_is_creating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    shared = share_metrics()
    try:
        directory = Path(shared.directory)
        assert directory.parent == runtime
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        metrics = RegistryMetrics(shared)
        metrics.observe("GET", "/v2/", 200, 0.01, 0, 2)
        # a worker between creating its file and sizing it (prometheus_client's collector
        # fails on it: struct.error)
        (directory / "counter_999999.db").touch()
        text = metrics.exposition().decode()
    finally:
        unshare_metrics(shared)
    assert values.ValueClass is values.MutexValue
    assert not directory.exists()
    requests = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "registry_http_requests_total"
    ]
    assert requests == [1]
