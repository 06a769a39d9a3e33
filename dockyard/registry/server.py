"""Run the registry: TLS context (1.2 minimum, optional client certificates), logging, and the
aiohttp server on `http.addr`, in one process or several (prefork) sharing one socket. Readiness
is told to the service manager (`READY=1` on `$NOTIFY_SOCKET`, systemd's `Type=notify`) only
once this registry holds the port: never while a predecessor's process still listens on it."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator
from typing import Callable, Optional

from aiohttp import web

from dockyard.registry.app import RegistryApp
from dockyard.registry.config import RegistryConfig
from dockyard.registry.connection import Runner
from dockyard.registry.listener import Connections, MalformedRequestLog, Site, raise_fd_limit
from dockyard.registry.metrics import SharedMetrics, share_metrics, unshare_metrics, worker_exited

log = logging.getLogger("dockyard.registry")

# Default serving processes: one per CPU up to this many; --workers may go up to MAX_WORKERS.
MAX_DEFAULT_WORKERS = 4
MAX_WORKERS = 64
LISTEN_BACKLOG = 1024
# Seconds a connection has to send each complete request head: from when it is accepted (after
# the TLS handshake) and from the end of each response. A connection that sends nothing, or a
# head byte by byte, and an idle keep-alive connection are closed when it runs out (aiohttp's
# keepalive_timeout; aiohttp 3.14.5, the one installed, starts it at accept, not only after a
# first response as older releases did).
REQUEST_HEAD_SECONDS = 20.0
# TLS 1.2 cipher suites offered: ECDHE key exchange with an AEAD cipher only (no CBC, no static
# RSA). TLS 1.3 suites are all AEAD and not set by this.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
# Seconds a start keeps retrying a bind that finds the port still held by a dying registry.
BIND_RETRY_SECONDS = 10.0
# Seconds between checks that every worker is alive.
WATCH_INTERVAL = 1.0
PR_SET_PDEATHSIG = 1
# Workers that died (pids), for the exit code.
_FAILED: list[int] = []

_LEVELS = {
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}


def tls_context(config: RegistryConfig) -> Optional[ssl.SSLContext]:
    """Server TLS context: never below TLS 1.2; client certificates required with clientcas."""
    if config.tls is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if config.tls.minimum == "tls1.3" else ssl.TLSVersion.TLSv1_2
    )
    context.set_ciphers(TLS12_CIPHERS)
    context.load_cert_chain(config.tls.certificate, config.tls.key)
    if config.tls.clientcas:
        for ca in config.tls.clientcas:
            context.load_verify_locations(cafile=ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def default_workers() -> int:
    """One serving process per CPU this process may run on, at most MAX_DEFAULT_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cpus))


def check_workers(workers: int) -> int:
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"--workers {workers}: must be between 1 and {MAX_WORKERS}")
    return workers


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket every worker accepts on. A restart right after a kill may find the
    old workers still holding it (they die with their parent, but not in the same instant):
    binding is retried for a few seconds. SO_REUSEPORT stays off, so the kernel refuses the
    bind while any old socket listens on the port (SO_REUSEADDR only skips TIME_WAIT): old and
    new listeners never coexist, and a client can never be queued on a dying worker's socket
    once this function has returned."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + BIND_RETRY_SECONDS
    waiting = False
    while True:
        try:
            sock = socket.create_server(
                (host, port), family=family, backlog=LISTEN_BACKLOG, reuse_port=False
            )
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            if time.monotonic() > deadline:
                raise OSError(
                    exc.errno,
                    f"http.addr {host}:{port} is in use by another process (waited "
                    f"{BIND_RETRY_SECONDS:.0f} s for it to let go); stop it or choose another "
                    "port",
                ) from None
            if not waiting:
                log.warning("port %s:%d is still held (a registry stopping?); waiting", host, port)
                waiting = True
            time.sleep(0.1)
            continue
        if waiting:
            log.warning("port %s:%d is free again", host, port)
        return sock


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to the service manager, as sd_notify(3) does: a datagram to
    the unix socket named by $NOTIFY_SOCKET (a leading '@' is the abstract namespace). Returns
    False when there is no manager to tell."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as exc:
            log.warning("could not tell the service manager %s: %s", state, exc)
            return False
    return True


