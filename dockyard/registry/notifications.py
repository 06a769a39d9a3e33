"""Webhook notifications as CNCF distribution sends them (`notifications.endpoints`): events
(push, pull, delete, mount) in distribution's JSON, POSTed in an envelope to each endpoint, with
its headers and timeout, backing off for `backoff` after `threshold` failures in a row.

Unlike distribution's in-memory queues, each endpoint's queue is durable: a directory of
envelope files below `notifications.dockyard.queuedirectory` (a directory per endpoint, named
`<time ns>-<pid>-<sequence>-<events>.json`, each file the very body that is POSTed). A request
only appends its events to an in-memory list (never waiting for a disk or an endpoint); a
writer thread per endpoint moves them into files (written, fsynced, renamed); the first serving
process alone delivers them, oldest first, from a thread per endpoint, and removes a file once
the endpoint accepted it (2xx or 3xx, as distribution). Delivery is at least once: a failed or
unanswered POST is sent again with the same events and ids. Events are kept across restarts
and outages; a queue holds at most `notifications.dockyard.maxqueue` events, newer ones are
dropped past it (counted, and logged)."""

from __future__ import annotations

import base64
import binascii
import errno
import fcntl
import http.client
import itertools
import json
import logging
import os
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from aiohttp import web

from dockyard.mediatypes import OCTET_STREAM
from dockyard.registry.config import NotificationEndpoint, NotificationsConfig

log = logging.getLogger("dockyard.registry")

# Media type of the envelope, the POST's Content-Type (distribution 2.x's; 3.x sends
# application/vnd.docker.distribution.events.v2+json with the same fields).
ENVELOPE_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
# Most events one queue file (one POST) holds.
BATCH_MAX = 100
# Seconds an idle delivery thread waits before it looks for files other processes wrote.
IDLE_POLL_SECONDS = 0.5
# Bytes of an endpoint's answer read (and ignored) before the connection is closed.
ANSWER_READ_MAX = 65536
# Temp files of a killed writer older than this are removed when delivery starts (seconds).
TEMP_STALE_SECONDS = 3600.0
# Request keys: the request's id in its events and the authenticated user.
REQUEST_ID = "dockyard.request_id"
REQUEST_USER = "dockyard.user"
_TEMP, _LOCK = ".tmp-", ".deliver.lock"


def basic_user(authorization: Optional[str]) -> Optional[str]:
    """The user name of a Basic Authorization header (checked already), None without one."""
    if not authorization or authorization[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True)
    except (ValueError, binascii.Error):
        return None
    user, sep, _ = decoded.partition(b":")
    return user.decode("utf-8", "replace") if sep and user else None


def _timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _first(value: Optional[str]) -> str:
    return (value or "").split(",")[0].strip()


def request_record(request: web.Request) -> dict[str, str]:
    """distribution's RequestRecord: the request's id, the client's address (X-Forwarded-For,
    X-Real-Ip, or the peer's ip:port), the Host it asked for, its method and User-Agent."""
    if REQUEST_ID not in request:
        request[REQUEST_ID] = str(uuid.uuid4())
    addr = _first(request.headers.get("X-Forwarded-For")) or _first(
        request.headers.get("X-Real-Ip")
    )
    if not addr:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            addr = f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
        else:
            addr = request.remote or ""
    record = {"id": request[REQUEST_ID], "method": request.method}
    if addr:
        record["addr"] = addr
    if request.host:
        record["host"] = request.host
    record["useragent"] = request.headers.get("User-Agent", "")
    return record


def _base_url(request: web.Request) -> str:
    """scheme://host the client reached the registry at (X-Forwarded-Proto/-Host first)."""
    scheme = _first(request.headers.get("X-Forwarded-Proto")) or request.scheme
    host = _first(request.headers.get("X-Forwarded-Host")) or request.host
    return f"{scheme}://{host}"


def blob_target(
    request: web.Request, name: str, digest: str, size: int, from_repository: str = ""
) -> dict[str, Any]:
    """Target of a blob push, pull or mount: distribution describes every blob as
    application/octet-stream, with its size (and `length`, the same), digest, repository,
    the repository it was mounted from, and its URL."""
    target: dict[str, Any] = {"mediaType": OCTET_STREAM}
    if size:
        target["size"] = size
    target["digest"] = digest
    if size:
        target["length"] = size
    target["repository"] = name
    if from_repository:
        target["fromRepository"] = from_repository
    target["url"] = f"{_base_url(request)}/v2/{name}/blobs/{digest}"
    return target


