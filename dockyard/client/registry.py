"""Pull and push images between the layer store and any Distribution registry (dockyard's, CNCF
distribution, a TLS registry with a private CA): HTTPS with the CA from
``/etc/docker/certs.d/<host:port>/ca.crt`` (or ``--ca-file``), plain HTTP only on loopback or with
``--insecure``; basic and bearer-token auth; parallel layer downloads with progress, resumed with
``Range`` from ``<store>/tmp/download-<hex>.partial`` (a complete partial is verified and used
without a request); blob redirects followed a few hops, never with the registry's credentials to
another host nor from HTTPS down to plain HTTP without ``--insecure``; manifests and configs
bounded to 4 MiB; every byte verified against its digest; cross-repository mount on push. Whatever
a registry answers — garbage, a truncated body, a document of the wrong shape — ends in one
``ClientError`` line that names the registry or the reference and the fault."""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Optional

from dockyard.digests import file_sha256
from dockyard.layers.store import ImageStore, LayerRef, StoreError
from dockyard.mediatypes import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    OCI_CONFIG,
    OCI_MANIFEST,
    OCTET_STREAM,
)

CERTS_D = "/etc/docker/certs.d"
# Manifest types asked for, indexes first (a multi-platform image resolves to its platform's).
ACCEPT = ", ".join(INDEX_TYPES + (OCI_MANIFEST, DOCKER_MANIFEST))
# Bytes per read while downloading or uploading a blob.
CHUNK = 1024 * 1024
# Layers downloaded at once.
PARALLEL = 4
# Seconds to wait on a registry before a request fails.
TIMEOUT = 300
# Largest manifest or image config accepted, in bytes: the limit registries themselves keep
# (distribution refuses bigger manifests); at most one byte more is read before refusing.
DOCUMENT_LIMIT = 4 * 1024 * 1024
# Largest body read of any other reply (errors, upload answers, tokens); the rest is dropped.
REPLY_LIMIT = 1024 * 1024
# Redirects followed for one blob download (a registry in front of object storage answers one).
MAX_REDIRECTS = 5
# Statuses that send a blob download on to their Location.
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# A partial download in the store is tmp/<prefix><digest hex><suffix>.
PARTIAL_PREFIX = "download-"
PARTIAL_SUFFIX = ".partial"
# Characters of a registry's own text (error message, garbage reply) quoted in one error line.
QUOTED = 200
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_HOST_NAME = re.compile(
    r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


class ClientError(Exception):
    """A pull or push that cannot go on; the message names the registry, repository, digest."""


@dataclass(frozen=True)
class Reference:
    host: str
    repository: str
    tag: Optional[str]
    digest: Optional[str]

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        suffix = f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}"
        return f"{self.host}/{self.repository}{suffix}"


def parse_reference(ref: str) -> Reference:
    """`host[:port]/repo[:tag][@digest]`; the registry host must be named."""
    match = re.fullmatch(
        r"(?P<host>[^/]+)/(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
        r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[a-f0-9]{64}))?",
        ref,
    )
    if not match or not (
        "." in match["host"] or ":" in match["host"] or match["host"] == "localhost"
    ):
        raise ClientError(
            f"invalid reference {ref!r}: expected host[:port]/repository[:tag][@sha256:...] "
            "(the registry host must be named, e.g. 127.0.0.1:5000/library/app:1)"
        )
    host = match["host"]
    name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    if not name:
        name, port = host, ""
    if not _HOST_NAME.fullmatch(name):
        raise ClientError(f"invalid reference {ref!r}: {name!r} is not a host name or address")
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ClientError(
            f"invalid reference {ref!r}: the port {port!r} of {host} is not a number "
            "from 1 to 65535"
        )
    return Reference(host, match["repo"], match["tag"], match["digest"])


def _is_loopback(host: str) -> bool:
    if host.startswith("["):
        name = host[1 : host.find("]")]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _docker_credentials(host: str) -> Optional[tuple[str, str]]:
    path = os.path.join(os.path.expanduser("~"), ".docker", "config.json")
    try:
        with open(path) as f:
            auths = json.load(f).get("auths", {})
    except (OSError, ValueError):
        return None
    entry = auths.get(host) or auths.get(f"https://{host}")
    if not entry or "auth" not in entry:
        return None
    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
    return user, password


def _quote(text: str) -> str:
    """A registry's text for one error line: whitespace runs as one space, at most QUOTED chars."""
    flat = " ".join(text.split())
    return flat if len(flat) <= QUOTED else flat[: QUOTED - 1] + "…"


