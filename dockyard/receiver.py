"""`dockyard receive --config FILE`: the receiver that closes the push-to-staging loop. It accepts
the registry's notification envelopes (distribution's `events.v1+json`, POSTed by
`notifications.endpoints`) over TLS with a shared bearer token, and for a manifest `push` of a
configured repository and tag runs the configured command (an argv list with placeholders, never a
shell string; on the control machine `dockyard rollout … --group staging --data
docker_release_images=["{image}"]`). Requests are untrusted input: POST only, to one path, a
bounded `Content-Length` body read whole under per-read timeouts and a per-request deadline, a
bounded number of connections each served on its own thread (a slow or idle client is cut off and
never holds a thread others need), errors as a status and a JSON message (never a traceback). It
answers at once and runs the commands on one worker thread, one at a time: events are deduplicated
by id (delivery is at least once) and pushes that arrive while a command runs are coalesced into
one pending trigger per repository and tag, with the newest digest. Standard library only (and
the core's own constants)."""

from __future__ import annotations

import collections
import hmac
import http.server
import json
import logging
import os
import re
import shlex
import signal
import socket
import socketserver
import ssl
import string
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from dockyard.mediatypes import MANIFEST_TYPES

log = logging.getLogger("dockyard.receiver")

# Port the receiver listens on when the config names none.
DEFAULT_PORT = 9443
# The one path events are POSTed to.
DEFAULT_PATH = "/events"
# Largest request body accepted (an envelope of distribution's 100 events is far smaller).
DEFAULT_MAX_BODY = 1024 * 1024
# Seconds each read of a client (and each write to it) may take.
DEFAULT_READ_TIMEOUT = 10.0
# Seconds a whole request may take, handshake to answer: a client trickling bytes is cut off.
DEFAULT_REQUEST_DEADLINE = 30.0
# Seconds a refused client gets, after the answer, to finish sending (its bytes are dropped).
LINGER_SECONDS = 2.0
# Connections served at once (one thread each); more are closed at once and logged.
DEFAULT_MAX_CONNECTIONS = 32
# Event ids remembered to drop duplicates (the registry delivers at least once).
DEFAULT_SEEN_IDS = 10000
# Seconds a triggered command may run before it is killed (a rollout of a few waves fits).
DEFAULT_COMMAND_TIMEOUT = 3600.0
# Envelope media types: distribution 2's (dockyard's registry sends it) and distribution 3's.
EVENT_MEDIA_TYPES = (
    "application/vnd.docker.distribution.events.v1+json",
    "application/vnd.docker.distribution.events.v2+json",
)
# What a command's arguments may name, as {name}: filled from the matched event.
PLACEHOLDERS = ("repository", "tag", "digest", "image", "registry", "event_id")
# The shortest shared token accepted.
MIN_TOKEN_LENGTH = 16

# distribution's reference grammar (repository path components, tags) and a sha256 digest.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
REGISTRY_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$"
)


class ReceiverConfigError(ValueError):
    """The receiver's configuration cannot be used: the message names the key and what is
    valid."""


@dataclass(frozen=True)
class Rule:
    """Pushes of `repository` with one of `tags` trigger the command."""

    repository: str
    tags: tuple[str, ...]


@dataclass(frozen=True)
class ReceiverConfig:
    """The receiver's configuration file (JSON, or YAML), key for key."""

    certificate: str
    key: str
    token_file: str
    rules: tuple[Rule, ...]
    command: tuple[str, ...]
    listen: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    path: str = DEFAULT_PATH
    # Working directory of the command (None: the receiver's).
    workdir: Optional[str] = None
    # host[:port] that {image} and {registry} name (None: the one in the event's target URL).
    registry: Optional[str] = None
    max_body: int = DEFAULT_MAX_BODY
    read_timeout: float = DEFAULT_READ_TIMEOUT
    request_deadline: float = DEFAULT_REQUEST_DEADLINE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    seen_ids: int = DEFAULT_SEEN_IDS
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT


CONFIG_KEYS = (
    "listen",
    "port",
    "path",
    "tls",
    "token_file",
    "rules",
    "command",
    "workdir",
    "registry",
    "max_body",
    "read_timeout",
    "request_deadline",
    "max_connections",
    "seen_ids",
    "command_timeout",
)


