"""The registry's aiohttp application: the route table over the handlers (one module per
resource in handlers/), the middleware (access check, the one translation of registry errors to
answers, headers, access log, request metrics), `/v2/`, `/debug/health`, the debug listener
(`http.debug.addr`: `/debug/health` and Prometheus metrics), the notifications' queues and the
background tasks (upload purging, forgetting digest states of uploads gone elsewhere, sweeping
stale temp files, the storage health check)."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

from aiohttp import web

from dockyard.fsutil import TempSweep
from dockyard.registry import paths as p
from dockyard.registry.auth import BasicAuth, check_access, load_htpasswd
from dockyard.registry.config import RegistryConfig, split_addr
from dockyard.registry.connection import API_VERSION, error_response, json_response
from dockyard.registry.download import BLOB_READ_THREADS
from dockyard.registry.errors import (
    NotFound,
    RegistryError,
    Unavailable,
    Unsupported,
    error_for_status,
)
from dockyard.registry.handlers import Context, Route
from dockyard.registry.handlers.blobs import BlobHandlers
from dockyard.registry.handlers.manifests import ManifestHandlers
from dockyard.registry.handlers.referrers import ReferrerHandlers
from dockyard.registry.handlers.tags import ListingHandlers
from dockyard.registry.handlers.uploads import UploadHandlers
from dockyard.registry.manifeststore import MANIFEST_MAX
from dockyard.registry.metrics import OTHER_ROUTE, RegistryMetrics, SharedMetrics, metrics_handler
from dockyard.registry.notifications import REQUEST_USER, Notifier, basic_user
from dockyard.registry.store import build_registry
from dockyard.registry.transfer import BODY_BYTES, BODY_REFUSED

log = logging.getLogger("dockyard.registry")

# Seconds between sweeps of in-memory digest states whose upload is gone from storage.
FORGET_INTERVAL = 600
# Temp files (.tmp-*) last written longer ago than this are a killed writer's leftovers: a live
# one is renamed once its fsyncs are done (seconds; minutes on a struggling NFS server), and an
# hour also covers clock skew between registries sharing the root. Younger ones are never touched.
TEMP_STALE_SECONDS = 3600.0
# Seconds between sweeps of stale temp files; the first runs at start-up, in every process.
TEMP_SWEEP_INTERVAL = 24 * 3600.0
# Name of the (non-failing) /debug/health entry that reports stale temp files not removed.
TEMP_HEALTH_CHECK = "storagedriver_filesystem_tempfiles"
# Request key of the route template the request matched (the metrics' route label).
ROUTE = "dockyard.route"
# Route templates of the upload requests that carry blob bytes (registry_uploads_in_progress).
_UPLOAD_ROUTES = ("/v2/<name>/blobs/uploads/", "/v2/<name>/blobs/uploads/<uuid>")


def _routes(ctx: Context, base: Any) -> list[Route]:
    """The API's routes, in the order they are tried (uploads before blobs)."""
    blobs, uploads, manifests = BlobHandlers(ctx), UploadHandlers(ctx), ManifestHandlers(ctx)
    listings, referrers = ListingHandlers(ctx), ReferrerHandlers(ctx)
    name = r"^/v2/(?P<name>.+)"
    return [
        Route(re.compile(r"^/v2/$"), {"GET": base, "HEAD": base}, "/v2/"),
        Route(re.compile(r"^/v2/_catalog$"), {"GET": listings.catalog}, "/v2/_catalog"),
        Route(
            re.compile(rf"{name}/blobs/uploads/?$"),
            {"POST": uploads.start},
            "/v2/<name>/blobs/uploads/",
        ),
        Route(
            re.compile(rf"{name}/blobs/uploads/(?P<upload>[^/]+)$"),
            {
                "GET": uploads.status,
                "PATCH": uploads.patch,
                "PUT": uploads.put,
                "DELETE": uploads.cancel,
            },
            "/v2/<name>/blobs/uploads/<uuid>",
        ),
        Route(
            re.compile(rf"{name}/blobs/(?P<digest>[^/]+)$"),
            {"GET": blobs.get, "HEAD": blobs.get, "DELETE": blobs.delete},
            "/v2/<name>/blobs/<digest>",
        ),
        Route(
            re.compile(rf"{name}/manifests/(?P<reference>[^/]+)$"),
            {
                "GET": manifests.get,
                "HEAD": manifests.get,
                "PUT": manifests.put,
                "DELETE": manifests.delete,
            },
            "/v2/<name>/manifests/<reference>",
        ),
        Route(re.compile(rf"{name}/tags/list$"), {"GET": listings.tags}, "/v2/<name>/tags/list"),
        Route(
            re.compile(rf"{name}/referrers/(?P<digest>[^/]+)$"),
            {"GET": referrers.get},
            "/v2/<name>/referrers/<digest>",
        ),
    ]


