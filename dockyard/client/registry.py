"""Pull and push images between the layer store and any Distribution registry (dockyard's, CNCF
distribution, a TLS registry with a private CA): HTTPS with the CA from
``/etc/docker/certs.d/<host:port>/ca.crt`` (or ``--ca-file``), plain HTTP only on loopback or with
``--insecure``; basic and bearer-token auth; parallel layer downloads with progress, resumed
with ``Range``; every byte verified against its digest; cross-repository mount on push."""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import os
import re
import ssl
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Optional

from dockyard.layers.store import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    ImageStore,
    LayerRef,
    StoreError,
    _file_sha256,
)

CERTS_D = "/etc/docker/certs.d"
ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        OCI_MANIFEST,
        DOCKER_MANIFEST,
    ]
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
# Bytes per read while downloading or uploading a blob.
CHUNK = 1024 * 1024
# Layers downloaded at once.
PARALLEL = 4
# Seconds to wait on a registry before a request fails.
TIMEOUT = 300


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
    return Reference(match["host"], match["repo"], match["tag"], match["digest"])


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
        if scheme == "https":
            return http.client.HTTPSConnection(
                self.host, timeout=timeout, context=self.context, blocksize=CHUNK
            )
        if not self.plain_allowed:
            raise ClientError(f"{self.host} is not on loopback: plain HTTP needs --insecure")
        return http.client.HTTPConnection(self.host, timeout=timeout, blocksize=CHUNK)

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
            raise ClientError(f"{self.host} asks for unsupported auth {challenge!r}")
        realm = urllib.parse.urlsplit(fields["realm"])
        query = {"service": fields.get("service", "")}
        query["scope"] = fields.get("scope", scope)
        headers = {}
        if self.credentials:
            user, password = self.credentials
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        conn_cls = (
            http.client.HTTPSConnection if realm.scheme == "https" else http.client.HTTPConnection
        )
        if realm.scheme != "https" and not (self.plain_allowed or _is_loopback(realm.netloc)):
            raise ClientError(f"token realm {fields['realm']} is not HTTPS")
        kwargs: dict[str, Any] = {"timeout": 30}
        if realm.scheme == "https":
            kwargs["context"] = self.context
        conn = conn_cls(realm.netloc, **kwargs)
        conn.request("GET", f"{realm.path}?{urllib.parse.urlencode(query)}", headers=headers)
        reply = conn.getresponse()
        body = reply.read()
        conn.close()
        if reply.status != 200:
            raise ClientError(f"token server {realm.netloc} answered {reply.status}")
        data = json.loads(body)
        token = data.get("token") or data.get("access_token")
        if not token:
            raise ClientError(f"token server {realm.netloc} gave no token")
        with self.lock:
            self.tokens[scope] = f"Bearer {token}"

    def request(
        self,
        method: str,
        path: str,
        scope: str,
        *,
        body: Any = None,
        headers: Optional[dict[str, str]] = None,
        stream: bool = False,
    ) -> tuple[http.client.HTTPResponse, Any]:
        """Send a request, answering one auth challenge; returns (response, connection)."""
        for attempt in range(2):
            conn = self._connection()
            all_headers = {**(headers or {}), **self._authorization(scope)}
            if hasattr(body, "seek") and attempt:
                body.seek(0)
            try:
                conn.request(method, path, body=body, headers=all_headers)
                reply = conn.getresponse()
            except ssl.SSLCertVerificationError as exc:
                raise ClientError(
                    f"the TLS certificate of {self.host} is not trusted ({exc.verify_message}): "
                    f"put its CA in {CERTS_D}/{self.host}/ca.crt or give --ca-file"
                ) from exc
            if reply.status == 401 and attempt == 0:
                challenge = reply.headers.get("WWW-Authenticate", "")
                reply.read()
                conn.close()
                self._authenticate(challenge, scope)
                continue
            if not stream:
                reply.body = reply.read()  # type: ignore[attr-defined]
                conn.close()
            return reply, conn
        raise ClientError(f"{self.host}: credentials were refused")


def _error_text(reply: http.client.HTTPResponse) -> str:
    body = getattr(reply, "body", b"")
    try:
        errors = json.loads(body)["errors"]
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
    except (ValueError, KeyError, TypeError):
        return f"HTTP {reply.status}"


def _location(location: str) -> str:
    if "://" in location:
        parts = urllib.parse.urlsplit(location)
        return parts.path + (f"?{parts.query}" if parts.query else "")
    return location


