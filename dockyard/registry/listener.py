"""How the registry takes connections so that no crowd of clients can lock the others out: the
open-file limit raised at start-up, an accept loop of its own that keeps descriptors in reserve
(closing the oldest idle connections, then requests whose body crawls, when the table fills up;
refusing a client rather than stalling when nothing can be closed), TLS clients that offer only
TLS 1.0/1.1 answered with a protocol_version alert (asyncio drops the alerts OpenSSL makes,
CPython gh-98078), bounded TLS handshakes, and malformed requests logged as one warning line
instead of a traceback."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Optional

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("dockyard.registry")

# Soft open-file limit asked for when the hard limit is unlimited (Linux's default nr_open).
NOFILE_CEILING = 1 << 20
# Descriptors kept free for the registry's own files (blobs being sent, uploads being written,
# logs) when the table fills with connections: 1/FD_HEADROOM_SHARE of the limit, at least
# FD_HEADROOM_MIN. A connection accepted into that headroom makes the oldest idle ones close.
FD_HEADROOM_SHARE = 8
FD_HEADROOM_MIN = 32
# Connections closed at once when the headroom is reached (the oldest idle ones first).
SHED_BATCH = 16
# A request whose handler waits for body bytes may be closed (after every idle connection) when
# descriptors run short, once its body has come for SLOW_BODY_GRACE seconds at less than
# SLOW_BODY_RATE bytes a second on average: a client trickling a byte every few seconds holds a
# descriptor as surely as an idle one (each body read has its own, longer, stall timeout).
SLOW_BODY_GRACE = 5.0
SLOW_BODY_RATE = 1024
# Key of a request's BodyProgress (set by Connections.middleware, advanced by the body readers).
BODY_PROGRESS = "dockyard.body_progress"
# Seconds a TLS client may spend before its handshake is done without being closed first when
# descriptors run short (a client that has said nothing for this long is the likeliest idler).
SHED_HANDSHAKE_AGE = 1.0
# Connections taken from the listen queue per wake-up of the accept loop (the loop serves the
# accepted ones in between).
ACCEPT_BATCH = 64
# Seconds the accept loop rests when out of descriptors with nothing idle to close.
ACCEPT_RETRY_SECONDS = 0.1
# Seconds a TLS client has to send its ClientHello, and then to finish the handshake.
TLS_HANDSHAKE_SECONDS = 20.0
# Seconds between peeks at a ClientHello that came in part, doubling up to the max.
HELLO_PEEK_PAUSE, HELLO_PEEK_PAUSE_MAX = 0.01, 0.5
# accept(2) errors that mean "out of descriptors or memory", not a broken listening socket.
_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# Bytes of a TLS record that name the ClientHello's version: record header (type, version,
# length: 5), handshake header (type, length: 4), client_version (2).
_HELLO_HEAD = 11
_TLS_HANDSHAKE, _CLIENT_HELLO, _TLS_ALERT = 0x16, 0x01, 0x15
# The oldest version served (TLS 1.2's wire version); TLS 1.3 clients offer this one too.
_TLS1_2 = 0x0303
# A fatal (2) protocol_version (70) alert, after the record header.
_PROTOCOL_VERSION_ALERT = bytes([0x00, 0x02, 0x02, 0x46])


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit (each connection holds one, a
    download or an upload one or two more; systemd's default soft limit is 1024). Returns the
    soft limit (before, after); a limit that cannot be raised is kept and logged."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning(
                "open files: could not raise the soft limit %d to %d: %s", soft, target, exc
            )
            return soft, soft
        log.warning("open files: soft limit raised from %d to %d (the hard limit)", soft, target)
        return soft, target
    log.warning("open files: limit %d (soft = hard)", soft)
    return soft, soft


class MalformedRequestLog(logging.Filter):
    """Turns aiohttp's "Error handling request" record for a request its parser refused (two
    Content-Length headers, Content-Length with Transfer-Encoding, a bad request line...) into
    one warning line: the client gets its 400 either way, and a traceback per bad request only
    floods the log. Installed on the `aiohttp.server` logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        reason = (exc.message or type(exc).__name__).strip().splitlines()[0].rstrip(":")
        record.msg = "refused a malformed request from %s: %s"
        record.args = (remote, reason[:200])
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return logging.getLogger(record.name).isEnabledFor(logging.WARNING)