class RegistryApp:
    """Holds the configuration and stores; builds the aiohttp application."""

    def __init__(
        self,
        config: RegistryConfig,
        background: bool = True,
        shared_metrics: Optional[SharedMetrics] = None,
    ) -> None:
        self.config = config
        # upload purging runs in one process only (the first of several workers)
        self.background = background
        self.registry = build_registry(config)
        # basic auth (htpasswd, bcrypt), when configured
        self.auth: Optional[BasicAuth] = None
        self.health_failures = 0
        self.health_error: Optional[str] = None
        # what the last sweep of stale temp files left (read-only mode, or removal failed)
        self.temp_sweep = TempSweep()
        self.blob_reads = ThreadPoolExecutor(BLOB_READ_THREADS, thread_name_prefix="blob-read")
        if config.htpasswd_path and config.htpasswd_realm:
            self.auth = BasicAuth(config.htpasswd_realm, load_htpasswd(config.htpasswd_path))
        # in memory, or (several workers) in files every process shares: see metrics.py
        self.metrics = RegistryMetrics(shared_metrics)
        # events of successful requests, queued per endpoint; only the first process delivers
        self.notifier: Optional[Notifier] = None
        if any(not e.disabled for e in config.notifications.endpoints):
            self.notifier = Notifier(config.notifications, config.addr, deliver=background)
            self.metrics.count_notifications(self.notifier)
        context = Context(self.registry, self.blob_reads, self.notifier)
        self.routes = _routes(context, self.base)

    # ---- application wiring --------------------------------------------------------------
    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=MANIFEST_MAX + 1)
        app.router.add_route("*", "/debug/health", self.health)
        app.router.add_route("*", "/v2", self.redirect_base)
        app.router.add_route("*", "/v2/{tail:.*}", self.dispatch)
        app.cleanup_ctx.append(self._background)
        return app

    async def _background(self, app: web.Application) -> Any:
        if self.notifier is not None:
            await asyncio.to_thread(self.notifier.start)
        debug = await self._start_debug() if self.background else None
        tasks = []
        if self.config.purge_enabled and not self.config.readonly and self.background:
            tasks.append(asyncio.create_task(self._purge_loop()))
        if self.config.health_enabled:
            tasks.append(asyncio.create_task(self._health_loop()))
        tasks.append(asyncio.create_task(self._forget_loop()))
        tasks.append(asyncio.create_task(self._temp_sweep_loop()))
        yield
        for task in tasks:
            task.cancel()
        if debug is not None:
            await debug.cleanup()
        if self.notifier is not None:
            # what requests handed over is written to the queues before the process ends
            await asyncio.to_thread(self.notifier.stop)
        self.blob_reads.shutdown(wait=False, cancel_futures=True)
        if self.auth is not None:
            self.auth.close()

    # ---- the debug listener ----------------------------------------------------------------
    def build_debug(self) -> web.Application:
        """The debug listener's application: /debug/health, and the metrics when enabled."""
        app = web.Application()
        app.router.add_route("GET", "/debug/health", self.health)
        if self.config.prometheus_enabled:
            handler = metrics_handler(self.metrics, self.refresh_metrics)
            app.router.add_route("GET", self.config.prometheus_path, handler)
        return app

    async def _start_debug(self) -> Optional[web.AppRunner]:
        """Serve the debug listener on http.debug.addr (plain HTTP, the first process only)."""
        if self.config.debug_addr is None:
            return None
        host, port = split_addr(self.config.debug_addr)
        runner = web.AppRunner(self.build_debug(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                exc.errno, f"http.debug.addr {self.config.debug_addr}: {exc.strerror}"
            ) from None
        log.info("debug listener on http://%s:%d", host, port)
        return runner

    def refresh_metrics(self) -> None:
        self.metrics.refresh(self.registry, self.notifier, self._storage_healthy)

    def _storage_healthy(self) -> bool:
        """The health check's verdict when it runs; else a check now."""
        if self.config.health_enabled:
            return self.health_failures < self.config.health_threshold
        try:
            self.registry.check_storage()
        except Unavailable:
            return False
        return True

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        started = time.monotonic()
        response: Optional[web.StreamResponse] = None
        status = 500  # an exception no one answers becomes aiohttp's 500
        try:
            response = await self._answer(request, handler)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            route = request.get(ROUTE) or (
                "/debug/health" if request.path == "/debug/health" else OTHER_ROUTE
            )
            sent = 0
            if response is not None and request.method != "HEAD":
                sent = response.content_length or 0
            self.metrics.observe(
                request.method,
                route,
                status,
                time.monotonic() - started,
                request.get(BODY_BYTES, 0),
                sent,
            )

    async def _answer(self, request: web.Request, handler: Any) -> web.StreamResponse:
        started = time.monotonic()
        try:
            if request.path.startswith("/v2"):
                authorization = request.headers.get("Authorization")
                await check_access(
                    self.auth, self.config.readonly, request.method, authorization, request.remote
                )
                if self.auth is not None:
                    request[REQUEST_USER] = basic_user(authorization)
            response = await handler(request)
        except RegistryError as error:
            response = error_response(error)
        except web.HTTPException as exc:  # aiohttp's router (no route), request.read() (413)
            if exc.status < 400:
                raise  # the redirect of /v2
            response = error_response(error_for_status(exc.status, exc.text))
        if request.get(BODY_REFUSED):
            response.force_close()  # the body's rest is never read: the connection ends here
        response.headers[API_VERSION[0]] = API_VERSION[1]
        for name, values in self.config.headers.items():
            response.headers[name] = ", ".join(values)
        log.info(
            "%s %s %s %d %.1fms",
            request.remote,
            request.method,
            request.path_qs[:200],
            response.status,
            (time.monotonic() - started) * 1000,
        )
        return response

    async def redirect_base(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently("/v2/")

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        for route in self.routes:
            match = route.pattern.match(path)
            if not match:
                continue
            request[ROUTE] = route.template
            handler = route.methods.get(request.method)
            if handler is None:
                raise Unsupported(message=f"{request.method} is not supported on {path[:100]}")
            params = match.groupdict()
            if "name" in params:
                p.validate_name(params["name"])
            if route.template in _UPLOAD_ROUTES and request.method in ("POST", "PATCH", "PUT"):
                self.metrics.uploads.inc()
                try:
                    return await handler(request, params)
                finally:
                    self.metrics.uploads.dec()
            return await handler(request, params)
        raise NotFound({"path": path[:200]})

    # ---- /v2/ and /debug/health ----------------------------------------------------------
    async def base(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        return json_response({})

    async def health(self, request: web.Request) -> web.StreamResponse:
        """distribution's format: check name → error, 503 when the storage check fails. Stale
        temp files the sweep could not remove are reported too, but never fail the check: they
        cost a little space, and serving goes on (a load balancer must keep this registry)."""
        body: dict[str, str] = {}
        status = 200
        if self.config.health_enabled and self.health_failures >= self.config.health_threshold:
            body["storagedriver_filesystem"] = self.health_error or "unavailable"
            status = 503
        if self.temp_sweep.left:
            body[TEMP_HEALTH_CHECK] = self._temp_report(self.temp_sweep)
        return json_response(body, status=status, headers={API_VERSION[0]: API_VERSION[1]})

    # ---- background --------------------------------------------------------------------
    async def _purge_loop(self) -> None:
        while True:
            await asyncio.to_thread(self.purge_uploads)
            await asyncio.sleep(self.config.purge_interval)

    async def _forget_loop(self) -> None:
        """Drop digest states of uploads another worker finished, cancelled or purged."""
        while True:
            await asyncio.sleep(FORGET_INTERVAL)
            await asyncio.to_thread(self.registry.uploads.forget_gone)

    def purge_uploads(self) -> list[tuple[str, str]]:
        """Remove uploads older than storage.maintenance.uploadpurging.age (dry run: list)."""
        return self.registry.uploads.purge(
            self.config.purge_age, self.config.purge_dryrun, log=lambda line: log.info("%s", line)
        )

    async def _temp_sweep_loop(self) -> None:
        """Remove stale temp files at start-up and every TEMP_SWEEP_INTERVAL. Every process
        sweeps (each removal is safe by age alone), so each one's /debug/health is right."""
        while True:
            await asyncio.to_thread(self.sweep_temp_files)
            await asyncio.sleep(TEMP_SWEEP_INTERVAL)

    def sweep_temp_files(self) -> TempSweep:
        """Remove temp files older than TEMP_STALE_SECONDS below the root (read-only mode: only
        find them); what is left is reported by /debug/health."""
        sweep = self.registry.sweep_temp_files(TEMP_STALE_SECONDS, not self.config.readonly)
        if sweep.removed:
            log.warning(
                "removed %d stale temp files (.tmp-*, older than %ds) from the storage root",
                sweep.removed,
                TEMP_STALE_SECONDS,
            )
        if sweep.left:
            log.warning("%s", self._temp_report(sweep))
        self.temp_sweep = sweep
        return sweep

    @staticmethod
    def _temp_report(sweep: TempSweep) -> str:
        path, mtime, why = min(sweep.left, key=lambda entry: entry[1])
        reasons = sorted({entry[2] for entry in sweep.left})
        return (
            f"{len(sweep.left)} stale temp files (.tmp-*, older than {TEMP_STALE_SECONDS:.0f}s)"
            f" left in the storage root ({'; '.join(reasons)}); the oldest, "
            f"{time.time() - mtime:.0f}s old: {path}"
        )

    async def _health_loop(self) -> None:
        """Probe the storage every interval on a thread of its own. A probe that has not
        answered within the interval counts as a failure each interval while it hangs (a hard
        NFS mount whose server is gone blocks in the kernel, it never fails): no second probe
        starts meanwhile, and the first answer after the outage resets the count."""
        pending: Optional[asyncio.Future[None]] = None
        started = time.monotonic()
        while True:
            if pending is None:
                pending = _in_daemon_thread(self.registry.check_storage)
                started = time.monotonic()
            done, _ = await asyncio.wait({pending}, timeout=self.config.health_interval)
            if not done:
                self.health_failures += 1
                self.health_error = (
                    f"the storage has not answered for {time.monotonic() - started:.0f}s"
                )
                continue
            try:
                pending.result()
                self.health_failures, self.health_error = 0, None
            except Unavailable as exc:
                self.health_failures += 1
                self.health_error = exc.message
            pending = None
            await asyncio.sleep(self.config.health_interval)


def _in_daemon_thread(func: Callable[[], None]) -> asyncio.Future[None]:
    """Run `func` on a daemon thread of its own: a call stuck in the kernel (a hard NFS mount)
    can be neither interrupted nor joined, and must not hold the process at exit the way an
    executor's worker threads do."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def settle(error: Optional[Exception]) -> None:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    def run() -> None:
        error: Optional[Exception] = None
        try:
            func()
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            error = exc
        try:
            loop.call_soon_threadsafe(settle, error)
        except RuntimeError:  # the loop closed while the call hung
            pass

    threading.Thread(target=run, name="storage-health-probe", daemon=True).start()
    return future