def _read_limited(reply: http.client.HTTPResponse, limit: int) -> bytes:
    """The body, or its first `limit` + 1 bytes when it is longer (the caller then refuses it or
    drops the rest); `IncompleteRead` when the connection closes before its Content-Length."""
    parts: list[bytes] = []
    total = 0
    while total <= limit:
        chunk = reply.read(min(CHUNK, limit + 1 - total))
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
    data = b"".join(parts)
    if total <= limit and reply.length:
        raise http.client.IncompleteRead(data, reply.length)
    return data


@dataclass
class Progress:
    """One line per blob on stderr: rewritten in place on a terminal, printed once otherwise."""

    stream: IO[str] = field(default_factory=lambda: sys.stderr)
    lock: threading.Lock = field(default_factory=threading.Lock)
    last: dict[str, float] = field(default_factory=dict)

    def update(self, digest: str, done: int, total: int, final: str = "") -> None:
        short = digest.split(":")[-1][:12]
        tty = self.stream.isatty()
        now = time.monotonic()
        if not final and (not tty or now - self.last.get(digest, 0.0) < 0.2):
            return
        self.last[digest] = now
        with self.lock:
            if final:
                prefix = "\r" if tty else ""
                self.stream.write(f"{prefix}{short}: {final}\n")
            else:
                width = 30
                filled = int(width * done / total) if total else width
                bar = "=" * max(filled - 1, 0) + (">" if filled else "") + " " * (width - filled)
                self.stream.write(f"\r{short}: [{bar}] {done / 1e6:.1f}/{total / 1e6:.1f} MB")
            self.stream.flush()