class Connections:
    """The server's connections as the accept loop needs to see them: which are between
    requests (aiohttp waits for the next request head and every byte of the last response has
    left), and how the body of each request in a handler is arriving (its middleware and the
    body readers keep that), so that the oldest idle ones, then requests whose body crawls,
    can be closed to free descriptors."""

    def __init__(self) -> None:
        self.busy: dict[Any, BodyProgress] = {}
        self.server: Optional[web.Server] = None

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]
    ) -> web.StreamResponse:
        protocol = request.protocol
        progress = self.busy[protocol] = BodyProgress()
        request[BODY_PROGRESS] = progress
        try:
            response: web.StreamResponse = await handler(request)
            return response
        finally:
            progress.waiting = False
            if self.busy.get(protocol) is progress:
                del self.busy[protocol]

    @staticmethod
    def _idle(connection: RequestHandler) -> bool:
        """aiohttp waits for the next request head (none is queued, no handler runs, no answer
        is being written) and the last response has left the connection's buffer."""
        transport = connection.transport
        return (
            connection._waiter is not None
            and not connection._messages
            and transport is not None
            and transport.get_write_buffer_size() == 0
        )

    def close_idle(self, count: int, now: float) -> int:
        """Abort up to `count` connections: those between requests, the oldest first, then
        requests whose body crawls (BodyProgress.crawling), the oldest first (an abort frees
        the descriptor at once; close() would first wait for a TLS goodbye). A body cut off so
        is refused by its handler and leaves an upload as it was."""
        connections = [
            c
            for c in (self.server.connections if self.server is not None else [])
            if isinstance(c, RequestHandler)
            and c.transport is not None
            and not c.transport.is_closing()
        ]
        idle = [c for c in connections if self._idle(c)]
        crawling = [
            c
            for c in connections
            if c in self.busy and self.busy[c].crawling(now) and not self._idle(c)
        ]
        closed = 0
        for connection in (idle + crawling)[:count]:
            assert connection.transport is not None
            connection.transport.abort()
            closed += 1
        return closed


def _resolve(future: asyncio.Future[None]) -> None:
    """A reader or writer callback: the selector may fire again before the waiter runs."""
    if not future.done():
        future.set_result(None)


@dataclass
class BodyProgress:
    """How one request's body is arriving, as the body readers see it, for the shedder."""

    # loop time of the first body read (None: the handler has not read its body yet)
    began: Optional[float] = None
    # body bytes received so far
    received: int = 0
    # whether the handler is waiting for body bytes now
    waiting: bool = False

    def reading(self, now: float) -> None:
        """The handler starts waiting for the next body bytes."""
        if self.began is None:
            self.began = now
        self.waiting = True

    def read(self, size: int) -> None:
        self.waiting = False
        self.received += size

    def crawling(self, now: float) -> bool:
        """Waiting for body bytes that have averaged under SLOW_BODY_RATE for SLOW_BODY_GRACE."""
        if not self.waiting or self.began is None or now - self.began < SLOW_BODY_GRACE:
            return False
        return self.received < SLOW_BODY_RATE * (now - self.began)


def _may_be_hello(head: bytes) -> bool:
    """Whether the first bytes of a connection may still grow into a TLS ClientHello."""
    return head[0] == _TLS_HANDSHAKE and (len(head) < 6 or head[5] == _CLIENT_HELLO)


def _hello_version(head: bytes) -> Optional[int]:
    """The client_version of a TLS ClientHello's first bytes, None when they are not one."""
    if len(head) < _HELLO_HEAD or head[0] != _TLS_HANDSHAKE or head[5] != _CLIENT_HELLO:
        return None
    return int.from_bytes(head[9:11], "big")


