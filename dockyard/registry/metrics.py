"""The registry's Prometheus metrics (`http.debug.prometheus`), served in the text format on the
debug listener (`http.debug.addr`, plain HTTP) beside `/debug/health`: requests by method, route
template and status, their latency, bytes received and sent, upload requests in progress,
garbage collections (from the totals `garbage-collect` keeps in the storage root), each
notification endpoint's queue depth, deliveries, failures and drops, and the storage's health.
Each application has its own CollectorRegistry (never prometheus_client's global one). With one
process the values live in its memory (nothing to share, no files to create or remove). With
several `--workers`, prometheus_client's multiprocess mode is used: before it forks, the first
process creates a private (0700) directory for this run, new at every start and never inside the
storage root (below `$RUNTIME_DIRECTORY`, else the temp directory; a killed run's directory is
removed by the next start), every process keeps its counters, histogram and gauge values in
files there, and `/metrics` (the first process's debug listener) sums them: requests answered by
any worker, events any worker queued or dropped. Uploads in progress are a `livesum` gauge: a
worker's share goes away when it dies. The state read at scrape time (GC totals and queue files
from disk, storage health) is read once, by the scraping process, so nothing is counted twice;
a queue's depth counts its files and the scraping process's events not yet written (another
worker's are written within milliseconds). The directory is removed when the registry stops."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Callable, Optional

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from dockyard.registry.notifications import Notifier
from dockyard.registry.store import Registry

log = logging.getLogger("dockyard.registry")

# Upper bounds of the request latency buckets, in seconds (pushes of large blobs take long).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Route label of requests no route of the API matched.
OTHER_ROUTE = "other"
# Name prefix of a run's metrics directory (several workers), below $RUNTIME_DIRECTORY or the
# temp directory; a directory is created under a hidden name and renamed once it is locked.
SHARED_PREFIX = "dockyard-registry-metrics-"
# Lock file in a run's metrics directory: held (flock) by the run's processes while they live;
# a directory whose lock nobody holds is a killed run's, removed at the next start.
SHARED_LOCK = ".owner.lock"
# Bytes a metrics file has once its process has sized it (its header: the bytes in use).
SHARED_FILE_HEAD = 8
# Environment variable naming the directory to prometheus_client's file-backed values.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _StateCollector(Collector):
    """Metrics read from state when scraped (refreshed off the event loop just before): GC
    totals, queue depths, storage health. Registered only in the registry that is scraped."""

    def __init__(self) -> None:
        self.gc: dict[str, int] = {}
        self.pending: list[tuple[str, int]] = []
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
        pending = GaugeMetricFamily(
            "registry_notifications_pending",
            "events queued for the endpoint (on disk and being written)",
            labels=["endpoint"],
        )
        for name, depth in self.pending:
            pending.add_metric([name], depth)
        yield pending
        if self.healthy is not None:
            yield GaugeMetricFamily(
                "registry_storage_healthy",
                "1 when the storage driver answers (the health check's view), else 0",
                value=1 if self.healthy else 0,
            )


class _SharedCollector(Collector):
    """Every process's values, from the run's metrics directory (prometheus_client's merge of
    its files). A file another process is creating is still empty until that process sizes it:
    skipped (it holds no value yet), where prometheus_client's own collector would fail."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def describe(self) -> Iterator[Metric]:
        return iter(())  # registering must not read files that may be in the making

    def collect(self) -> Iterator[Metric]:
        files = []
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".db"):
                continue
            path = os.path.join(self.directory, name)
            try:
                if os.stat(path).st_size >= SHARED_FILE_HEAD:
                    files.append(path)
            except FileNotFoundError:  # a dead worker's live gauges (worker_exited)
                continue
        return iter(MultiProcessCollector.merge(files, accumulate=True))


@dataclass
class SharedMetrics:
    """A run's metrics directory (several workers): every process's values are files in it."""

    directory: str
    # the lock file's descriptor: held while this run (and its forked workers) live
    lock: int


def share_metrics() -> SharedMetrics:
    """Before the workers fork: create this run's private metrics directory (removing those of
    killed runs) and switch prometheus_client to its file-backed values. Metrics made from here
    on, in this process and the forked ones, keep their values in files named by their pid."""
    parent = _shared_parent()
    _remove_stale(parent)
    hidden = tempfile.mkdtemp(prefix="." + SHARED_PREFIX, dir=parent)  # 0700, this user's
    lock = os.open(
        os.path.join(hidden, SHARED_LOCK), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
    )
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    directory = os.path.join(parent, os.path.basename(hidden)[1:])
    os.rename(hidden, directory)  # locked before a start could take it for a killed run's
    os.environ[MULTIPROC_ENV] = directory
    values.ValueClass = values.MultiProcessValue()
    log.info("metrics of the workers in %s", directory)
    return SharedMetrics(directory, lock)