def _bad(key: str, value: Any, valid: str) -> ReceiverConfigError:
    return ReceiverConfigError(f"{key}={value!r} is not valid; valid: {valid}")


def _text(doc: dict[str, Any], key: str, default: Optional[str] = None) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str) or not value:
        raise _bad(key, value, "a non-empty string")
    return value


def _number(doc: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _bad(key, value, f"a number from {low:g} to {high:g}")
    return value


def check_command(command: Any) -> tuple[str, ...]:
    """The command as an argv tuple; every {placeholder} must be one of PLACEHOLDERS (literal
    braces are doubled: {{ }})."""
    valid = (
        "a non-empty list of strings (argv, never a shell string) whose placeholders are "
        + ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    )
    if not isinstance(command, (list, tuple)) or not command:
        raise _bad("command", command, valid)
    for arg in command:
        if not isinstance(arg, str):
            raise _bad("command", command, valid)
        try:
            parsed = list(string.Formatter().parse(arg))
        except ValueError as exc:
            raise ReceiverConfigError(f"command: {arg!r}: {exc}; {valid}") from None
        for _, name, spec, conversion in parsed:
            if name is not None and (name not in PLACEHOLDERS or spec or conversion):
                raise ReceiverConfigError(f"command: {arg!r} names {{{name}}}; valid: {valid}")
    if not command[0]:
        raise _bad("command", command, valid)
    return tuple(command)


def _rules(raw: Any) -> tuple[Rule, ...]:
    valid = "a non-empty list of {repository: NAME, tags: [TAG, …]}"
    if not isinstance(raw, (list, tuple)) or not raw:
        raise _bad("rules", raw, valid)
    rules = []
    for index, item in enumerate(raw):
        key = f"rules[{index}]"
        if not isinstance(item, dict) or set(item) - {"repository", "tags"}:
            raise _bad(key, item, valid)
        repository = item.get("repository")
        if not isinstance(repository, str) or not REPOSITORY.match(repository):
            raise _bad(f"{key}.repository", repository, "a repository name like team/app")
        tags = item.get("tags")
        if (
            not isinstance(tags, (list, tuple))
            or not tags
            or not all(isinstance(t, str) and TAG.match(t) for t in tags)
        ):
            raise _bad(f"{key}.tags", tags, "a non-empty list of tags like staging, 1.2")
        rules.append(Rule(repository, tuple(tags)))
    return tuple(rules)


def parse_config(doc: Any) -> ReceiverConfig:
    """A ReceiverConfig from a parsed configuration document."""
    if not isinstance(doc, dict):
        raise ReceiverConfigError("the receiver's configuration must be a mapping of keys")
    unknown = sorted(str(k) for k in doc if k not in CONFIG_KEYS)
    if unknown:
        raise ReceiverConfigError(f"unknown key {unknown[0]}; valid: {', '.join(CONFIG_KEYS)}")
    tls = doc.get("tls")
    if not isinstance(tls, dict) or set(tls) != {"certificate", "key"}:
        raise _bad("tls", tls, "{certificate: PATH, key: PATH} (the receiver serves TLS only)")
    path = doc.get("path", DEFAULT_PATH)
    if not isinstance(path, str) or not path.startswith("/") or "?" in path:
        raise _bad("path", path, "an absolute URL path like /events")
    registry = doc.get("registry")
    if registry is not None and (
        not isinstance(registry, str) or not REGISTRY_HOST.match(registry)
    ):
        raise _bad("registry", registry, "host[:port] of the registry, or null")
    workdir = doc.get("workdir")
    if workdir is not None and (not isinstance(workdir, str) or not os.path.isabs(workdir)):
        raise _bad("workdir", workdir, "an absolute path, or null")
    return ReceiverConfig(
        certificate=_text(tls, "certificate"),
        key=_text(tls, "key"),
        token_file=_text(doc, "token_file"),
        rules=_rules(doc.get("rules")),
        command=check_command(doc.get("command")),
        listen=_text(doc, "listen", "0.0.0.0"),
        port=int(_number(doc, "port", DEFAULT_PORT, 0, 65535)),
        path=path,
        workdir=workdir,
        registry=registry,
        max_body=int(_number(doc, "max_body", DEFAULT_MAX_BODY, 1024, 64 * 1024 * 1024)),
        read_timeout=float(_number(doc, "read_timeout", DEFAULT_READ_TIMEOUT, 0.1, 300)),
        request_deadline=float(
            _number(doc, "request_deadline", DEFAULT_REQUEST_DEADLINE, 0.1, 3600)
        ),
        max_connections=int(_number(doc, "max_connections", DEFAULT_MAX_CONNECTIONS, 1, 4096)),
        seen_ids=int(_number(doc, "seen_ids", DEFAULT_SEEN_IDS, 1, 10_000_000)),
        command_timeout=float(
            _number(doc, "command_timeout", DEFAULT_COMMAND_TIMEOUT, 1, 7 * 24 * 3600)
        ),
    )


def load_config(path: str) -> ReceiverConfig:
    """Read the configuration file: JSON (what the deploy writes), else YAML."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ReceiverConfigError(f"cannot read the configuration {path}: {exc}") from None
    try:
        doc = json.loads(text)
    except ValueError:
        import yaml  # the core's dependency (the registry's config.yml)

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ReceiverConfigError(f"{path} is neither JSON nor YAML: {exc}") from None
    return parse_config(doc)


def read_token(path: str) -> str:
    """The shared token: the file's one line, at least MIN_TOKEN_LENGTH characters, readable by
    its owner alone."""
    try:
        mode = os.stat(path).st_mode
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise ReceiverConfigError(f"token_file: cannot read {path}: {exc}") from None
    if mode & 0o077:
        raise ReceiverConfigError(
            f"token_file: {path} is readable by others (mode {mode & 0o777:04o}); it must be 0600"
        )
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ReceiverConfigError(
            f"token_file: {path} must hold one token of at least {MIN_TOKEN_LENGTH} characters "
            "without spaces"
        )
    return token


def server_context(certificate: str, key: str) -> ssl.SSLContext:
    """Server TLS as the registry serves it: TLS 1.2 at least, ECDHE with AEAD ciphers only."""
    from dockyard.registry.server import TLS12_CIPHERS

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    try:
        context.load_cert_chain(certificate, key)
    except (OSError, ssl.SSLError) as exc:
        raise ReceiverConfigError(f"tls: cannot load {certificate} and {key}: {exc}") from None
    return context


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trigger:
    """A matched push: what the command's placeholders are filled with."""

    repository: str
    tag: str
    digest: str
    event_id: str
    registry: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.repository, self.tag)

    @property
    def image(self) -> str:
        return f"{self.registry}/{self.repository}@{self.digest}"

    def argv(self, command: tuple[str, ...]) -> list[str]:
        values = {
            "repository": self.repository,
            "tag": self.tag,
            "digest": self.digest,
            "image": self.image,
            "registry": self.registry,
            "event_id": self.event_id,
        }
        return [arg.format_map(values) for arg in command]

    def describe(self) -> str:
        return f"{self.repository}:{self.tag} {self.digest} (event {self.event_id})"