class Acceptor(asyncio.AbstractServer):
    """Accepts on the listening socket for one event loop and hands each connection to
    aiohttp (loop.connect_accepted_socket). Before that it keeps the descriptor table from
    filling: a connection that lands in the headroom closes the oldest idle ones, and when
    accept(2) fails for want of descriptors, idle connections are closed, or (none being idle)
    the reserve descriptor lets one client be taken and closed, so the listen queue moves and
    the loop never spins. TLS clients first show their ClientHello (peeked, not read): one
    that offers no version the registry serves gets a protocol_version alert."""

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.BaseProtocol],
        ssl_context: Optional[ssl.SSLContext],
        connections: Connections,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._factory = factory
        self._ssl = ssl_context
        self._connections = connections
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = NOFILE_CEILING if limit == resource.RLIM_INFINITY else limit
        self._crowded = limit - max(FD_HEADROOM_MIN, limit // FD_HEADROOM_SHARE)
        self._reserve: Optional[int] = None
        # connections not yet handed to aiohttp (TLS: before the handshake ends), oldest
        # first, with the loop time each was accepted at
        self._starting: dict[asyncio.Task[None], tuple[socket.socket, float]] = {}
        self._serving = False
        self._closed = asyncio.Event()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if self._serving:
            return
        self._sock.setblocking(False)
        self._reserve = self._open_reserve()
        self._serving = True
        self._loop.add_reader(self._sock.fileno(), self._accept)

    async def serve_forever(self) -> None:
        await self.start_serving()
        await self._closed.wait()

    def close(self) -> None:
        if self._serving:
            self._loop.remove_reader(self._sock.fileno())
        self._serving = False
        for task in list(self._starting):
            task.cancel()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()
        if self._starting:
            await asyncio.gather(*self._starting, return_exceptions=True)

    @staticmethod
    def _open_reserve() -> Optional[int]:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self._out_of_descriptors(exc)
                    return
                # the client gave up while queued (ECONNABORTED, EPROTO...): take the next
                log.debug("accept failed: %s", exc)
                continue
            self._start(conn)
            if conn.fileno() >= self._crowded:
                # In the headroom: close the oldest idle connections, and take no one more
                # until the loop's next turn has freed their descriptors.
                self._shed(SHED_BATCH)
                self._pause(0.0)
                return

    def _shed(self, count: int) -> int:
        """Close up to `count` connections: TLS handshakes under way for SHED_HANDSHAKE_AGE
        or more first, then the oldest idle HTTP connections, then requests whose body crawls
        (Connections.close_idle). Returns how many were closed."""
        closed = 0
        old = self._loop.time() - SHED_HANDSHAKE_AGE
        for task, (_conn, accepted) in list(self._starting.items()):
            if closed >= count or accepted > old:
                break
            task.cancel()
            closed += 1
        closed += self._connections.close_idle(count - closed, self._loop.time())
        if closed:
            log.warning("descriptor table nearly full: closed %d idle connections", closed)
        return closed

    def _out_of_descriptors(self, exc: OSError) -> None:
        """accept(2) found no descriptor: close idle connections (their descriptors are free
        on the loop's next turn, and the accept loop resumes right after); with none to
        close, take one client with the reserve descriptor and close it, then rest a moment."""
        if self._shed(SHED_BATCH):
            self._pause(0.0)
            return
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
            try:
                conn, _address = self._sock.accept()
                conn.close()
            except OSError:
                pass
        log.warning("out of descriptors (%s), nothing idle to close: refused a client", exc)
        self._pause(ACCEPT_RETRY_SECONDS)

    def _pause(self, seconds: float) -> None:
        """Take no clients for `seconds` (0: until the loop's callbacks queued now have run)."""
        self._loop.remove_reader(self._sock.fileno())
        self._loop.call_later(seconds, self._resume)

    def _resume(self) -> None:
        if not self._serving:
            return
        if self._reserve is None:
            self._reserve = self._open_reserve()
        self._loop.add_reader(self._sock.fileno(), self._accept)

    def _start(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        task = self._loop.create_task(self._connect(conn))
        self._starting[task] = (conn, self._loop.time())
        task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[None]) -> None:
        conn, _accepted = self._starting.pop(task)
        if task.cancelled():
            conn.close()  # shed or shut down before aiohttp took it

    async def _connect(self, conn: socket.socket) -> None:
        try:
            if self._ssl is not None and not await self._screen(conn):
                conn.close()
                return
            await self._loop.connect_accepted_socket(
                self._factory,
                conn,
                ssl=self._ssl,
                ssl_handshake_timeout=TLS_HANDSHAKE_SECONDS if self._ssl else None,
            )
        except (OSError, asyncio.TimeoutError) as exc:  # ssl.SSLError is an OSError
            # TLS handshake refused or timed out, or the client left: nothing to answer.
            log.debug("connection closed before HTTP: %s", exc)
            conn.close()

    async def _screen(self, conn: socket.socket) -> bool:
        """Peek at a TLS client's ClientHello: False (after a protocol_version alert) when it
        offers nothing newer than TLS 1.1. OpenSSL makes that alert too, but asyncio closes
        the connection without sending it. Anything not understood here goes on to OpenSSL.
        A hello may come in pieces (a few bytes, then the rest): peeking goes on until its
        version is there, the bytes are not a ClientHello, or TLS_HANDSHAKE_SECONDS pass."""
        deadline = self._loop.time() + TLS_HANDSHAKE_SECONDS
        await self._readable(conn, TLS_HANDSHAKE_SECONDS)
        pause = HELLO_PEEK_PAUSE
        while True:
            head = conn.recv(_HELLO_HEAD, socket.MSG_PEEK)
            if not head:
                return False  # the client left
            if len(head) >= _HELLO_HEAD or not _may_be_hello(head):
                break
            # Part of a hello: peeked bytes keep the socket readable, so wait by the clock.
            left = deadline - self._loop.time()
            if left <= 0:
                raise asyncio.TimeoutError()
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, HELLO_PEEK_PAUSE_MAX)
        version = _hello_version(head)
        if version is None or version >= _TLS1_2:
            return True
        record = bytes([_TLS_ALERT]) + max(version, 0x0300).to_bytes(2, "big")
        try:
            conn.send(record + _PROTOCOL_VERSION_ALERT)
        except OSError:
            pass
        log.info("refused a TLS client offering version 0x%04x at most", version)
        return False

    async def _readable(self, conn: socket.socket, seconds: float) -> None:
        """Wait until `conn` has bytes to read (or is closed); TimeoutError after `seconds`."""
        ready = self._loop.create_future()
        self._loop.add_reader(conn.fileno(), _resolve, ready)
        try:
            await asyncio.wait_for(ready, seconds)
        finally:
            self._loop.remove_reader(conn.fileno())


class Site(web.BaseSite):
    """web.SockSite's job (serve a runner's app on a socket that already listens) with the
    registry's Acceptor in place of asyncio's server."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        connections: Connections,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._sock = sock
        self._connections = connections

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"{'https' if self._ssl_context else 'http'}://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._connections.server = server
        acceptor = Acceptor(self._sock, server, self._ssl_context, self._connections)
        await acceptor.start_serving()
        self._server = acceptor