def unshare_metrics(shared: SharedMetrics) -> None:
    """Once every worker has exited: remove the directory, back to values in memory."""
    values.ValueClass = values.MutexValue
    if os.environ.get(MULTIPROC_ENV) == shared.directory:
        del os.environ[MULTIPROC_ENV]
    shutil.rmtree(shared.directory, ignore_errors=True)
    os.close(shared.lock)


def worker_exited(shared: SharedMetrics, pid: int) -> None:
    """A worker is gone: its share of the live gauges (uploads in progress) with it."""
    mark_process_dead(pid, shared.directory)


def _shared_parent() -> str:
    """Where runs' metrics directories go: the service's runtime directory (systemd's
    RuntimeDirectory=, host-local), else the temp directory; never the storage root."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return runtime if runtime and os.path.isdir(runtime) else tempfile.gettempdir()


def _remove_stale(parent: str) -> None:
    """Remove the metrics directories of this user's runs that were killed (their lock free)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(SHARED_PREFIX):
            continue
        path = os.path.join(parent, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_uid != os.geteuid():
                continue
            lock = os.open(SHARED_LOCK, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except OSError:
            continue
        finally:
            os.close(fd)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live run's (or a lock that cannot be taken: left alone)
        finally:
            os.close(lock)
        log.warning("removing %s, the metrics directory of a registry that was killed", path)
        shutil.rmtree(path, ignore_errors=True)


class RegistryMetrics:
    """The metrics of one registry application, in their own CollectorRegistry. `shared`: the
    run's metrics directory when there are several workers (then this registry reads every
    process's values from it; the metrics themselves are registered nowhere)."""

    def __init__(self, shared: Optional[SharedMetrics] = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        own: Optional[CollectorRegistry] = self.registry
        if shared is not None:
            if not getattr(values.ValueClass, "_multiprocess", False):
                raise RuntimeError("share_metrics() must run before the metrics are made")
            self.registry.register(_SharedCollector(shared.directory))
            own = None
        self.requests = Counter(
            "registry_http_requests",
            "HTTP requests answered, by method, route template and status code",
            ["method", "route", "code"],
            registry=own,
        )
        self.latency = Histogram(
            "registry_http_request_duration_seconds",
            "seconds from a request's head to its answer's end, by method and route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self.bytes_in = Counter(
            "registry_http_received_bytes",
            "request body bytes received, by route template",
            ["route"],
            registry=own,
        )
        self.bytes_out = Counter(
            "registry_http_sent_bytes",
            "response body bytes sent, by route template",
            ["route"],
            registry=own,
        )
        self.uploads = Gauge(
            "registry_uploads_in_progress",
            "blob upload requests (POST, PATCH, PUT of an upload) being received now",
            registry=own,
            multiprocess_mode="livesum",
        )
        # per endpoint, counted by the process whose thread did it (queued, dropped: any
        # process; delivered, failures: the delivering one)
        self.notifications: dict[str, Counter] = {
            "queued": Counter(
                "registry_notifications_events",
                "events accepted into the endpoint's queue",
                ["endpoint"],
                registry=own,
            ),
            "delivered": Counter(
                "registry_notifications_delivered",
                "events the endpoint accepted (2xx or 3xx)",
                ["endpoint"],
                registry=own,
            ),
            "failures": Counter(
                "registry_notifications_failures",
                "deliveries that failed (error, timeout or another status) and are retried",
                ["endpoint"],
                registry=own,
            ),
            "dropped": Counter(
                "registry_notifications_dropped",
                "events dropped: the queue was full (notifications.dockyard.maxqueue)",
                ["endpoint"],
                registry=own,
            ),
        }
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

    def count_notifications(self, notifier: Notifier) -> None:
        """Count what the notifier's queues do (before it starts): every endpoint's counters
        from zero on, then each count as its thread makes it."""
        for queue in notifier.queues:
            name = queue.endpoint.name
            # made now, so that each is exposed (at 0) before its first count
            counters = {key: counter.labels(name) for key, counter in self.notifications.items()}

            def sink(key: str, count: int, counters: dict[str, Counter] = counters) -> None:
                counters[key].inc(count)

            queue.stats.sink = sink

    def refresh(
        self, registry: Registry, notifier: Optional[Notifier], healthy: Callable[[], bool]
    ) -> None:
        """Read the state metrics (disk: run it off the event loop)."""
        self.state.gc = registry.gc_stats()
        queues = notifier.queues if notifier is not None else []
        self.state.pending = [(queue.endpoint.name, queue.depth()) for queue in queues]
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