# ---- pull ------------------------------------------------------------------------------------
def _pick_platform(index: dict[str, Any], platform: str) -> dict[str, Any]:
    os_name, _, arch = platform.partition("/")
    for entry in index.get("manifests", []):
        p = entry.get("platform") or {}
        if p.get("os") == os_name and p.get("architecture") == arch:
            return dict(entry)
    raise ClientError(f"the image has no {platform} manifest")


def download_blob(
    client: RegistryClient,
    ref: Reference,
    digest: str,
    size: int,
    store: ImageStore,
    progress: Progress,
) -> None:
    """Download to a partial file (resumed with Range), verify, move into the store."""
    if store.has_blob(digest):
        progress.update(digest, size, size, "Already exists")
        return
    partial = os.path.join(store.root, "tmp", f"download-{digest[7:]}.partial")
    scope = f"repository:{ref.repository}:pull"
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    reply, conn = client.request(
        "GET", f"/v2/{ref.repository}/blobs/{digest}", scope, headers=headers, stream=True
    )
    try:
        if reply.status == 200:
            have = 0
        elif reply.status != 206:
            reply.body = reply.read()  # type: ignore[attr-defined]
            raise ClientError(f"{ref.host}/{ref.repository}: blob {digest}: {_error_text(reply)}")
        with open(partial, "ab" if have else "wb") as out:
            done = have
            while True:
                chunk = reply.read(CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                progress.update(digest, done, size)
    finally:
        conn.close()
    with open(partial, "rb") as f:
        actual = "sha256:" + _file_sha256(f)
    if actual != digest:
        os.unlink(partial)
        raise ClientError(f"blob {digest} from {ref.host} hashes to {actual}: discarded")
    store.adopt_blob(partial, digest)
    progress.update(digest, size, size, "Pull complete")


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
    reply, _ = client.request(
        "GET", f"/v2/{ref.repository}/manifests/{ref.reference}", scope, headers={"Accept": ACCEPT}
    )
    if reply.status != 200:
        raise ClientError(f"{ref}: {_error_text(reply)}")
    raw: bytes = reply.body  # type: ignore[attr-defined]
    media = reply.headers.get("Content-Type", "").split(";")[0]
    if ref.digest and "sha256:" + hashlib.sha256(raw).hexdigest() != ref.digest:
        raise ClientError(f"{ref}: the manifest does not match its digest")
    manifest = json.loads(raw)
    media = manifest.get("mediaType") or media
    if media in INDEX_TYPES or "manifests" in manifest:
        entry = _pick_platform(manifest, platform)
        reply, _ = client.request(
            "GET",
            f"/v2/{ref.repository}/manifests/{entry['digest']}",
            scope,
            headers={"Accept": ACCEPT},
        )
        raw = reply.body  # type: ignore[attr-defined]
        if "sha256:" + hashlib.sha256(raw).hexdigest() != entry["digest"]:
            raise ClientError(f"{ref}: the platform manifest does not match its digest")
        manifest = json.loads(raw)
        media = manifest.get("mediaType") or OCI_MANIFEST
    if media not in (OCI_MANIFEST, DOCKER_MANIFEST):
        raise ClientError(f"{ref}: unsupported manifest type {media}")
    config_desc = manifest["config"]
    layers = manifest.get("layers", [])
    jobs = [(config_desc["digest"], int(config_desc["size"]))] + [
        (layer["digest"], int(layer["size"])) for layer in layers
    ]
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        futures = [
            pool.submit(download_blob, client, ref, digest, size, store, progress)
            for digest, size in jobs
        ]
        for future in futures:
            future.result()
    config_bytes = store.read_blob(config_desc["digest"])
    config = json.loads(config_bytes)
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    if len(diff_ids) != len(layers):
        raise ClientError(f"{ref}: config lists {len(diff_ids)} diff IDs for {len(layers)} layers")
    refs: list[LayerRef] = []
    parent: Optional[str] = None
    dirs: list[str] = []
    for layer, diff_id in zip(layers, diff_ids):
        chain, diff, _size = store.apply_blob(parent, layer["digest"], diff_id, dirs)
        refs.append(LayerRef(layer["digest"], diff, chain, int(layer["size"]), layer["mediaType"]))
        parent = chain
        dirs = dirs + [store.layer_dir(chain)]
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
    location = _location(reply.headers["Location"])
    sep = "&" if "?" in location else "?"
    size = os.path.getsize(path)
    with open(path, "rb") as body:
        reply, _ = client.request(
            "PUT",
            f"{location}{sep}digest={digest}",
            scope,
            body=body,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
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
            "mediaType": (
                "application/vnd.docker.container.image.v1+json"
                if docker
                else "application/vnd.oci.image.config.v1+json"
            ),
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


__all__ = ["ClientError", "RegistryClient", "StoreError", "pull", "push", "parse_reference"]