class RegistryClient:
    """Talks to one registry host."""

    def __init__(
        self,
        host: str,
        *,
        insecure: bool = False,
        ca_file: Optional[str] = None,
        username: Optional[str] = None,
        password: Optional[str] = None,
        certs_d: str = CERTS_D,
    ) -> None:
        self.host = host
        self.insecure = insecure
        self.credentials = (username, password or "") if username else _docker_credentials(host)
        self.tokens: dict[str, str] = {}
        self.lock = threading.Lock()
        cert_dir = os.path.join(certs_d, host)
        ca = ca_file or (
            os.path.join(cert_dir, "ca.crt")
            if os.path.exists(os.path.join(cert_dir, "ca.crt"))
            else None
        )
        self.context = ssl.create_default_context(cafile=ca)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        if os.path.isdir(cert_dir):
            for name in sorted(os.listdir(cert_dir)):
                if name.endswith(".cert"):
                    key = os.path.join(cert_dir, name[:-5] + ".key")
                    self.context.load_cert_chain(os.path.join(cert_dir, name), key)
        # TLS to the hosts a blob is redirected to: the system's CAs and the registry's, and no
        # client certificate (it is the registry's, not theirs)
        self.redirect_context = ssl.create_default_context()
        self.redirect_context.minimum_version = ssl.TLSVersion.TLSv1_2
        if ca:
            self.redirect_context.load_verify_locations(ca)
        self.plain_allowed = insecure or _is_loopback(host)
        self.scheme = "https"
        if self.plain_allowed and ca is None:
            self.scheme = self._probe_scheme()

    def _probe_scheme(self) -> str:
        """Docker's rule for loopback/insecure registries: HTTPS if it answers, else HTTP."""
        try:
            conn = self._connection("https", timeout=5)
            conn.request("GET", "/v2/")
            conn.getresponse().read()
            conn.close()
            return "https"
        except ssl.SSLCertVerificationError:
            return "https"  # it speaks TLS: an untrusted certificate is an error, not HTTP
        except (ssl.SSLError, OSError, http.client.HTTPException):
            return "http"

    def _connection(self, scheme: Optional[str] = None, timeout: float = TIMEOUT) -> Any:
        scheme = scheme or self.scheme
        if scheme != "https" and not self.plain_allowed:
            raise ClientError(f"{self.host} is not on loopback: plain HTTP needs --insecure")
        return _connect(scheme, self.host, self.context, timeout)

    def failure(self, exc: Exception, host: str, doing: str) -> ClientError:
        """One line for a connection, TLS or HTTP framing failure with `host` while `doing`."""
        if isinstance(exc, ssl.SSLCertVerificationError):
            return ClientError(
                f"the TLS certificate of {host} is not trusted ({exc.verify_message}): "
                f"put its CA in {CERTS_D}/{host}/ca.crt or give --ca-file"
            )
        if isinstance(exc, ssl.SSLError):
            if exc.reason == "WRONG_VERSION_NUMBER":
                plain_helps = host == self.host and not self.insecure
                hint = ": to allow plain HTTP to it, give --insecure" if plain_helps else ""
                return ClientError(f"{host} answers plain HTTP, not HTTPS, to {doing}{hint}")
            return ClientError(f"TLS with {host} failed on {doing}: {exc.reason or exc}")
        if isinstance(exc, socket.gaierror):
            name = urllib.parse.urlsplit(f"//{host}").hostname or host
            return ClientError(f"cannot look up the registry host {name} ({host}): {exc.strerror}")
        if isinstance(exc, http.client.RemoteDisconnected):
            return ClientError(f"{host} closed the connection without answering {doing}")
        if isinstance(exc, ConnectionRefusedError):
            return ClientError(
                f"cannot connect to {host}: connection refused (is a registry listening there?)"
            )
        if isinstance(exc, (TimeoutError, socket.timeout)):
            return ClientError(f"{host} did not answer {doing} in time")
        if isinstance(exc, http.client.IncompleteRead):
            announced = f" of {len(exc.partial) + exc.expected}" if exc.expected else ""
            return ClientError(
                f"{host} sent a truncated reply to {doing}: the connection closed after "
                f"{len(exc.partial)}{announced} bytes"
            )
        if isinstance(exc, http.client.BadStatusLine):
            line = _quote(str(exc.args[0])) if exc.args else ""
            return ClientError(f"{host} does not speak HTTP: its reply to {doing} began {line!r}")
        if isinstance(exc, http.client.InvalidURL):
            return ClientError(f"{host} is not a valid address: {exc}")
        if isinstance(exc, http.client.HTTPException):
            return ClientError(
                f"{host} sent a malformed HTTP reply to {doing}: "
                f"{_quote(str(exc)) or type(exc).__name__}"
            )
        if isinstance(exc, OSError):
            return ClientError(f"{host} failed on {doing}: {exc.strerror or exc}")
        return ClientError(f"{host} failed on {doing}: {exc}")

    def read_body(
        self, reply: http.client.HTTPResponse, limit: int, host: str, doing: str
    ) -> bytes:
        """`_read_limited`, with a broken connection as one `ClientError` line."""
        try:
            return _read_limited(reply, limit)
        except (OSError, http.client.HTTPException) as exc:
            raise self.failure(exc, host, doing) from exc

    # ---- auth ---------------------------------------------------------------------------
    def _authorization(self, scope: str) -> dict[str, str]:
        with self.lock:
            token = self.tokens.get(scope) or self.tokens.get("basic")
        return {"Authorization": token} if token else {}

    def _authenticate(self, challenge: str, scope: str) -> None:
        scheme, _, params = challenge.partition(" ")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        if scheme.lower() == "basic":
            if not self.credentials:
                raise ClientError(
                    f"{self.host} needs credentials (--username/--password or "
                    "~/.docker/config.json)"
                )
            user, password = self.credentials
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            with self.lock:
                self.tokens["basic"] = f"Basic {token}"
            return
        if scheme.lower() != "bearer" or "realm" not in fields:
            raise ClientError(f"{self.host} asks for unsupported auth {_quote(challenge)!r}")
        realm = urllib.parse.urlsplit(fields["realm"])
        if realm.scheme not in ("http", "https") or not realm.netloc:
            raise ClientError(f"{self.host}: token realm {_quote(fields['realm'])!r} is no URL")
        query = {"service": fields.get("service", "")}
        query["scope"] = fields.get("scope", scope)
        headers = {}
        if self.credentials:
            user, password = self.credentials
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        if realm.scheme != "https" and not (self.plain_allowed or _is_loopback(realm.netloc)):
            raise ClientError(f"token realm {fields['realm']} is not HTTPS")
        doing = "a token request"
        try:
            conn = _connect(realm.scheme, realm.netloc, self.context, 30)
            try:
                conn.request(
                    "GET", f"{realm.path}?{urllib.parse.urlencode(query)}", headers=headers
                )
                reply = conn.getresponse()
                body = _read_limited(reply, REPLY_LIMIT)
            finally:
                conn.close()
        except (OSError, http.client.HTTPException) as exc:
            raise self.failure(exc, realm.netloc, doing) from exc
        if reply.status != 200:
            raise ClientError(f"token server {realm.netloc} answered {reply.status}")
        try:
            data = json.loads(body[:REPLY_LIMIT])
        except ValueError:
            data = None
        bearer = (data.get("token") or data.get("access_token")) if isinstance(data, dict) else None
        if not bearer or not isinstance(bearer, str):
            raise ClientError(f"token server {realm.netloc} gave no token")
        with self.lock:
            self.tokens[scope] = f"Bearer {bearer}"

    def request(
        self,
        method: str,
        path: str,
        scope: str,
        *,
        body: Any = None,
        headers: Optional[dict[str, str]] = None,
        stream: bool = False,
        limit: int = REPLY_LIMIT,
    ) -> tuple[http.client.HTTPResponse, Any]:
        """Send a request, answering one auth challenge; returns (response, connection). Unless
        `stream`, the body is read (at most `limit` + 1 bytes) into `response.body`."""
        doing = f"{method} {path}"
        for attempt in range(2):
            conn = self._connection()
            all_headers = {**(headers or {}), **self._authorization(scope)}
            if hasattr(body, "seek") and attempt:
                body.seek(0)
            try:
                conn.request(method, path, body=body, headers=all_headers)
                reply = conn.getresponse()
                if reply.status == 401 and attempt == 0:
                    challenge = reply.headers.get("WWW-Authenticate", "")
                    _read_limited(reply, REPLY_LIMIT)
                    conn.close()
                    self._authenticate(challenge, scope)
                    continue
                if not stream:
                    body_bytes = b"" if method == "HEAD" else _read_limited(reply, limit)
                    reply.body = body_bytes  # type: ignore[attr-defined]
                    conn.close()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise self.failure(exc, self.host, doing) from exc
            return reply, conn
        raise ClientError(f"{self.host}: credentials were refused")

    def open_blob(
        self, path: str, scope: str, headers: dict[str, str]
    ) -> tuple[http.client.HTTPResponse, Any, str]:
        """GET a blob with its body unread, following the registry's redirects (to object
        storage, say) at most MAX_REDIRECTS times: the registry's Authorization goes to the
        registry only, its client certificate never leaves it, and HTTPS is never given up for
        plain HTTP without --insecure. Returns (response, connection, host that answered)."""
        reply, conn = self.request("GET", path, scope, headers=headers, stream=True)
        url = f"{self.scheme}://{self.host}{path}"
        host = self.host
        hops = 0
        while reply.status in REDIRECT_STATUSES:
            location = reply.headers.get("Location", "")
            conn.close()
            what = f"{self.host} redirected GET {path}"
            if not location:
                raise ClientError(f"{what} (HTTP {reply.status}) without a Location")
            if hops == MAX_REDIRECTS:
                raise ClientError(f"{what} more than {MAX_REDIRECTS} times: a redirect loop?")
            hops += 1
            target = urllib.parse.urljoin(url, location.strip())
            parts = urllib.parse.urlsplit(target)
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https") or not parts.hostname:
                raise ClientError(f"{what} to {_quote(target)!r}, which is no HTTP URL")
            if scheme == "http" and not self.insecure:
                if url.startswith("https:"):
                    raise ClientError(
                        f"{what} from HTTPS to plain HTTP on {parts.netloc}: refused; "
                        "give --insecure to allow it"
                    )
                if not _is_loopback(parts.netloc):
                    raise ClientError(
                        f"{what} to plain HTTP on {parts.netloc}, which is not on loopback: "
                        "refused; give --insecure to allow it"
                    )
            host = parts.netloc
            same = host.lower() == self.host.lower() and (
                scheme == "https" or self.scheme == "http"
            )
            hop_headers = {**headers, **(self._authorization(scope) if same else {})}
            target_path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            context = self.context if same else self.redirect_context
            doing = f"GET {path} (redirected by {self.host})" if not same else f"GET {target_path}"
            try:
                conn = _connect(scheme, host, context, TIMEOUT)
                try:
                    conn.request("GET", target_path, headers=hop_headers)
                    reply = conn.getresponse()
                except BaseException:
                    conn.close()
                    raise
            except (OSError, http.client.HTTPException) as exc:
                raise self.failure(exc, host, doing) from exc
            url = target
        return reply, conn, host


