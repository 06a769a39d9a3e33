"""The registry's Prometheus metrics (`http.debug.prometheus`), served in the text format on the
debug listener (`http.debug.addr`, plain HTTP) beside `/debug/health`: requests by method, route
template and status, their latency, bytes received and sent, upload requests in progress,
garbage collections (from the totals `garbage-collect` keeps in the storage root), each
notification endpoint's queue depth, deliveries, failures and drops, and the storage's health.
Each application has its own CollectorRegistry (never prometheus_client's global one). With
several `--workers`, the debug listener is the first process's: request metrics are its share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from typing import Any, Callable, Optional

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from dockyard.registry.notifications import Notifier
from dockyard.registry.store import Registry

# Upper bounds of the request latency buckets, in seconds (pushes of large blobs take long).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Route label of requests no route of the API matched.
OTHER_ROUTE = "other"


class _StateCollector(Collector):
    """Metrics read from state when scraped (refreshed off the event loop just before):
    GC totals, queue depths and endpoint counters, storage health."""

    def __init__(self) -> None:
        self.gc: dict[str, int] = {}
        self.endpoints: list[tuple[str, int, int, int, int, int]] = []
        self.healthy: Optional[bool] = None

    def collect(self) -> Iterator[Metric]:
        gc_help = (
            ("runs", "registry_gc_runs", "garbage collections run on the storage root"),
            ("blobs_swept", "registry_gc_blobs_swept", "blobs garbage collection deleted"),
            (
                "manifests_deleted",
                "registry_gc_manifests_deleted",
                "manifests garbage collection deleted",
            ),
        )
        for key, name, text in gc_help:
            yield CounterMetricFamily(name, text, value=self.gc.get(key, 0))
        families: dict[str, Any] = {
            "pending": GaugeMetricFamily(
                "registry_notifications_pending",
                "events queued for the endpoint (on disk and being written)",
                labels=["endpoint"],
            ),
            "queued": CounterMetricFamily(
                "registry_notifications_events",
                "events accepted into the endpoint's queue",
                labels=["endpoint"],
            ),
            "delivered": CounterMetricFamily(
                "registry_notifications_delivered",
                "events the endpoint accepted (2xx or 3xx)",
                labels=["endpoint"],
            ),
            "failures": CounterMetricFamily(
                "registry_notifications_failures",
                "deliveries that failed (error, timeout or another status) and are retried",
                labels=["endpoint"],
            ),
            "dropped": CounterMetricFamily(
                "registry_notifications_dropped",
                "events dropped: the queue was full (notifications.dockyard.maxqueue)",
                labels=["endpoint"],
            ),
        }
        for name, pending, queued, delivered, failures, dropped in self.endpoints:
            for key, value in (
                ("pending", pending),
                ("queued", queued),
                ("delivered", delivered),
                ("failures", failures),
                ("dropped", dropped),
            ):
                families[key].add_metric([name], value)
        yield from families.values()
        if self.healthy is not None:
            yield GaugeMetricFamily(
                "registry_storage_healthy",
                "1 when the storage driver answers (the health check's view), else 0",
                value=1 if self.healthy else 0,
            )


class RegistryMetrics:
    """The metrics of one registry application, in their own CollectorRegistry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "registry_http_requests",
            "HTTP requests answered, by method, route template and status code",
            ["method", "route", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "registry_http_request_duration_seconds",
            "seconds from a request's head to its answer's end, by method and route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.bytes_in = Counter(
            "registry_http_received_bytes",
            "request body bytes received, by route template",
            ["route"],
            registry=self.registry,
        )
        self.bytes_out = Counter(
            "registry_http_sent_bytes",
            "response body bytes sent, by route template",
            ["route"],
            registry=self.registry,
        )
        self.uploads = Gauge(
            "registry_uploads_in_progress",
            "blob upload requests (POST, PATCH, PUT of an upload) being received now",
            registry=self.registry,
        )
        self.state = _StateCollector()
        self.registry.register(self.state)

    def observe(
        self, method: str, route: str, code: int, seconds: float, received: int, sent: int
    ) -> None:
        self.requests.labels(method, route, str(code)).inc()
        self.latency.labels(method, route).observe(seconds)
        if received:
            self.bytes_in.labels(route).inc(received)
        if sent:
            self.bytes_out.labels(route).inc(sent)

    def refresh(
        self, registry: Registry, notifier: Optional[Notifier], healthy: Callable[[], bool]
    ) -> None:
        """Read the state metrics (disk: run it off the event loop)."""
        self.state.gc = registry.gc_stats()
        endpoints = []
        for queue in notifier.queues if notifier is not None else []:
            stats = queue.stats
            with stats.lock:
                counts = (stats.queued, stats.delivered, stats.failures, stats.dropped)
            endpoints.append((queue.endpoint.name, queue.depth(), *counts))
        self.state.endpoints = endpoints
        self.state.healthy = healthy()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def metrics_handler(
    metrics: RegistryMetrics, refresh: Callable[[], None]
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The `/metrics` handler of the debug listener."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.to_thread(refresh)
        body = metrics.exposition()
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    return handler