class EnvelopeError(ValueError):
    """The request body is not an event envelope: the message says what is wrong (400)."""


def parse_envelope(body: bytes) -> list[dict[str, Any]]:
    """The events of an envelope `{"events": [{…}, …]}`."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise EnvelopeError("the body is not UTF-8") from None
    except ValueError as exc:
        raise EnvelopeError(f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
        raise EnvelopeError('the body is not an event envelope {"events": [...]}')
    events = doc["events"]
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            raise EnvelopeError(f"events[{index}] is not an object")
        if not isinstance(event.get("id"), str) or not event["id"]:
            raise EnvelopeError(f"events[{index}] has no id")
    return events


def match_event(
    event: dict[str, Any], rules: tuple[Rule, ...], registry: Optional[str]
) -> tuple[Optional[Trigger], str]:
    """(the trigger, '') for a manifest push of a configured repository and tag, else (None,
    why it is ignored)."""
    if event.get("action") != "push":
        return None, f"action {event.get('action')!r} is not push"
    target = event.get("target")
    if not isinstance(target, dict):
        return None, "no target"
    media = target.get("mediaType")
    if media not in MANIFEST_TYPES:
        return None, f"target {media!r} is not a manifest"
    repository, tag, digest = target.get("repository"), target.get("tag"), target.get("digest")
    rule = next(
        (r for r in rules if r.repository == repository and tag in r.tags),
        None,
    )
    if rule is None:
        return None, f"no rule for {repository}:{tag}"
    if not isinstance(digest, str) or not DIGEST.match(digest):
        return None, f"digest {digest!r} is not a sha256 digest"
    host = registry
    if host is None:
        url = target.get("url")
        host = urlsplit(url).netloc if isinstance(url, str) else ""
        if not REGISTRY_HOST.match(host or ""):
            request = event.get("request") if isinstance(event.get("request"), dict) else {}
            host = str((request or {}).get("host") or "")
        if not REGISTRY_HOST.match(host):
            return None, "neither the target's url nor the request names a registry host:port"
    return Trigger(rule.repository, str(tag), digest, str(event["id"]), host), ""


class SeenIds:
    """The most recent `size` event ids (oldest forgotten first)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, event_id: str) -> bool:
        """True when the id is new (and now remembered), False for a duplicate."""
        with self._lock:
            if event_id in self._ids:
                self._ids.move_to_end(event_id)
                return False
            self._ids[event_id] = None
            while len(self._ids) > self.size:
                self._ids.popitem(last=False)
            return True


