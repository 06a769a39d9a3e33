"""The registry's HTTP layer on aiohttp: one handler per route of the OCI Distribution Spec v1.1
(plus what the docker CLI needs), auth, read-only mode, headers, health and the background
upload purger. Handlers never build storage paths: they call the stores with validated values."""

from __future__ import annotations

import asyncio
import datetime as dt
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
from aiohttp.web_request import BaseRequest

from dockyard.fsutil import TempSweep, sweep_temp_files
from dockyard.registry import paths as p
from dockyard.registry.auth import BasicAuth, load_htpasswd
from dockyard.registry.config import RegistryConfig
from dockyard.registry.driver import FilesystemDriver
from dockyard.registry.errors import (
    BlobUploadInvalid,
    DriverError,
    InvalidPath,
    ManifestInvalid,
    NameInvalid,
    NotFound,
    PaginationInvalid,
    RangeInvalid,
    RangeNotSatisfiable,
    RegistryError,
    SizeInvalid,
    TooLarge,
    TooManyRequests,
    Unauthorized,
    Unsupported,
    error_for_status,
    status_for,
)
from dockyard.registry.listener import BODY_PROGRESS, BodyProgress
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
# Seconds a request body may go without a byte arriving: the request is then refused (400, the
# route's spec code; a chunk is taken back) and its connection closed (nginx's
# client_body_timeout is 60 s; aiohttp has no read timeout of its own).
BODY_STALL_SECONDS = 30.0
# Key of a request whose body the registry stopped reading: its answer closes the connection.
BODY_REFUSED = "dockyard.body_refused"
# Milliseconds a download may go without the client reading a byte before it is dropped.
SEND_STALL_MS = 120_000
# Bytes per read/write step of a download under TLS (_send_steps; plain HTTP uses sendfile(2)):
# a stalled TLS client holds two (one in its connection's buffer, one read ahead) in memory
# until SEND_STALL_MS drops it.
SEND_BUFFER = 1024 * 1024
# Threads that read blob files for TLS downloads. A read never waits for a client (the socket
# side is the event loop's, non-blocking), so slow clients cannot hold these threads.
BLOB_READ_THREADS = 8
# Catalog page size when the client gives no n, and the most it may ask for.
CATALOG_DEFAULT, CATALOG_MAX = 100, 1000
# Temp files (.tmp-*) last written longer ago than this are a killed writer's leftovers: a live
# one is renamed once its fsyncs are done (seconds; minutes on a struggling NFS server), and an
# hour also covers clock skew between registries sharing the root. Younger ones are never touched.
TEMP_STALE_SECONDS = 3600.0
# Seconds between sweeps of stale temp files; the first runs at start-up, in every process.
TEMP_SWEEP_INTERVAL = 24 * 3600.0
# Name of the (non-failing) /debug/health entry that reports stale temp files not removed.
TEMP_HEALTH_CHECK = "storagedriver_filesystem_tempfiles"

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
    if isinstance(error, RangeNotSatisfiable) and error.detail and "size" in error.detail:
        headers["Content-Range"] = f"bytes */{error.detail['size']}"  # RFC 9110, 15.5.17
    if isinstance(error, TooManyRequests) and error.detail and "retry_after" in error.detail:
        headers["Retry-After"] = str(error.detail["retry_after"])
    return _json(error.body(), status=status, headers=headers)


class _Connection(web.RequestHandler):
    """aiohttp's handler of one client connection, answering the errors aiohttp makes without
    any handler or middleware seeing the request (a request line or header its HTTP parser
    refuses, an exception no handler caught) with the registry's JSON error, as all others."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: Optional[BaseException] = None,
        message: Optional[str] = None,
    ) -> web.StreamResponse:
        # aiohttp's own logs the error, and raises ConnectionError once an answer has started
        super().handle_error(request, status, exc, message)
        response = _error_response(error_for_status(status, message if status < 500 else None))
        response.headers[API_VERSION[0]] = API_VERSION[1]
        response.force_close()
        return response

    def refuse_body(self) -> None:
        """The rest of the current request's body will not be read: once the answer is out the
        connection closes, without aiohttp's lingering read of what is left (lingering_time)."""
        self._lingering_time = 0.0