async def _ready(_app: web.Application) -> None:
    # The socket was bound and listening before the app was built (see _listen): from here
    # on every connection to the port is queued on this registry's socket.
    notify(f"READY=1\nMAINPID={os.getpid()}")


async def _stopping(_app: web.Application) -> None:
    notify("STOPPING=1")


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive the process that started it (a killed registry is gone)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _run(
    config: RegistryConfig,
    sock: socket.socket,
    primary: bool,
    children: list[int],
    shared: Optional[SharedMetrics] = None,
) -> None:
    registry_app = RegistryApp(config, background=primary, shared_metrics=shared)
    app = registry_app.build()
    if primary:
        app.on_startup.append(_ready)
        app.on_shutdown.append(_stopping)
    if primary and children:

        def exited(pid: int) -> None:
            if shared is not None:
                worker_exited(shared, pid)

        app.on_shutdown.append(lambda _app: _stop_workers(children))
        app.cleanup_ctx.append(lambda _app: _watch_workers(children, exited))
    try:
        asyncio.run(_serve(app, sock, tls_context(config)))
    except (web.GracefulExit, KeyboardInterrupt):
        pass


async def _serve(
    app: web.Application, sock: socket.socket, ssl_context: Optional[ssl.SSLContext]
) -> None:
    """web.run_app's work with the registry's Runner (aiohttp's own errors answered as JSON):
    serve until SIGTERM or SIGINT (GracefulExit), then shut the app down."""
    runner = Runner(
        app, handle_signals=True, access_log=None, keepalive_timeout=REQUEST_HEAD_SECONDS
    )
    connections = Connections()  # the accept loop closes the oldest idle ones when crowded
    app.middlewares.insert(0, connections.middleware)
    await runner.setup()
    try:
        site = Site(runner, sock, connections, ssl_context=ssl_context)
        await site.start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def _stop_workers(children: list[int]) -> None:
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


async def _watch_workers(children: list[int], exited: Callable[[int], None]) -> AsyncIterator[None]:
    """Stop the whole registry when a worker dies, so the service manager restarts it whole.
    `exited` is told the dead worker's pid first (its live metrics go with it)."""

    async def watch() -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            for pid in children:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    children.remove(pid)
                    exited(pid)
                    if status != 0:
                        _FAILED.append(pid)
                    log.error(
                        "worker %d exited (%s): stopping the registry", pid, _describe(status)
                    )
                    os.kill(os.getpid(), signal.SIGTERM)
                    return

    task = asyncio.create_task(watch())
    yield
    task.cancel()


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"status {os.waitstatus_to_exitcode(status)}"


def serve(config: RegistryConfig, workers: int = 1) -> int:
    """Serve until SIGTERM/SIGINT. With workers > 1, the first process forks workers - 1 more
    that accept on the same socket (each with its own event loop and threads; an upload may
    move between them, its digest state is then rebuilt from storage; their metrics are shared
    through a per-run directory made before they fork and removed once they are gone: see
    metrics.py). Returns the exit code: non-zero when a worker died."""
    logging.basicConfig(
        level=_LEVELS[config.log_level],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestLog())
    check_workers(workers)
    tls_context(config)  # a bad certificate or key fails here, before anything forks
    raise_fd_limit()  # before the workers fork: they inherit it
    host, port = config.host_port
    sock = _listen(host, port)
    scheme = "https" if config.tls else "http"
    log.warning(
        "listening on %s://%s:%d, storage %s, %d worker%s",
        scheme,
        host,
        port,
        config.rootdirectory,
        workers,
        "" if workers == 1 else "s",
    )
    parent = os.getpid()
    children: list[int] = []
    # several workers: their metrics in files of one directory, made before they fork
    shared = share_metrics() if workers > 1 else None
    try:
        for _ in range(workers - 1):
            pid = os.fork()
            if pid == 0:
                os.environ.pop("NOTIFY_SOCKET", None)  # only the main process speaks for it
                _die_with_parent(parent)
                code = 1
                try:
                    _run(config, sock, primary=False, children=[], shared=shared)
                    code = 0
                except BaseException:
                    log.exception("worker %d failed", os.getpid())
                finally:
                    os._exit(code)
            children.append(pid)
        _run(config, sock, primary=True, children=children, shared=shared)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        if shared is not None:
            unshare_metrics(shared)
    return 1 if _FAILED else 0
