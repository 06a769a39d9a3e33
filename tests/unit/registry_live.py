"""What the notification and metrics tests share: the real registry (`dockyard registry serve`,
as the integration tests start it) on loopback, a webhook receiver on loopback whose answers a
test sets (accept, refuse, hang), and bounded polling of observable state."""

from __future__ import annotations

import http.client
import http.server
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import RegistryServer, make_server

# Seconds a test waits for state it polls (deliveries, files, counters) before failing.
DEADLINE = 30.0


def wait_until(what: str, check: Callable[[], Any], timeout: float = DEADLINE) -> Any:
    """Poll `check` until it returns something truthy (returned); fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Attempt:
    """One POST the receiver got: its headers, envelope and the status it answered."""

    headers: dict[str, list[str]]
    envelope: dict[str, Any]
    status: int


@dataclass
class Receiver:
    """A webhook endpoint on loopback. `mode`: "ok" answers 200, "fail" 503 (after reading the
    body: a delivery the registry must repeat), "hang" holds the POST until `release` is set."""

    mode: str = "ok"
    attempts: list[Attempt] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    # set once a POST is being held ("hang")
    holding: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: Optional[http.server.ThreadingHTTPServer] = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/events"

    def start(self) -> Receiver:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                mode = receiver.mode
                if mode == "hang":
                    receiver.holding.set()
                    receiver.release.wait(DEADLINE)
                status = 503 if mode == "fail" else 200
                headers: dict[str, list[str]] = {}
                for name, value in self.headers.items():
                    headers.setdefault(name.lower(), []).append(value)
                with receiver.lock:
                    receiver.attempts.append(Attempt(headers, json.loads(body), status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def delivered(self) -> list[dict[str, Any]]:
        """Events of the POSTs answered 2xx, in arrival order."""
        with self.lock:
            return [e for a in self.attempts if a.status < 300 for e in a.envelope["events"]]

    def refused(self) -> list[dict[str, Any]]:
        with self.lock:
            return [e for a in self.attempts if a.status >= 300 for e in a.envelope["events"]]


def endpoint(name: str, receiver: Receiver, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "url": receiver.url,
        "timeout": "2s",
        "threshold": 3,
        "backoff": "100ms",
        **extra,
    }


def start_registry(
    base: Path,
    endpoints: list[dict[str, Any]],
    queue: Optional[Path] = None,
    extra: Optional[dict[str, Any]] = None,
    max_queue: Optional[int] = None,
    debug_port: Optional[int] = None,
    workers: int = 1,
) -> RegistryServer:
    """`dockyard registry serve` (one worker, or `workers`) with notifications to `endpoints`,
    the queues below `queue` (default base/queue), and /metrics on `debug_port` when given."""
    config: dict[str, Any] = {"log": {"level": "info"}}
    dockyard: dict[str, Any] = {"queuedirectory": str(queue or base / "queue")}
    if max_queue is not None:
        dockyard["maxqueue"] = max_queue
    if endpoints:
        config["notifications.endpoints"] = endpoints
        config["notifications.dockyard"] = dockyard
    if debug_port is not None:
        config["http.debug"] = {
            "addr": f"127.0.0.1:{debug_port}",
            "prometheus": {"enabled": True, "path": "/metrics"},
        }
    config.update(extra or {})
    return make_server("dockyard", base, config, serve_args=["--workers", str(workers)])


def scrape(
    port: int, path: str = "/metrics"
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The debug listener's metrics: sample (name, sorted labels) → value, as Prometheus reads
    them (prometheus_client's own parser)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        text = answer.read().decode()
        assert answer.status == 200, (answer.status, text[:300])
        assert answer.getheader("Content-Type", "").startswith("text/plain")
    finally:
        connection.close()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