class _Server(web.Server):
    """aiohttp's protocol factory, making `_Connection`s."""

    def __call__(self) -> web.RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """web.AppRunner whose connections answer aiohttp's own errors as the registry's (see
    _Connection) and never decompress a request body (`Content-Encoding: gzip` included: a
    registry stores and hashes the bytes it is sent, as distribution does). aiohttp has no
    setting for the connection class (handler_args are only its keyword arguments, and
    request_factory and middlewares never see what the parser refused), so the server the
    runner made is turned into a _Server: the same object, one more method."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, auto_decompress=False, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        return server


class ClientStalled(ConnectionError):
    """A download's client read nothing for SEND_STALL_MS."""

    def __init__(self) -> None:
        super().__init__(f"the client read nothing for {SEND_STALL_MS // 1000} s")


async def _write_or_stall(
    transport: asyncio.Transport, response: web.StreamResponse, chunk: bytes
) -> None:
    """Write one step of a download, waiting (on the event loop, holding no thread) until the
    connection's buffer has room again. ClientStalled once the client has read nothing for
    SEND_STALL_MS: the buffer is looked at every SEND_STALL_MS, and only one found exactly as
    full as at the look before is a stall (it shrinks when the client reads; nothing is added
    to it meanwhile)."""
    write = asyncio.ensure_future(response.write(chunk))
    await asyncio.sleep(0)  # the write's first step runs: the buffer now holds the chunk
    pending = transport.get_write_buffer_size()
    try:
        while True:
            done, _ = await asyncio.wait((write,), timeout=SEND_STALL_MS / 1000)
            if done:
                write.result()
                return
            now = transport.get_write_buffer_size()
            if now == pending:
                raise ClientStalled()
            pending = now
    finally:
        if not write.done():
            write.cancel()


async def _writable(fd: int) -> None:
    """Wait until the socket `fd` takes bytes again; ClientStalled after SEND_STALL_MS."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():  # the selector may fire again before the waiting task runs
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await asyncio.wait_for(ready, SEND_STALL_MS / 1000)
    except asyncio.TimeoutError:
        raise ClientStalled() from None
    finally:
        loop.remove_writer(fd)


async def _sendfile(sock_fd: int, file_fd: int, offset: int, count: int) -> None:
    """Copy `count` bytes of a file from `offset` to a plain TCP socket on the event loop: the
    kernel moves them (sendfile(2), no copy through Python), as many as the socket buffer takes
    at a time, and the loop waits for writability in between, so no thread waits for a client.
    A duplicate of the descriptor is used (the transport owns the original; a transport's fd
    cannot be watched for writing apart from it), and the loop keeps reading the connection."""
    fd = os.dup(sock_fd)
    try:
        while count > 0:
            try:
                sent = os.sendfile(fd, file_fd, offset, count)
            except BlockingIOError:
                await _writable(fd)
                continue
            if sent == 0:
                raise ConnectionError("blob file ended early")  # truncated under us
            offset += sent
            count -= sent
    finally:
        os.close(fd)


def _drop(transport: asyncio.Transport) -> None:
    """Close a stalled download's connection now, with a reset: a plain close would keep the
    socket (and the unread bytes in its buffer) until the client read them, which it won't."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class BodyStalled(Exception):
    """No byte of a request body came for BODY_STALL_SECONDS."""

    def __init__(self) -> None:
        super().__init__(f"no body bytes for {BODY_STALL_SECONDS:.0f} s")


async def _next_piece(request: web.Request) -> bytes:
    """The next bytes of the request body (b"" at its end), waiting at most BODY_STALL_SECONDS
    for them: BodyStalled then, and the answer will close the connection (aiohttp would
    otherwise keep reading the rest for a while). ConnectionResetError when the connection is
    gone (closed to free descriptors before the handler began: aiohttp's RuntimeError). What
    comes is told to the request's BodyProgress, which the shedder reads."""
    progress: Optional[BodyProgress] = request.get(BODY_PROGRESS)
    if progress is not None:
        progress.reading(asyncio.get_running_loop().time())
    try:
        # wait_for, not asyncio.timeout: hosts run Python 3.9 (bullseye), where the latter and
        # TimeoutError as asyncio's timeout do not exist
        chunk = await asyncio.wait_for(request.content.readany(), BODY_STALL_SECONDS)
    except asyncio.TimeoutError as exc:
        request[BODY_REFUSED] = True
        protocol = request.protocol
        if isinstance(protocol, _Connection):
            protocol.refuse_body()
        raise BodyStalled() from exc
    except RuntimeError as exc:
        if request.protocol.transport is not None:
            raise  # not aiohttp's "Connection closed.": a bug, let it show
        raise ConnectionResetError("the connection was closed") from exc
    finally:
        if progress is not None:
            progress.waiting = False
    if progress is not None:
        progress.read(len(chunk))
    return chunk