# --- running the command ------------------------------------------------------------------------


class Dispatcher:
    """One worker thread running the command for triggers, one at a time; a trigger for a
    repository and tag that already has one pending replaces it (the newest digest wins)."""

    def __init__(
        self,
        command: tuple[str, ...],
        workdir: Optional[str] = None,
        timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        self.command = command
        self.workdir = workdir
        self.timeout = timeout
        self._cond = threading.Condition()
        self._pending: collections.OrderedDict[tuple[str, str], Trigger] = collections.OrderedDict()
        self._running: Optional[Trigger] = None
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="receiver-worker", daemon=True)
        # Exit codes of finished runs, in order (tests read it; None: killed at its timeout).
        self.finished: list[tuple[Trigger, Optional[int]]] = []

    def start(self) -> None:
        self._thread.start()

    def submit(self, trigger: Trigger) -> None:
        with self._cond:
            running = self._running
            replaced = self._pending.pop(trigger.key, None)
            if running is not None and (running.key, running.digest) == (
                trigger.key,
                trigger.digest,
            ):
                log.info(
                    "trigger %s: the same digest is being rolled out now; not queued again",
                    trigger.describe(),
                )
                return
            self._pending[trigger.key] = trigger
            if replaced is not None:
                log.info(
                    "trigger %s coalesced: replaces the pending %s",
                    trigger.describe(),
                    replaced.describe(),
                )
            elif running is not None:
                log.info(
                    "trigger %s pending: waiting for %s to finish",
                    trigger.describe(),
                    running.describe(),
                )
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is pending or running; False when `timeout` ran out."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._running is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, wait: float = 10.0) -> None:
        """Stop taking triggers; a running command gets SIGTERM (SIGKILL after `wait`)."""
        with self._cond:
            self._stopping = True
            self._pending.clear()
            process = self._process
            self._cond.notify_all()
        if process is not None and process.poll() is None:
            log.info("stopping: terminating the running command (pid %d)", process.pid)
            process.terminate()
            try:
                process.wait(wait)
            except subprocess.TimeoutExpired:
                process.kill()
        if self._thread.is_alive():
            self._thread.join(wait)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                _, trigger = self._pending.popitem(last=False)
                self._running = trigger
            code: Optional[int] = None
            try:
                code = self._run(trigger)
            finally:
                with self._cond:
                    self.finished.append((trigger, code))
                    self._running = None
                    self._process = None
                    self._cond.notify_all()

    def _run(self, trigger: Trigger) -> Optional[int]:
        argv = trigger.argv(self.command)
        log.info(
            "trigger: push of %s:%s digest %s (event %s): running %s",
            trigger.repository,
            trigger.tag,
            trigger.digest,
            trigger.event_id,
            shlex.join(argv),
        )
        started = time.monotonic()
        try:
            with self._cond:
                if self._stopping:
                    return None
                process = subprocess.Popen(argv, cwd=self.workdir, stdin=subprocess.DEVNULL)
                self._process = process
        except OSError as exc:
            log.error("trigger %s: cannot run %s: %s", trigger.describe(), argv[0], exc)
            return None
        try:
            code: Optional[int] = process.wait(self.timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = None
        took = time.monotonic() - started
        if code is None:
            log.error("trigger %s: killed after %.0f s (command_timeout)", trigger.describe(), took)
        else:
            log.log(
                logging.INFO if code == 0 else logging.ERROR,
                "trigger %s: exit %d after %.1f s",
                trigger.describe(),
                code,
                took,
            )
        return code


# --- HTTP ---------------------------------------------------------------------------------------


class EventHandler(http.server.BaseHTTPRequestHandler):
    """One request per connection (HTTP/1.0): POST of an envelope to the events path."""

    server: ReceiverServer
    protocol_version = "HTTP/1.0"
    server_version = "dockyard-receiver"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("%s %s", self.peer, format % args)

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
        log.info("%s %s", self.peer, format % args)

    @property
    def peer(self) -> str:
        address = self.client_address
        if isinstance(address, tuple) and len(address) >= 2:
            host = str(address[0])
            return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
        return str(address)

    def answer(self, status: int, message: str, extra: Optional[dict[str, Any]] = None) -> None:
        body = json.dumps({"status": status, "message": message, **(extra or {})}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="dockyard-receiver"')
        self.end_headers()
        self.wfile.write(body)

    def _not_allowed(self) -> None:
        self.answer(405, f"{self.command} is not allowed: POST events to {self.server.config.path}")

    do_GET = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def do_POST(self) -> None:
        config = self.server.config
        if urlsplit(self.path).path != config.path:
            self.answer(404, f"no such path: POST events to {config.path}")
            return
        refusal = self.server.receiver.check_token(self.headers.get("Authorization"))
        if refusal:
            log.warning("refused an event POST from %s: %s; nothing triggered", self.peer, refusal)
            self.answer(401, refusal)
            return
        if self.headers.get("Transfer-Encoding"):
            self.answer(411, "Transfer-Encoding is not accepted: send a Content-Length")
            return
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            self.answer(411, "Content-Length is required")
            return
        if not raw_length.strip().isdigit():
            self.answer(400, f"Content-Length {raw_length!r} is not a number of bytes")
            return
        length = int(raw_length)
        if length > config.max_body:
            self.answer(413, f"the body of {length} bytes is over the limit of {config.max_body}")
            return
        media = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if media not in EVENT_MEDIA_TYPES:
            self.answer(
                400,
                f"Content-Type {media or '(none)'!r} is not an event envelope; valid: "
                + ", ".join(EVENT_MEDIA_TYPES),
            )
            return
        body = self.rfile.read(length)
        if len(body) != length:
            self.answer(400, f"the body ended after {len(body)} of {length} bytes")
            return
        try:
            events = parse_envelope(body)
        except EnvelopeError as exc:
            self.answer(400, str(exc))
            return
        summary = self.server.receiver.accept(events, self.peer)
        self.answer(200, "accepted", summary)


class ReceiverServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """A thread per connection, at most `max_connections` at once; TLS handshakes happen on the
    connection's thread (a client that never finishes one holds no one else up), and a deadline
    cuts off a connection that is still there after `request_deadline`."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, receiver: Receiver, context: ssl.SSLContext) -> None:
        config = receiver.config
        self.receiver = receiver
        self.config = config
        self.context = context
        self.slots = threading.BoundedSemaphore(config.max_connections)
        if ":" in config.listen:
            self.address_family = socket.AF_INET6
        super().__init__((config.listen.strip("[]"), config.port), EventHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            log.warning(
                "closed a connection from %s: %d connections are being served already",
                client_address[0],
                self.config.max_connections,
            )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        config = self.config
        request.settimeout(config.read_timeout)
        watch = request.dup()
        timer = threading.Timer(config.request_deadline, _cut_off, (watch, client_address))
        timer.daemon = True
        timer.start()
        tls: Optional[ssl.SSLSocket] = None
        try:
            try:
                tls = self.context.wrap_socket(request, server_side=True)
            except (OSError, ValueError) as exc:
                log.info("TLS handshake with %s failed: %s", client_address[0], exc)
                return
            self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]
            _linger(tls, config.max_body)
        finally:
            timer.cancel()
            watch.close()
            if tls is not None:
                tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line, never a traceback (a client that went away, a cut-off connection)."""
        import sys

        error = sys.exc_info()[1]
        log.info("connection from %s ended: %s", client_address[0], error or "unknown error")


def _linger(sock: ssl.SSLSocket, limit: int) -> None:
    """After the answer: read and drop what the client still sends (a refused body), at most
    `limit` bytes for at most LINGER_SECONDS, so that closing does not reset the connection
    before the client has read the answer."""
    deadline = time.monotonic() + LINGER_SECONDS
    try:
        while limit > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            sock.settimeout(left)
            chunk = sock.recv(min(limit, 65536))
            if not chunk:
                return
            limit -= len(chunk)
    except (OSError, ValueError):
        return


def _cut_off(sock: socket.socket, client_address: Any) -> None:
    log.info("cut off %s: the request took longer than its deadline", client_address[0])
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


@dataclass
class Receiver:
    """The receiver: configuration, token, seen ids, the worker and the HTTPS server."""

    config: ReceiverConfig
    token: str
    dispatcher: Dispatcher = field(init=False)
    seen: SeenIds = field(init=False)
    server: Optional[ReceiverServer] = field(default=None, init=False)
    _thread: Optional[threading.Thread] = field(default=None, init=False)
    _expected: bytes = field(default=b"", init=False, repr=False)

    def __post_init__(self) -> None:
        self.dispatcher = Dispatcher(
            self.config.command, self.config.workdir, self.config.command_timeout
        )
        self.seen = SeenIds(self.config.seen_ids)
        self._expected = f"Bearer {self.token}".encode()

    @classmethod
    def from_config(cls, config: ReceiverConfig) -> Receiver:
        return cls(config, read_token(config.token_file))

    def check_token(self, header: Optional[str]) -> str:
        """'' when the Authorization header carries the token, else why not."""
        if not header:
            return "no Authorization header (Bearer token required)"
        if not hmac.compare_digest(header.strip().encode("utf-8", "replace"), self._expected):
            return "wrong bearer token"
        return ""

    def accept(self, events: list[dict[str, Any]], peer: str) -> dict[str, Any]:
        """Hand the matching pushes to the worker; a summary for the answer."""
        triggered, duplicates, ignored = [], 0, 0
        for event in events:
            event_id = str(event["id"])
            if not self.seen.add(event_id):
                duplicates += 1
                log.debug("event %s from %s: a duplicate, dropped", event_id, peer)
                continue
            trigger, why = match_event(event, self.config.rules, self.config.registry)
            if trigger is None:
                ignored += 1
                log.debug("event %s from %s ignored: %s", event_id, peer, why)
                continue
            log.info("event %s from %s: push of %s", event_id, peer, trigger.describe())
            triggered.append(event_id)
            self.dispatcher.submit(trigger)
        return {"triggered": triggered, "duplicates": duplicates, "ignored": ignored}

    def start(self, context: Optional[ssl.SSLContext] = None) -> tuple[str, int]:
        """Listen and serve on a thread; the (address, port) it listens on."""
        if context is None:
            context = server_context(self.config.certificate, self.config.key)
        self.server = ReceiverServer(self, context)
        self.dispatcher.start()
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="receiver-accept", daemon=True
        )
        self._thread.start()
        address = self.server.server_address
        return str(address[0]), int(address[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.dispatcher.stop()


def serve(config: ReceiverConfig, ready: Callable[[str], Any] = lambda state: None) -> int:
    """Run the receiver until SIGTERM or SIGINT; `ready` is told READY=1 once it listens."""
    receiver = Receiver.from_config(config)
    host, port = receiver.start()
    rules = ", ".join(f"{r.repository}:{'|'.join(r.tags)}" for r in config.rules)
    log.info(
        "receiving registry events on https://%s:%d%s (rules: %s; command: %s)",
        host,
        port,
        config.path,
        rules,
        shlex.join(config.command),
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ready("READY=1")
    while not stop.wait(1.0):
        pass
    log.info("stopping")
    receiver.stop()
    return 0


def main(config_path: str, check: bool = False) -> int:
    """`dockyard receive --config FILE [--check]`."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s dockyard-receiver %(levelname)s %(message)s"
    )
    config = load_config(config_path)
    if check:
        read_token(config.token_file)
        server_context(config.certificate, config.key)
        print(f"{config_path}: the receiver's configuration, token and TLS files are usable")
        return 0
    from dockyard.registry.server import notify

    return serve(config, ready=notify)
