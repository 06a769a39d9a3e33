"""The registry's HTTP layer on aiohttp: one handler per route of the OCI Distribution Spec v1.1
(plus what the docker CLI needs), auth, read-only mode, headers, health and the background
upload purger. Handlers never build storage paths: they call the stores with validated values."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional
from urllib.parse import urlencode

from aiohttp import web

from dockyard.registry import paths as p
from dockyard.registry.config import RegistryConfig
from dockyard.registry.driver import FilesystemDriver
from dockyard.registry.errors import (
    BlobUnknown,
    BlobUploadInvalid,
    DriverError,
    InvalidPath,
    NameInvalid,
    NotFound,
    PaginationInvalid,
    RangeInvalid,
    RangeNotSatisfiable,
    RegistryError,
    SizeInvalid,
    TooLarge,
    Unauthorized,
    Unsupported,
    status_for,
)
from dockyard.registry.manifest import OCI_INDEX
from dockyard.registry.store import MANIFEST_MAX, Registry, ensure_upload_offsets

log = logging.getLogger("dockyard.registry")

API_VERSION = ("Docker-Distribution-Api-Version", "registry/2.0")
# Bytes handed to the writer per step while streaming an upload body.
STREAM_CHUNK = 1024 * 1024
# Seconds between sweeps of in-memory digest states whose upload is gone from storage.
FORGET_INTERVAL = 600
# Request bodies up to this size are hashed and written on the event loop (see _stream_into).
INLINE_BODY_MAX = 2 * 1024 * 1024
# Milliseconds a download may wait for the client to read before it is dropped.
SEND_STALL_MS = 120_000
# Bytes per read/write step of a download (see _send_range).
SEND_BUFFER = 4 * 1024 * 1024
# Downloads copied at once (more wait for a thread); memory bound DOWNLOAD_THREADS x SEND_BUFFER.
DOWNLOAD_THREADS = 32
# Catalog page size when the client gives no n, and the most it may ask for.
CATALOG_DEFAULT, CATALOG_MAX = 100, 1000
# Successful basic-auth checks are remembered (by a hash of the credentials) this long.
AUTH_CACHE_SECONDS = 300.0

Handler = Callable[[web.Request, dict[str, str]], Awaitable[web.StreamResponse]]


@dataclass
class Route:
    pattern: re.Pattern[str]
    methods: dict[str, Handler]


def _json(body: Any, status: int = 200, headers: Optional[dict[str, str]] = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _error_response(error: RegistryError) -> web.Response:
    status = status_for(error)
    headers = {}
    if isinstance(error, Unauthorized) and error.detail and "realm" in error.detail:
        headers["WWW-Authenticate"] = f'Basic realm="{error.detail["realm"]}"'
    return _json(error.body(), status=status, headers=headers)


def _send_range(sock_fd: int, file_fd: int, offset: int, count: int) -> None:
    """Copy `count` bytes of a file from `offset` to the socket, from a worker thread.

    The copy runs on a duplicate of the socket's descriptor (the event loop closing its own
    can never make this thread write into a reused descriptor), made blocking for the transfer
    with a send timeout, so a client that stops reading frees the thread. The bytes go through
    one buffer of SEND_BUFFER bytes: measured on loopback this moves large blobs faster than
    sendfile(2), whose page-sized fragments cost the receiving side more than one copy costs
    here. Every call releases the GIL.
    """
    fd = os.dup(sock_fd)
    try:
        with socket.socket(fileno=os.dup(fd)) as options:
            options.setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_STALL_MS // 1000, 0)
            )
        os.set_blocking(fd, True)
        view = memoryview(bytearray(min(SEND_BUFFER, count)))
        while count > 0:
            n = os.preadv(file_fd, [view[: min(len(view), count)]], offset)
            if n == 0:
                raise ConnectionError("blob file ended early")  # truncated under us
            sent = 0
            while sent < n:
                try:
                    sent += os.write(fd, view[sent:n])
                except BlockingIOError:
                    raise ConnectionError("client stopped reading") from None
            offset += n
            count -= n
    finally:
        os.set_blocking(fd, False)
        os.close(fd)


def _digest_param(value: Optional[str]) -> p.Digest:
    if value is None:
        raise p.DigestInvalid(message="digest parameter is required")
    return p.parse_digest(value)


def _content_range(header: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    if not header:
        return None, None
    match = re.fullmatch(r"(?:bytes[ =])?(\d{1,19})-(\d{1,19})", header.strip())
    if not match or int(match.group(2)) < int(match.group(1)):
        raise RangeInvalid({"Content-Range": header[:100]})
    return int(match.group(1)), int(match.group(2))


def _range(header: Optional[str], size: int) -> Optional[tuple[int, int]]:
    """(start, end inclusive) of a Range header, None for the whole blob; 416 when invalid."""
    if header is None:
        return None
    match = re.fullmatch(r"bytes=(\d{0,19})-(\d{0,19})", header.strip())
    if not match or (match.group(1) == "" and match.group(2) == ""):
        raise RangeNotSatisfiable({"Range": header[:100], "size": size})
    if match.group(1) == "":
        length = int(match.group(2))
        if length == 0:
            raise RangeNotSatisfiable({"Range": header[:100], "size": size})
        return max(0, size - length), size - 1
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) else size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable({"Range": header[:100], "size": size})
    return start, min(end, size - 1)


def _page(items: list[str], request: web.Request, default: Optional[int], cap: int) -> tuple:
    """Apply n/last pagination; returns (page, Link header or None)."""
    raw_n = request.query.get("n")
    last = request.query.get("last")
    if raw_n is None:
        n = default
    else:
        if not re.fullmatch(r"\d{1,9}", raw_n):
            raise PaginationInvalid({"n": raw_n[:50]})
        n = min(int(raw_n), cap)
    if last:
        items = [i for i in items if i > last]
    if n is None or len(items) <= n:
        return items[: n if n is not None else len(items)], None
    page = items[:n]
    query = urlencode({"n": n, "last": page[-1]}) if page else urlencode({"n": n})
    return page, f'<{request.path}?{query}>; rel="next"'


class RegistryApp:
    """Holds the configuration and stores; builds the aiohttp application."""

    def __init__(self, config: RegistryConfig, background: bool = True) -> None:
        self.config = config
        # upload purging runs in one process only (the first of several workers)
        self.background = background
        os.makedirs(config.rootdirectory, exist_ok=True)
        self.registry = Registry(FilesystemDriver(config.rootdirectory), config.delete_enabled)
        self.htpasswd: dict[str, bytes] = {}
        self._auth_cache: dict[str, float] = {}
        self.health_failures = 0
        self.health_error: Optional[str] = None
        # Downloads get their own threads: a few slow clients must not hold the threads that
        # uploads and manifest writes run on (and the other way round).
        self.downloads = ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="download")
        if config.htpasswd_path:
            self.htpasswd = load_htpasswd(config.htpasswd_path)
        self.routes: list[Route] = [
            Route(re.compile(r"^/v2/$"), {"GET": self.base, "HEAD": self.base}),
            Route(re.compile(r"^/v2/_catalog$"), {"GET": self.catalog}),
            Route(
                re.compile(r"^/v2/(?P<name>.+)/blobs/uploads/?$"),
                {"POST": self.upload_start},
            ),
            Route(
                re.compile(r"^/v2/(?P<name>.+)/blobs/uploads/(?P<upload>[^/]+)$"),
                {
                    "GET": self.upload_status,
                    "PATCH": self.upload_patch,
                    "PUT": self.upload_put,
                    "DELETE": self.upload_cancel,
                },
            ),
            Route(
                re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)$"),
                {"GET": self.blob_get, "HEAD": self.blob_get, "DELETE": self.blob_delete},
            ),
            Route(
                re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)$"),
                {
                    "GET": self.manifest_get,
                    "HEAD": self.manifest_get,
                    "PUT": self.manifest_put,
                    "DELETE": self.manifest_delete,
                },
            ),
            Route(re.compile(r"^/v2/(?P<name>.+)/tags/list$"), {"GET": self.tags_list}),
            Route(
                re.compile(r"^/v2/(?P<name>.+)/referrers/(?P<digest>[^/]+)$"),
                {"GET": self.referrers},
            ),
        ]

    # ---- application wiring --------------------------------------------------------------
    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=MANIFEST_MAX + 1)
        app.router.add_route("*", "/debug/health", self.health)
        app.router.add_route("*", "/v2", self.redirect_base)
        app.router.add_route("*", "/v2/{tail:.*}", self.dispatch)
        app.cleanup_ctx.append(self._background)
        return app

    async def _background(self, app: web.Application) -> Any:
        tasks = []
        if self.config.purge_enabled and not self.config.readonly and self.background:
            tasks.append(asyncio.create_task(self._purge_loop()))
        if self.config.health_enabled:
            tasks.append(asyncio.create_task(self._health_loop()))
        tasks.append(asyncio.create_task(self._forget_loop()))
        yield
        for task in tasks:
            task.cancel()
        self.downloads.shutdown(wait=False, cancel_futures=True)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        started = time.monotonic()
        try:
            if request.path.startswith("/v2"):
                self._authorize(request)
                if self.config.readonly and request.method in ("POST", "PUT", "PATCH", "DELETE"):
                    raise Unsupported(message="the registry is in read-only mode")
            response = await handler(request)
        except RegistryError as error:
            response = _error_response(error)
        except InvalidPath:
            response = _error_response(NameInvalid())
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

    def _authorize(self, request: web.Request) -> None:
        if not self.config.htpasswd_realm:
            return
        challenge = Unauthorized({"realm": self.config.htpasswd_realm})
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            raise challenge
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError) as exc:
            raise challenge from exc
        key = hashlib.sha256(f"{user}\0{password}".encode()).hexdigest()
        now = time.monotonic()
        if self._auth_cache.get(key, 0.0) > now:
            return
        stored = self.htpasswd.get(user)
        if stored is None or not _bcrypt_ok(password, stored):
            raise challenge
        self._auth_cache[key] = now + AUTH_CACHE_SECONDS

    async def redirect_base(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently("/v2/")

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        for route in self.routes:
            match = route.pattern.match(path)
            if not match:
                continue
            handler = route.methods.get(request.method)
            if handler is None:
                raise Unsupported(message=f"{request.method} is not supported on {path[:100]}")
            params = match.groupdict()
            if "name" in params:
                p.validate_name(params["name"])
            return await handler(request, params)
        raise NotFound({"path": path[:200]})

    # ---- handlers --------------------------------------------------------------------------
    async def base(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        return _json({})

    async def health(self, request: web.Request) -> web.StreamResponse:
        if self.config.health_enabled and self.health_failures >= self.config.health_threshold:
            body = {"storagedriver_filesystem": self.health_error or "unavailable"}
            return _json(body, status=503, headers={API_VERSION[0]: API_VERSION[1]})
        return _json({}, headers={API_VERSION[0]: API_VERSION[1]})

    async def catalog(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        repos = await asyncio.to_thread(self.registry.catalog)
        page, link = _page(repos, request, CATALOG_DEFAULT, CATALOG_MAX)
        return _json({"repositories": page}, headers={"Link": link} if link else None)

    async def tags_list(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        name = params["name"]
        tags = await asyncio.to_thread(self.registry.tags, name)
        page, link = _page(tags, request, None, 10_000)
        return _json({"name": name, "tags": page}, headers={"Link": link} if link else None)

    async def blob_get(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        name, digest = params["name"], p.parse_digest(params["digest"])
        size = self.registry.repo_blob_size(name, digest)
        headers = {
            "Docker-Content-Digest": str(digest),
            "ETag": f'"{digest}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "Cache-Control": "max-age=31536000",
        }
        wanted = _range(request.headers.get("Range"), size)
        start, end = wanted if wanted else (0, size - 1)
        length = end - start + 1 if size else 0
        status = 206 if wanted else 200
        if wanted:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        if request.method == "HEAD":
            headers["Content-Length"] = str(length)
            return web.Response(status=status, headers=headers)
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = length
        await response.prepare(request)
        try:
            if length:
                await self._send_blob(request, response, digest, start, length)
            await response.write_eof()
        except (ConnectionError, BrokenPipeError) as exc:
            # The client went away mid-download: nothing to answer, close the connection.
            log.info("download of %s cut short: %s", digest, exc)
            if request.transport is not None:
                request.transport.close()
        return response

    async def _send_blob(
        self,
        request: web.Request,
        response: web.StreamResponse,
        digest: p.Digest,
        start: int,
        length: int,
    ) -> None:
        loop = asyncio.get_running_loop()
        transport = request.transport
        with self.registry.open_blob(digest) as f:
            sock = transport.get_extra_info("socket") if transport is not None else None
            if (
                transport is not None
                and sock is not None
                and transport.get_extra_info("sslcontext") is None
                and transport.get_write_buffer_size() == 0
            ):
                # Plain HTTP with the headers already on the wire: copy from a worker thread,
                # so the event loop does not turn once per socket buffer.
                # The loop stops reading the connection meanwhile: it is blocking for the copy.
                paused = transport.is_reading()
                if paused:
                    transport.pause_reading()
                try:
                    await loop.run_in_executor(
                        self.downloads, _send_range, sock.fileno(), f.fileno(), start, length
                    )
                finally:
                    if paused and not transport.is_closing():
                        transport.resume_reading()
                return
            if transport is not None:
                try:
                    # asyncio's own sendfile, which falls back to reads and writes under TLS.
                    await loop.sendfile(transport, f, start, length)
                    return
                except NotImplementedError:
                    pass
            f.seek(start)
            remaining = length
            while remaining:
                chunk = f.read(min(STREAM_CHUNK, remaining))
                if not chunk:
                    raise BlobUnknown({"digest": str(digest)})
                await response.write(chunk)
                remaining -= len(chunk)

    async def blob_delete(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        if not self.config.delete_enabled:
            raise Unsupported(message="deletion is disabled (storage.delete.enabled)")
        digest = p.parse_digest(params["digest"])
        self.registry.unlink_blob(params["name"], digest)
        return web.Response(status=202, headers={"Docker-Content-Digest": str(digest)})

    def _upload_headers(self, name: str, upload_id: str, size: int) -> dict[str, str]:
        return {
            "Location": f"/v2/{name}/blobs/uploads/{upload_id}",
            "Range": f"0-{max(size - 1, 0)}",
            "Docker-Upload-UUID": upload_id,
        }

    async def _stream_into(
        self, request: web.Request, name: str, upload_id: str, start: Optional[int]
    ) -> tuple[int, int]:
        """Append the request body to an upload: (bytes received, upload size after)."""
        loop = asyncio.get_running_loop()
        declared = request.content_length
        with self.registry.append_upload(name, upload_id, start) as appender:
            before = appender.size
            if declared is not None and declared <= INLINE_BODY_MAX:
                # A small body: each chunk hashed and written as it arrives, overlapping the
                # client's sending, with no thread hop.
                try:
                    while chunk := await request.content.readany():
                        appender.write(chunk)
                except (ConnectionResetError, asyncio.IncompleteReadError) as exc:
                    raise BlobUploadInvalid(message="upload body was cut short") from exc
                return appender.size - before, appender.size
            # Pipeline: a worker thread hashes and writes one batch (hashlib and file writes
            # release the GIL) while the event loop receives the next one.
            writing: Optional[asyncio.Future[None]] = None
            batch: list[bytes] = []
            batched = 0
            try:
                while True:
                    chunk = await request.content.readany()
                    if chunk:
                        batch.append(chunk)
                        batched += len(chunk)
                    if batched >= STREAM_CHUNK or (not chunk and batch):
                        if writing is not None:
                            await writing
                        if not chunk and writing is None:
                            # A small body in one batch: no thread hop for it.
                            appender.write_many(batch)
                        else:
                            writing = loop.run_in_executor(None, appender.write_many, batch)
                        batch, batched = [], 0
                    if not chunk:
                        break
            except (ConnectionResetError, asyncio.IncompleteReadError) as exc:
                raise BlobUploadInvalid(message="upload body was cut short") from exc
            finally:
                if writing is not None:
                    await writing
            return appender.size - before, appender.size

    def _check_length(self, request: web.Request, received: int) -> None:
        declared = request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) != received:
            raise SizeInvalid({"declared": int(declared), "received": received})

    async def upload_start(
        self, request: web.Request, params: dict[str, str]
    ) -> web.StreamResponse:
        name = params["name"]
        mount, source = request.query.get("mount"), request.query.get("from")
        if mount is not None:
            digest = p.parse_digest(mount)
            if source is not None:
                p.validate_name(source)
                if self.registry.mount_blob(name, source, digest):
                    return self._created(name, digest)
        status = self.registry.start_upload(name)
        if "digest" in request.query:
            digest = _digest_param(request.query.get("digest"))
            received, _ = await self._stream_into(request, name, status.upload_id, None)
            self._check_length(request, received)
            await asyncio.to_thread(self.registry.finish_upload, name, status.upload_id, digest)
            return self._created(name, digest)
        return web.Response(status=202, headers=self._upload_headers(name, status.upload_id, 0))

    def _created(self, name: str, digest: p.Digest) -> web.Response:
        return web.Response(
            status=201,
            headers={
                "Location": f"/v2/{name}/blobs/{digest}",
                "Docker-Content-Digest": str(digest),
            },
        )

    async def upload_status(
        self, request: web.Request, params: dict[str, str]
    ) -> web.StreamResponse:
        p.validate_upload_id(params["upload"])
        status = self.registry.upload_status(params["name"], params["upload"])
        return web.Response(
            status=204, headers=self._upload_headers(status.name, status.upload_id, status.size)
        )

    async def upload_patch(
        self, request: web.Request, params: dict[str, str]
    ) -> web.StreamResponse:
        name, upload_id = params["name"], p.validate_upload_id(params["upload"])
        start, end = _content_range(request.headers.get("Content-Range"))
        received, size = await self._stream_into(request, name, upload_id, start)
        ensure_upload_offsets(start, end, received)
        return web.Response(status=202, headers=self._upload_headers(name, upload_id, size))

    async def upload_put(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        name, upload_id = params["name"], p.validate_upload_id(params["upload"])
        digest = _digest_param(request.query.get("digest"))
        if request.can_read_body:
            start, end = _content_range(request.headers.get("Content-Range"))
            received, _ = await self._stream_into(request, name, upload_id, start)
            ensure_upload_offsets(start, end, received)
        await asyncio.to_thread(self.registry.finish_upload, name, upload_id, digest)
        return self._created(name, digest)

    async def upload_cancel(
        self, request: web.Request, params: dict[str, str]
    ) -> web.StreamResponse:
        upload_id = p.validate_upload_id(params["upload"])
        self.registry.cancel_upload(params["name"], upload_id)
        return web.Response(status=204)

    async def manifest_get(
        self, request: web.Request, params: dict[str, str]
    ) -> web.StreamResponse:
        digest, raw, media = await asyncio.to_thread(
            self.registry.get_manifest, params["name"], params["reference"]
        )
        headers = {
            "Docker-Content-Digest": str(digest),
            "ETag": f'"{digest}"',
            "Content-Type": media,
        }
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(raw))
            return web.Response(status=200, headers=headers)
        return web.Response(status=200, body=raw, headers=headers)

    async def manifest_put(
        self, request: web.Request, params: dict[str, str]
    ) -> web.StreamResponse:
        name, reference = params["name"], params["reference"]
        declared = request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > MANIFEST_MAX:
            raise TooLarge({"size": int(declared), "limit": MANIFEST_MAX})
        raw = await request.content.read(MANIFEST_MAX + 1)
        if len(raw) > MANIFEST_MAX:
            raise TooLarge({"limit": MANIFEST_MAX})
        digest, manifest = await asyncio.to_thread(
            self.registry.put_manifest, name, reference, raw, request.content_type
        )
        headers = {
            "Location": f"/v2/{name}/manifests/{digest}",
            "Docker-Content-Digest": str(digest),
        }
        if manifest.subject is not None:
            headers["OCI-Subject"] = str(manifest.subject)
        return web.Response(status=201, headers=headers)

    async def manifest_delete(
        self, request: web.Request, params: dict[str, str]
    ) -> web.StreamResponse:
        if not self.config.delete_enabled:
            raise Unsupported(message="deletion is disabled (storage.delete.enabled)")
        await asyncio.to_thread(self.registry.delete_manifest, params["name"], params["reference"])
        return web.Response(status=202)

    async def referrers(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        subject = p.parse_digest(params["digest"])
        descriptors = await asyncio.to_thread(self.registry.referrers, params["name"], subject)
        headers: dict[str, str] = {}
        artifact = request.query.get("artifactType")
        if artifact:
            descriptors = [d for d in descriptors if d.get("artifactType") == artifact]
            headers["OCI-Filters-Applied"] = "artifactType"
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        return web.Response(text=json.dumps(body), content_type=OCI_INDEX, headers=headers)

    # ---- background --------------------------------------------------------------------
    async def _purge_loop(self) -> None:
        while True:
            await asyncio.to_thread(self.purge_uploads)
            await asyncio.sleep(self.config.purge_interval)

    async def _forget_loop(self) -> None:
        """Drop digest states of uploads another worker finished, cancelled or purged."""
        while True:
            await asyncio.sleep(FORGET_INTERVAL)
            await asyncio.to_thread(self.registry.forget_gone_uploads)

    def purge_uploads(self) -> list[tuple[str, str]]:
        """Remove uploads older than storage.maintenance.uploadpurging.age (dry run: list)."""
        cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=self.config.purge_age)
        purged = []
        for name, upload_id, started in list(self.registry.uploads()):
            if started.tzinfo is None:
                started = started.replace(tzinfo=dt.timezone.utc)
            if started < cutoff:
                purged.append((name, upload_id))
                if self.config.purge_dryrun:
                    log.info("upload purge (dry run) would remove %s/%s", name, upload_id)
                    continue
                try:
                    self.registry.cancel_upload(name, upload_id)
                except RegistryError:
                    continue
                log.info("upload purge removed %s/%s", name, upload_id)
        return purged

    async def _health_loop(self) -> None:
        while True:
            try:
                # The root exists from start-up on; listing it proves the driver can read.
                await asyncio.to_thread(self.registry.driver.list, "")
                self.health_failures, self.health_error = 0, None
            except (OSError, DriverError) as exc:
                self.health_failures += 1
                self.health_error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(self.config.health_interval)


def load_htpasswd(path: str) -> dict[str, bytes]:
    """user → bcrypt hash; any other hash scheme is refused (bcrypt entries only)."""
    entries: dict[str, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            if not sep or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
                raise ValueError(
                    f"{path}:{number}: entry for {user!r} is not bcrypt "
                    "(create it with htpasswd -B)"
                )
            entries[user] = hashed.encode()
    return entries


def _bcrypt_ok(password: str, stored: bytes) -> bool:
    import bcrypt

    if stored.startswith(b"$2y$"):
        stored = b"$2b$" + stored[4:]
    try:
        return bool(bcrypt.checkpw(password.encode(), stored))
    except ValueError:
        return False