def _connect(scheme: str, netloc: str, context: ssl.SSLContext, timeout: float) -> Any:
    if scheme == "https":
        return http.client.HTTPSConnection(
            netloc, timeout=timeout, context=context, blocksize=CHUNK
        )
    return http.client.HTTPConnection(netloc, timeout=timeout, blocksize=CHUNK)


def _error_text(reply: http.client.HTTPResponse) -> str:
    body = getattr(reply, "body", b"")
    media = reply.headers.get("Content-Type", "").split(";")[0].strip().lower()
    try:
        errors = json.loads(body)["errors"]
        text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        return _quote(text) or f"HTTP {reply.status}"
    except (ValueError, KeyError, TypeError, AttributeError):
        if media == "text/html" or body.lstrip()[:1] == b"<":
            return f"HTTP {reply.status} with an HTML page (is this a registry?)"
        return f"HTTP {reply.status}"


def _location(location: str) -> str:
    if "://" in location:
        parts = urllib.parse.urlsplit(location)
        return parts.path + (f"?{parts.query}" if parts.query else "")
    return location


def _json_kind(value: Any) -> str:
    """What a JSON value is, for an error line: "an array", "a string", "null", ..."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "a number"


# ---- partial downloads -----------------------------------------------------------------------
def partial_path(store: ImageStore, digest: str) -> str:
    """Where a download of `digest` is kept until it is complete and verified."""
    return os.path.join(store.root, "tmp", f"{PARTIAL_PREFIX}{digest[7:]}{PARTIAL_SUFFIX}")


def _hash_file(path: str) -> str:
    with open(path, "rb") as f:
        return "sha256:" + file_sha256(f)


def _resume_point(partial: str, digest: str, size: int) -> tuple[int, bool]:
    """(bytes of the partial download to resume from, whether it is the whole verified blob).
    A partial as long as the blob is hashed: kept if right, removed if wrong, as is one longer
    than the blob; a shorter one is resumed."""
    try:
        have = os.path.getsize(partial)
    except FileNotFoundError:
        return 0, False
    if have < size:
        return have, False
    if have == size and _hash_file(partial) == digest:
        return have, True
    os.unlink(partial)
    return 0, False


def stale_partials(store: ImageStore) -> list[str]:
    """The partial downloads in the store's tmp/ that no pull will resume, one line each (for
    `store fsck`): a complete download never moved into the store (the next pull of the blob
    verifies and uses it), one of a blob the store already holds (left over: remove it), a file
    whose name is no digest. One still short of its blob is not stale: a pull resumes it."""
    tmp = os.path.join(store.root, "tmp")
    try:
        names = sorted(os.listdir(tmp))
    except FileNotFoundError:
        return []
    stale = []
    for name in names:
        if not (name.startswith(PARTIAL_PREFIX) and name.endswith(PARTIAL_SUFFIX)):
            continue
        digest = "sha256:" + name[len(PARTIAL_PREFIX) : -len(PARTIAL_SUFFIX)]
        shown = f"tmp/{name}"
        if not _DIGEST.fullmatch(digest):
            stale.append(f"{shown}: not named after a sha256 digest, no pull uses it")
            continue
        if store.has_blob(digest):
            stale.append(f"{shown}: blob {digest} is in the store already; left over")
            continue
        try:
            complete = _hash_file(os.path.join(tmp, name)) == digest
        except FileNotFoundError:
            continue  # a running pull just moved it into the store
        if complete:
            stale.append(
                f"{shown}: complete download of {digest}, never moved into the store "
                "(the next pull of it uses it)"
            )
    return stale


# ---- pull ------------------------------------------------------------------------------------
def _pick_platform(ref: Reference, index: dict[str, Any], platform: str) -> dict[str, Any]:
    os_name, _, arch = platform.partition("/")
    entries = index.get("manifests", [])
    if not isinstance(entries, list):
        raise ClientError(f"{ref}: the index's manifests are {_json_kind(entries)}, not a list")
    for entry in entries:
        p = entry.get("platform") if isinstance(entry, dict) else None
        if isinstance(p, dict) and p.get("os") == os_name and p.get("architecture") == arch:
            return dict(entry)
    raise ClientError(f"the image has no {platform} manifest")


def _descriptor(ref: Reference, value: Any, what: str) -> tuple[str, int]:
    """(digest, size) of a descriptor in a manifest or index, checked before any path is built."""
    if not isinstance(value, dict):
        raise ClientError(f"{ref}: the manifest's {what} is {_json_kind(value)}, not an object")
    digest, size = value.get("digest"), value.get("size")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ClientError(
            f"{ref}: the manifest's {what} has no sha256 digest (it has {_quote(repr(digest))})"
        )
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ClientError(f"{ref}: the manifest's {what} has no size (it has {_quote(repr(size))})")
    return digest, size


def _get_document(
    client: RegistryClient, ref: Reference, reference: str, scope: str, what: str
) -> tuple[bytes, str, dict[str, Any]]:
    """(bytes, Content-Type, JSON object) of a manifest or index, at most DOCUMENT_LIMIT bytes."""
    reply, _ = client.request(
        "GET",
        f"/v2/{ref.repository}/manifests/{reference}",
        scope,
        headers={"Accept": ACCEPT},
        limit=DOCUMENT_LIMIT,
    )
    if reply.status != 200:
        raise ClientError(f"{ref}: {what}: {_error_text(reply)}")
    raw: bytes = reply.body  # type: ignore[attr-defined]
    media = reply.headers.get("Content-Type", "").split(";")[0].strip()
    if len(raw) > DOCUMENT_LIMIT:
        raise ClientError(
            f"{ref}: the {what} is larger than {DOCUMENT_LIMIT >> 20} MiB, the most registries "
            "accept: refused"
        )
    if media.lower() == "text/html" or raw.lstrip()[:1] == b"<":
        raise ClientError(
            f"{ref}: the registry answered an HTML page where the {what} should be "
            "(a web server or a login page in front of it?)"
        )
    doc = _json_object(ref, raw, what)
    return raw, media, doc


def _json_object(ref: Reference, raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw.decode("utf-8"))  # JSON on the wire is UTF-8 (RFC 8259)
    except UnicodeDecodeError as exc:
        raise ClientError(f"{ref}: the {what} is not JSON (not UTF-8 text)") from exc
    except ValueError as exc:
        raise ClientError(f"{ref}: the {what} is not JSON ({_quote(str(exc))})") from exc
    if not isinstance(doc, dict):
        raise ClientError(f"{ref}: the {what} is {_json_kind(doc)}, not a JSON object")
    return doc


def download_blob(
    client: RegistryClient,
    ref: Reference,
    digest: str,
    size: int,
    store: ImageStore,
    progress: Progress,
) -> None:
    """One download of a blob at a time per store (its blob lock): a concurrent pull of the
    same blob waits, then finds it in the store, and no two write one partial file."""
    with store.blob_lock(digest):
        _download_blob(client, ref, digest, size, store, progress)


def _download_blob(
    client: RegistryClient,
    ref: Reference,
    digest: str,
    size: int,
    store: ImageStore,
    progress: Progress,
) -> None:
    """Download to a partial file (resumed with Range), verify, move into the store. A partial
    as long as the blob is verified and used without a request (or removed if it hashes wrong);
    a registry that cannot serve the rest (416, another range) is asked for all of it."""
    if store.has_blob(digest):
        progress.update(digest, size, size, "Already exists")
        return
    partial = partial_path(store, digest)
    what = f"{ref.host}/{ref.repository}: blob {digest}"
    have, complete = _resume_point(partial, digest, size)
    if not complete:
        if not _fetch(client, ref, digest, size, partial, have, progress, what):
            os.unlink(partial)  # the registry will not serve the rest: all of it, once more
            _fetch(client, ref, digest, size, partial, 0, progress, what)
        actual = _hash_file(partial)
        if actual != digest:
            os.unlink(partial)
            raise ClientError(f"blob {digest} from {ref.host} hashes to {actual}: discarded")
    store.adopt_blob(partial, digest)
    progress.update(digest, size, size, "Pull complete")


def _fetch(
    client: RegistryClient,
    ref: Reference,
    digest: str,
    size: int,
    partial: str,
    have: int,
    progress: Progress,
    what: str,
) -> bool:
    """Append the blob's bytes from `have` on to `partial`; False when the registry does not
    serve from there (416, another range) and it must start again from 0."""
    path = f"/v2/{ref.repository}/blobs/{digest}"
    headers = {"Range": f"bytes={have}-"} if have else {}
    reply, conn, host = client.open_blob(path, f"repository:{ref.repository}:pull", headers)
    source = "" if host == ref.host else f" (redirected to {host})"
    try:
        if reply.status == 416 and have:
            return False
        if reply.status == 200:
            have = 0
        elif reply.status == 206:
            match = re.match(r"bytes (\d+)-", reply.headers.get("Content-Range", ""))
            if match and int(match[1]) != have:
                if have:
                    return False
                raise ClientError(f"{what}{source}: a range from {match[1]} nobody asked for")
        else:
            error_body = client.read_body(reply, REPLY_LIMIT, host, f"GET {path}")
            reply.body = error_body  # type: ignore[attr-defined]
            raise ClientError(f"{what}{source}: {_error_text(reply)}")
        done = have
        too_long = False
        with open(partial, "ab" if have else "wb") as out:
            while True:
                try:
                    chunk = reply.read(min(CHUNK, size + 1 - done))
                except (OSError, http.client.HTTPException) as exc:
                    cause = client.failure(exc, host, f"GET {path}")
                    raise ClientError(
                        f"{what}{source}: truncated at {done} of {size} bytes ({cause}); "
                        "the partial download is kept, the next pull resumes it"
                    ) from exc
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                if done > size:
                    too_long = True
                    break
                progress.update(digest, done, size)
        if too_long:
            os.unlink(partial)
            raise ClientError(
                f"{what}{source}: the registry sent more than the {size} bytes the manifest "
                "gives: discarded"
            )
        if done < size and reply.length == 0:
            os.unlink(partial)
            raise ClientError(
                f"{what}{source}: the registry's blob ends at {done} bytes, the manifest gives "
                f"{size}: discarded"
            )
        if done < size:
            raise ClientError(
                f"{what}{source}: truncated at {done} of {size} bytes (the connection closed "
                "early); the partial download is kept, the next pull resumes it"
            )
        return True
    finally:
        conn.close()


def pull(
    store: ImageStore,
    ref_text: str,
    client_factory: Callable[[str], RegistryClient],
    platform: str = "linux/amd64",
    progress: Optional[Progress] = None,
) -> str:
    ref = parse_reference(ref_text)
    client = client_factory(ref.host)
    progress = progress or Progress()
    scope = f"repository:{ref.repository}:pull"
    raw, media, manifest = _get_document(client, ref, ref.reference, scope, "manifest")
    if ref.digest and "sha256:" + hashlib.sha256(raw).hexdigest() != ref.digest:
        raise ClientError(f"{ref}: the manifest does not match its digest")
    kind = manifest.get("mediaType") or media
    if kind in INDEX_TYPES or "manifests" in manifest:
        entry = _pick_platform(ref, manifest, platform)
        entry_digest, _ = _descriptor(ref, entry, f"{platform} entry")
        what = f"{platform} manifest"
        raw, _, manifest = _get_document(client, ref, entry_digest, scope, what)
        if "sha256:" + hashlib.sha256(raw).hexdigest() != entry_digest:
            raise ClientError(f"{ref}: the platform manifest does not match its digest")
        kind = manifest.get("mediaType") or OCI_MANIFEST
    if kind not in (OCI_MANIFEST, DOCKER_MANIFEST):
        raise ClientError(f"{ref}: unsupported manifest type {_quote(str(kind))}")
    media = kind
    if "config" not in manifest:
        raise ClientError(f"{ref}: the manifest has no config")
    config_digest, config_size = _descriptor(ref, manifest["config"], "config")
    if config_size > DOCUMENT_LIMIT:
        raise ClientError(
            f"{ref}: the config is {config_size} bytes, more than the {DOCUMENT_LIMIT >> 20} MiB "
            "a config may have: refused"
        )
    layers = manifest.get("layers", [])
    if not isinstance(layers, list):
        raise ClientError(f"{ref}: the manifest's layers are {_json_kind(layers)}, not a list")
    layer_descs = [_descriptor(ref, layer, f"layer {n}") for n, layer in enumerate(layers)]
    layer_types = []
    for n, layer in enumerate(layers):
        if not isinstance(layer.get("mediaType"), str):
            raise ClientError(f"{ref}: the manifest's layer {n} has no mediaType")
        layer_types.append(layer["mediaType"])
    jobs: dict[str, int] = {}
    for digest, size in [(config_digest, config_size), *layer_descs]:
        if jobs.setdefault(digest, size) != size:
            raise ClientError(f"{ref}: the manifest gives {digest} two sizes")
    # Downloads run PARALLEL at a time, the config first; each layer is applied as soon as it
    # and the layers below it are in, while the later ones still download (as docker pull does).
    pool = ThreadPoolExecutor(max_workers=PARALLEL)
    try:
        futures = {
            digest: pool.submit(download_blob, client, ref, digest, size, store, progress)
            for digest, size in jobs.items()
        }
        futures[config_digest].result()
        config_bytes = store.read_blob(config_digest)
        config = _json_object(ref, config_bytes, f"config {config_digest}")
        rootfs = config.get("rootfs", {})
        diff_ids = rootfs.get("diff_ids", []) if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or not all(
            isinstance(d, str) and _DIGEST.fullmatch(d) for d in diff_ids
        ):
            raise ClientError(
                f"{ref}: the config's rootfs.diff_ids is not a list of sha256 digests"
            )
        if len(diff_ids) != len(layers):
            raise ClientError(
                f"{ref}: config lists {len(diff_ids)} diff IDs for {len(layers)} layers"
            )
        refs: list[LayerRef] = []
        parent: Optional[str] = None
        dirs: list[str] = []
        for (digest, size), layer_type, diff_id in zip(layer_descs, layer_types, diff_ids):
            futures[digest].result()
            chain, diff, _size = store.apply_blob(parent, digest, diff_id, dirs)
            refs.append(LayerRef(digest, diff, chain, size, layer_type))
            parent = chain
            dirs = dirs + [store.layer_dir(chain)]
        for future in futures.values():
            future.result()  # every download's error is reported, even of an unused blob
    finally:
        # on an error, downloads not started are dropped and running ones finish first
        pool.shutdown(wait=True, cancel_futures=True)
    store.put_blob(raw)
    tag_ref = str(ref) if not ref.digest else None
    image = store.register(
        config_bytes, refs, media, tag_ref, source=f"{ref.host}/{ref.repository}"
    )
    return image.id


# ---- push ------------------------------------------------------------------------------------
def _upload(client: RegistryClient, ref: Reference, digest: str, path: str, scope: str) -> None:
    reply, _ = client.request(
        "POST", f"/v2/{ref.repository}/blobs/uploads/", scope, headers={"Content-Length": "0"}
    )
    if reply.status != 202:
        raise ClientError(f"{ref}: starting the upload of {digest}: {_error_text(reply)}")
    if not reply.headers.get("Location"):
        raise ClientError(f"{ref}: starting the upload of {digest}: the registry gave no Location")
    location = _location(reply.headers["Location"])
    sep = "&" if "?" in location else "?"
    size = os.path.getsize(path)
    with open(path, "rb") as body:
        reply, _ = client.request(
            "PUT",
            f"{location}{sep}digest={digest}",
            scope,
            body=body,
            headers={"Content-Type": OCTET_STREAM, "Content-Length": str(size)},
        )
    if reply.status != 201:
        raise ClientError(f"{ref}: uploading {digest}: {_error_text(reply)}")


def push_blob(
    client: RegistryClient,
    ref: Reference,
    digest: str,
    path: str,
    sources: list[str],
    progress: Progress,
) -> None:
    scope = f"repository:{ref.repository}:pull,push"
    reply, _ = client.request("HEAD", f"/v2/{ref.repository}/blobs/{digest}", scope)
    if reply.status == 200:
        progress.update(digest, 0, 0, "Layer already exists")
        return
    for source in sources:
        host, _, repo = source.partition("/")
        if host != ref.host or repo == ref.repository:
            continue
        reply, _ = client.request(
            "POST",
            f"/v2/{ref.repository}/blobs/uploads/?mount={digest}&from={repo}",
            f"{scope} repository:{repo}:pull",
            headers={"Content-Length": "0"},
        )
        if reply.status == 201:
            progress.update(digest, 0, 0, f"Mounted from {repo}")
            return
        if reply.status == 202:
            # the registry opened an upload instead: cancel it and upload normally
            location = reply.headers.get("Location")
            if location:
                client.request("DELETE", _location(location), scope)
    _upload(client, ref, digest, path, scope)
    progress.update(digest, 0, 0, "Pushed")


def push(
    store: ImageStore,
    ref_text: str,
    client_factory: Callable[[str], RegistryClient],
    source_ref: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> str:
    ref = parse_reference(ref_text)
    if ref.digest:
        raise ClientError("push takes a tag, not a digest")
    image = store.resolve(source_ref or ref_text)
    client = client_factory(ref.host)
    progress = progress or Progress()
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        futures = [
            pool.submit(
                push_blob,
                client,
                ref,
                layer.digest,
                store.blob_path(layer.digest),
                image.sources.get(layer.digest, []),
                progress,
            )
            for layer in image.layers
        ]
        for future in futures:
            future.result()
    push_blob(client, ref, image.id, store.blob_path(image.id), [], progress)
    docker = image.manifest_media_type == DOCKER_MANIFEST
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": {
            "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
            "digest": image.id,
            "size": os.path.getsize(store.blob_path(image.id)),
        },
        "layers": [
            {
                "mediaType": layer.media_type,
                "digest": layer.digest,
                "size": os.path.getsize(store.blob_path(layer.digest)),
            }
            for layer in image.layers
        ],
    }
    raw = json.dumps(manifest, indent=3).encode()
    reply, _ = client.request(
        "PUT",
        f"/v2/{ref.repository}/manifests/{ref.reference}",
        f"repository:{ref.repository}:pull,push",
        body=raw,
        headers={"Content-Type": manifest["mediaType"]},
    )
    if reply.status != 201:
        raise ClientError(f"{ref}: manifest: {_error_text(reply)}")
    digest = reply.headers.get("Docker-Content-Digest") or ""
    store.put_blob(raw)
    for layer in image.layers:
        sources = image.sources.setdefault(layer.digest, [])
        if f"{ref.host}/{ref.repository}" not in sources:
            sources.append(f"{ref.host}/{ref.repository}")
    store.save_image(image)
    if str(ref) not in image.tags and source_ref:
        store.tag(image, str(ref))
    return digest


__all__ = [
    "ClientError",
    "RegistryClient",
    "StoreError",
    "partial_path",
    "pull",
    "push",
    "parse_reference",
    "stale_partials",
]