def _body_failure(exc: Exception) -> str:
    """What became of a body that was not read to its end, for the error's detail."""
    return str(exc)[:200] or type(exc).__name__


async def _read_body(request: web.Request, limit: int, invalid: type[RegistryError]) -> bytes:
    """The whole request body, however many reads it arrives in (a slow client, TLS records),
    up to `limit` bytes: TooLarge beyond, `invalid` when the client breaks it off, its chunked
    encoding is broken, or no byte comes for BODY_STALL_SECONDS."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise TooLarge({"size": declared, "limit": limit})
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := await _next_piece(request):
            size += len(chunk)
            if size > limit:
                raise TooLarge({"limit": limit})
            chunks.append(chunk)
    except (ConnectionResetError, BodyStalled, web.RequestPayloadError) as exc:
        log.info(
            "%s %s: request body not read whole: %s",
            request.remote,
            request.path[:200],
            _body_failure(exc),
        )
        raise invalid({"reason": _body_failure(exc)}, message="request body was cut short") from exc
    return b"".join(chunks)


async def _body_piece(request: web.Request) -> bytes:
    """The next piece of an upload's body, b"" at its end; BlobUploadInvalid when the client
    breaks it off, its chunked encoding is broken, or no byte comes for BODY_STALL_SECONDS."""
    try:
        return await _next_piece(request)
    except (
        ConnectionResetError,
        BodyStalled,
        asyncio.IncompleteReadError,
        web.RequestPayloadError,
    ) as exc:
        log.info(
            "%s %s: upload body not read whole: %s",
            request.remote,
            request.path[:200],
            _body_failure(exc),
        )
        raise BlobUploadInvalid(
            {"reason": _body_failure(exc)}, message="upload body was cut short"
        ) from exc


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
    if n == 0:
        return [], None  # a Link to the same empty page would send a client round forever
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
        # basic auth (htpasswd, bcrypt), when configured
        self.auth: Optional[BasicAuth] = None
        self.health_failures = 0
        self.health_error: Optional[str] = None
        # what the last sweep of stale temp files left (read-only mode, or removal failed)
        self.temp_sweep = TempSweep()
        # Blob reads for downloads get their own threads, apart from the ones uploads and
        # manifest writes run on; they only ever wait for the disk, never for a client.
        self.blob_reads = ThreadPoolExecutor(BLOB_READ_THREADS, thread_name_prefix="blob-read")
        if config.htpasswd_path and config.htpasswd_realm:
            self.auth = BasicAuth(config.htpasswd_realm, load_htpasswd(config.htpasswd_path))
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
        tasks.append(asyncio.create_task(self._temp_sweep_loop()))
        yield
        for task in tasks:
            task.cancel()
        self.blob_reads.shutdown(wait=False, cancel_futures=True)
        if self.auth is not None:
            self.auth.close()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        started = time.monotonic()
        try:
            if request.path.startswith("/v2"):
                if self.auth is not None:
                    await self.auth.check(request.headers.get("Authorization"), request.remote)
                if self.config.readonly and request.method in ("POST", "PUT", "PATCH", "DELETE"):
                    raise Unsupported(message="the registry is in read-only mode")
            response = await handler(request)
        except RegistryError as error:
            response = _error_response(error)
        except InvalidPath:
            response = _error_response(NameInvalid())
        except web.HTTPException as exc:  # aiohttp's router (no route), request.read() (413)
            if exc.status < 400:
                raise  # the redirect of /v2
            response = _error_response(error_for_status(exc.status, exc.text))
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
        return _json(body, status=status, headers={API_VERSION[0]: API_VERSION[1]})

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
        """Copy a blob's bytes to the client, on the event loop, holding no thread while the
        client reads. Plain HTTP: sendfile(2) driven by writability (_sendfile). TLS: each
        SEND_BUFFER step is read by a blob-read thread (the next one while this one is sent),
        then written to the connection, whose buffer must drain before the next step
        (_write_or_stall). A client that stops reading holds its socket buffer, at most two
        steps of memory under TLS, and its descriptors, until SEND_STALL_MS drops it; other
        downloads go on meanwhile."""
        transport = request.transport
        if transport is None:
            raise ConnectionError("the client went away")
        with self.registry.open_blob(digest) as f:
            sock = transport.get_extra_info("socket")
            try:
                if (
                    sock is not None
                    and transport.get_extra_info("sslcontext") is None
                    and transport.get_write_buffer_size() == 0  # the headers are on the wire
                ):
                    await _sendfile(sock.fileno(), f.fileno(), start, length)
                else:
                    await self._send_steps(transport, response, f.fileno(), start, length)
            except ClientStalled:
                _drop(transport)
                raise

    async def _send_steps(
        self,
        transport: asyncio.Transport,
        response: web.StreamResponse,
        fd: int,
        start: int,
        length: int,
    ) -> None:
        """Send `length` bytes of the file `fd` from `start` in SEND_BUFFER steps (TLS)."""
        loop = asyncio.get_running_loop()
        end = start + length

        def read(offset: int) -> asyncio.Future[bytes]:
            size = min(SEND_BUFFER, end - offset)
            return loop.run_in_executor(self.blob_reads, os.pread, fd, size, offset)

        offset = start
        reading = read(offset)
        try:
            while True:
                chunk = await reading
                if not chunk:
                    raise ConnectionError("blob file ended early")  # truncated under us
                offset += len(chunk)
                if offset < end:
                    reading = read(offset)  # the next step is read while this one is sent
                await _write_or_stall(transport, response, chunk)
                if offset >= end:
                    return
        finally:
            reading.cancel()

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
        self,
        request: web.Request,
        name: str,
        upload_id: str,
        start: Optional[int] = None,
        end: Optional[int] = None,
    ) -> int:
        """Append the request body to an upload as one chunk; the upload's size after. A chunk
        is whole or not at all: one whose length differs from its Content-Range (`start`-`end`)
        or Content-Length, or whose body is cut short, is refused and leaves the upload as it
        was (Registry.append_upload); a mismatch of the two headers is refused before the body
        is read. The upload is locked from the body's first byte on, not while the headers
        wait for it: a body that comes once the upload has finished is refused as unknown."""
        loop = asyncio.get_running_loop()
        declared = request.content_length
        if declared is not None:
            ensure_upload_offsets(start, end, declared)
        status = self.registry.expect_offset(name, upload_id, start)
        chunk = await _body_piece(request)
        if not chunk:
            ensure_upload_offsets(start, end, 0)
            self._check_length(request, 0)
            return status.size
        with self.registry.append_upload(name, upload_id, start) as appender:
            before = appender.size
            if declared is not None and declared <= INLINE_BODY_MAX:
                # A small body: each piece hashed and written as it arrives, overlapping the
                # client's sending, with no thread hop.
                while chunk:
                    appender.write(chunk)
                    chunk = await _body_piece(request)
            else:
                # Pipeline: a worker thread hashes and writes one batch (hashlib and file
                # writes release the GIL) while the event loop receives the next one.
                writing: Optional[asyncio.Future[None]] = None
                batch: list[bytes] = []
                batched = 0
                try:
                    while True:
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
                        chunk = await _body_piece(request)
                finally:
                    if writing is not None:
                        await writing
            # Checked inside the block: a refusal here takes the chunk back.
            received = appender.size - before
            ensure_upload_offsets(start, end, received)
            self._check_length(request, received)
            return appender.size

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
            await self._stream_into(request, name, status.upload_id)
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
        size = await self._stream_into(request, name, upload_id, start, end)
        return web.Response(status=202, headers=self._upload_headers(name, upload_id, size))

    async def upload_put(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        name, upload_id = params["name"], p.validate_upload_id(params["upload"])
        digest = _digest_param(request.query.get("digest"))
        if request.can_read_body:
            start, end = _content_range(request.headers.get("Content-Range"))
            await self._stream_into(request, name, upload_id, start, end)
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
        raw = await _read_body(request, MANIFEST_MAX, ManifestInvalid)
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

    async def _temp_sweep_loop(self) -> None:
        """Remove stale temp files at start-up and every TEMP_SWEEP_INTERVAL. Every process
        sweeps (each removal is safe by age alone), so each one's /debug/health is right."""
        while True:
            await asyncio.to_thread(self.sweep_temp_files)
            await asyncio.sleep(TEMP_SWEEP_INTERVAL)

    def sweep_temp_files(self) -> TempSweep:
        """Remove temp files older than TEMP_STALE_SECONDS below the root (read-only mode: only
        find them); what is left is reported by /debug/health."""
        sweep = sweep_temp_files(
            self.config.rootdirectory, TEMP_STALE_SECONDS, remove=not self.config.readonly
        )
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
        while True:
            try:
                # The root exists from start-up on; listing it proves the driver can read.
                await asyncio.to_thread(self.registry.driver.list, "")
                self.health_failures, self.health_error = 0, None
            except (OSError, DriverError) as exc:
                self.health_failures += 1
                self.health_error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(self.config.health_interval)