def manifest_target(
    request: web.Request, name: str, digest: str, size: int, media_type: str, tag: str = ""
) -> dict[str, Any]:
    """Target of a manifest push or pull: its media type, size (and length), digest,
    repository, URL by digest and the tag it was pushed or pulled by."""
    target: dict[str, Any] = {"mediaType": media_type, "size": size, "digest": digest}
    target.update(length=size, repository=name)
    target["url"] = f"{_base_url(request)}/v2/{name}/manifests/{digest}"
    if tag:
        target["tag"] = tag
    return target


def delete_target(name: str, digest: str = "", tag: str = "") -> dict[str, Any]:
    """Target of a delete: only the digest (or, deleting a tag, the tag) and the repository."""
    target: dict[str, Any] = {"digest": digest} if digest else {}
    target["repository"] = name
    if tag:
        target["tag"] = tag
    return target


class EndpointStats:
    """What one endpoint's queue did in this process; each count is also handed to `sink`
    (the metrics' counters, shared by every serving process) when one is set."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queued = 0  # events accepted into the queue
        self.delivered = 0  # events the endpoint accepted
        self.failures = 0  # POSTs that failed (error, timeout or refused status)
        self.dropped = 0  # events dropped: the queue was full (or a file unreadable)
        self.sink: Optional[Callable[[str, int], None]] = None

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, count in counts.items():
                setattr(self, name, getattr(self, name) + count)
        if self.sink is not None:
            for name, count in counts.items():
                self.sink(name, count)


class EndpointQueue:
    """One endpoint: its in-memory hand-over list, the writer thread that makes it durable and
    (in the delivering process) the delivery thread."""

    def __init__(
        self,
        endpoint: NotificationEndpoint,
        directory: str,
        max_queue: int,
        ssl_context: Optional[ssl.SSLContext],
    ) -> None:
        self.endpoint = endpoint
        self.directory = directory
        self.max_queue = max_queue
        self.ssl_context = ssl_context
        self.stats = EndpointStats()
        self._ignored_media = set(endpoint.ignored_mediatypes)
        self._ignored_actions = set(endpoint.ignored_actions)
        self._pending: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._files_ready = threading.Event()
        self._sequence = itertools.count()
        self._full = False  # a warning was logged and the queue has had no room since
        self._threads: list[threading.Thread] = []

    # ---- the request path -----------------------------------------------------------------
    def offer(self, event: dict[str, Any]) -> None:
        """Hand an event over (never blocks on disk or network). Events with an ignored
        media type or action are skipped, as distribution's ignoredSink does."""
        if event["action"] in self._ignored_actions:
            return
        if event["target"].get("mediaType") in self._ignored_media:
            return
        with self._cond:
            if len(self._pending) >= self.max_queue:
                dropped = True
            else:
                dropped = False
                self._pending.append(event)
                self._cond.notify()
        if dropped:
            self._dropped(1)

    # ---- threads ---------------------------------------------------------------------------
    def start(self, deliver: bool) -> None:
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise PermissionError(
                errno.EACCES, f"notification queue {self.directory} is not writable"
            )
        self._threads = [threading.Thread(target=self._write_loop, daemon=True)]
        if deliver:
            self._threads.append(threading.Thread(target=self._deliver_loop, daemon=True))
        for thread in self._threads:
            thread.name = f"notify-{self.endpoint.name}-{len(self._threads)}"
            thread.start()

    def stop(self, wait: float) -> None:
        """Write what is pending to disk and stop (a POST under way ends within its timeout;
        its file is kept and sent again after the restart)."""
        self._stopping.set()
        self._files_ready.set()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + wait
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # ---- durability ------------------------------------------------------------------------
    def depth(self) -> int:
        """Events in the queue: those in files (counted from their names) and those pending."""
        with self._cond:
            pending = len(self._pending)
        return pending + sum(count for _name, count in self._files())

    def _files(self) -> list[tuple[str, int]]:
        """Queue files, oldest first, with their event counts."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        files = []
        for name in names:
            if name.startswith(".") or not name.endswith(".json"):
                continue
            try:
                files.append((name, int(name[: -len(".json")].rsplit("-", 1)[1])))
            except (IndexError, ValueError):
                continue
        files.sort()
        return files

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping.is_set():
                    self._cond.wait()
                batch, self._pending = self._pending, []
            if batch:
                self._persist(batch)
            elif self._stopping.is_set():
                return

    def _persist(self, batch: list[dict[str, Any]]) -> None:
        """Write `batch` into queue files, as much as the bound allows; drop the rest."""
        room = self.max_queue - sum(count for _name, count in self._files())
        kept = batch[: max(room, 0)]
        dropped = len(batch) - len(kept)
        written = 0
        try:
            for start in range(0, len(kept), BATCH_MAX):
                events = kept[start : start + BATCH_MAX]
                self._write_file(events)
                written += len(events)
            if written:
                fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            log.error(
                "notifications: endpoint %s: cannot write its queue in %s: %s (%d events lost)",
                self.endpoint.name,
                self.directory,
                exc,
                len(kept) - written,
            )
            dropped += len(kept) - written
        if written:
            self.stats.add(queued=written)
            self._files_ready.set()
        if dropped:
            self._dropped(dropped)
        elif written and room > written:
            # room is left after this write: the next drop starts a new episode (and says so).
            # Not on any write: events accepted before a drop can reach the disk after it.
            self._full = False

    def _write_file(self, events: list[dict[str, Any]]) -> None:
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._sequence):08d}-{len(events)}.json"
        temp = os.path.join(self.directory, f"{_TEMP}{name}")
        body = json.dumps({"events": events}, separators=(",", ":")).encode()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            os.close(fd)
            os.unlink(temp)
            raise
        os.close(fd)
        os.rename(temp, os.path.join(self.directory, name))

    def _dropped(self, count: int) -> None:
        self.stats.add(dropped=count)
        if not self._full:
            self._full = True
            log.warning(
                "notifications: endpoint %s: queue full (%d events, "
                "notifications.dockyard.maxqueue): dropping new events until it drains "
                "(counted in registry_notifications_dropped_total)",
                self.endpoint.name,
                self.max_queue,
            )

    # ---- delivery --------------------------------------------------------------------------
    def _deliver_loop(self) -> None:
        """Deliver files oldest first, one POST each. After `threshold` failures in a row, wait
        `backoff` after each failure (distribution's breaker); a success resets the count."""
        lock = self._take_delivery_lock()
        if lock is None:
            return
        try:
            self._remove_stale_temps()
            failures = 0
            while not self._stopping.is_set():
                files = self._files()
                if not files:
                    self._files_ready.wait(IDLE_POLL_SECONDS)
                    self._files_ready.clear()
                    continue
                name, count = files[0]
                path = os.path.join(self.directory, name)
                try:
                    with open(path, "rb") as f:
                        body = f.read()
                    json.loads(body)
                except FileNotFoundError:
                    continue
                except (OSError, ValueError) as exc:
                    log.error("notifications: unreadable queue file %s (%s): dropped", path, exc)
                    self._discard(path)
                    self.stats.add(dropped=count)
                    continue
                problem = self._post(body)
                if problem is None:
                    self._discard(path)
                    self.stats.add(delivered=count)
                    if failures >= self.endpoint.threshold:
                        log.warning("notifications: endpoint %s answers again", self.endpoint.name)
                    failures = 0
                    continue
                failures += 1
                self.stats.add(failures=1)
                log.error(
                    "notifications: endpoint %s (%s): %s; %d events kept, retrying",
                    self.endpoint.name,
                    self.endpoint.url,
                    problem,
                    count,
                )
                if failures >= self.endpoint.threshold:
                    if failures == self.endpoint.threshold:
                        log.warning(
                            "notifications: endpoint %s: %d failures in a row, backing off %gs "
                            "between attempts",
                            self.endpoint.name,
                            failures,
                            self.endpoint.backoff,
                        )
                    self._stopping.wait(self.endpoint.backoff)
        finally:
            os.close(lock)

    def _take_delivery_lock(self) -> Optional[int]:
        """One deliverer per queue directory, whatever shares it (a registry being replaced,
        two configured with one directory): wait for its lock."""
        fd = os.open(
            os.path.join(self.directory, _LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640
        )
        while not self._stopping.is_set():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                self._stopping.wait(IDLE_POLL_SECONDS)
        os.close(fd)
        return None

    def _remove_stale_temps(self) -> None:
        now = time.time()
        for name in os.listdir(self.directory):
            if not name.startswith(_TEMP):
                continue
            path = os.path.join(self.directory, name)
            try:
                if now - os.stat(path).st_mtime > TEMP_STALE_SECONDS:
                    os.unlink(path)
            except OSError:
                continue

    @staticmethod
    def _discard(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _post(self, body: bytes) -> Optional[str]:
        """POST an envelope; None when the endpoint accepted it (2xx or 3xx), else what went
        wrong."""
        url = urlsplit(self.endpoint.url)
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        connection: http.client.HTTPConnection
        if url.scheme == "https":
            connection = http.client.HTTPSConnection(
                url.hostname or "",
                url.port,
                timeout=self.endpoint.timeout,
                context=self.ssl_context,
            )
        else:
            connection = http.client.HTTPConnection(
                url.hostname or "", url.port, timeout=self.endpoint.timeout
            )
        try:
            connection.putrequest("POST", target, skip_accept_encoding=True)
            connection.putheader("Content-Type", ENVELOPE_MEDIA_TYPE)
            connection.putheader("Content-Length", str(len(body)))
            connection.putheader("User-Agent", "dockyard-registry")
            for name, values in self.endpoint.headers.items():
                for value in values:
                    connection.putheader(name, value)
            connection.endheaders(body)
            answer = connection.getresponse()
            answer.read(ANSWER_READ_MAX)
            if 200 <= answer.status < 400:
                return None
            return f"answered {answer.status} {answer.reason}"
        except (OSError, http.client.HTTPException) as exc:  # socket.timeout, ssl errors
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        finally:
            connection.close()


def client_ssl_context(cafile: Optional[str]) -> ssl.SSLContext:
    """Verifying TLS context for https endpoints: the system's CAs and `cafile`'s."""
    context = ssl.create_default_context()
    if cafile:
        context.load_verify_locations(cafile=cafile)
    return context


class Notifier:
    """The registry's notifications: builds events from requests and hands them to every
    enabled endpoint's queue. `deliver`: this process sends them (the first serving process)."""

    def __init__(self, config: NotificationsConfig, http_addr: str, deliver: bool) -> None:
        self.config = config
        self.deliver = deliver
        port = http_addr.rpartition(":")[2]
        # distribution's SourceRecord: this node (host name and port) and this run of it
        self.source = {"addr": f"{socket.gethostname()}:{port}", "instanceID": str(uuid.uuid4())}
        endpoints = [e for e in config.endpoints if not e.disabled]
        https = any(e.url.startswith("https:") for e in endpoints)
        context = client_ssl_context(config.cafile) if https else None
        directory = config.queue_directory
        self.queues = [
            EndpointQueue(e, os.path.join(directory, e.name), config.max_queue, context)
            for e in endpoints
        ]
        for endpoint in endpoints:
            log.info(
                "notifications: endpoint %s (%s), timeout=%gs, threshold=%d, backoff=%gs, "
                "headers=%s",
                endpoint.name,
                endpoint.url,
                endpoint.timeout,
                endpoint.threshold,
                endpoint.backoff,
                sorted(endpoint.headers),
            )

    @property
    def enabled(self) -> bool:
        return bool(self.queues)

    def start(self) -> None:
        for queue in self.queues:
            queue.start(self.deliver)

    def stop(self) -> None:
        wait = max([q.endpoint.timeout for q in self.queues] + [0.0]) + 1.0
        for queue in self.queues:
            queue.stop(wait)

    def emit(self, request: web.Request, action: str, target: Mapping[str, Any]) -> None:
        """Queue one event of `request` for every endpoint (in-memory: never blocks)."""
        if not self.queues:
            return
        user = request.get(REQUEST_USER)
        event = {
            "id": str(uuid.uuid4()),
            "timestamp": _timestamp(),
            "action": action,
            "target": dict(target),
            "request": request_record(request),
            "actor": {"name": user} if user else {},
            "source": dict(self.source),
        }
        for queue in self.queues:
            queue.offer(event)


Emit = Callable[[web.Request, str, Mapping[str, Any]], None]
