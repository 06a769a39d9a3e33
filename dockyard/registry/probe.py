"""Readiness of a registry as its clients see it: `/v2/` answered by an OCI Distribution
registry (status 200, or 401 when it asks for credentials, with the
`Docker-Distribution-API-Version` header), over TLS verified against a CA where the registry
serves TLS. An open TCP port is not readiness: a registry that is still dying can hold it."""

from __future__ import annotations

import http.client
import ssl
import time
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

# Header every distribution registry sends on /v2/ (distribution's API version check).
API_VERSION_HEADER = "Docker-Distribution-API-Version"
# Seconds one probe may take (connect + TLS + answer).
PROBE_TIMEOUT = 5.0
# Seconds between probes while waiting.
PROBE_INTERVAL = 0.2


@dataclass(frozen=True)
class Answer:
    ready: bool
    detail: str


def probe(
    url: str,
    cafile: Optional[str] = None,
    server_name: Optional[str] = None,
    client_cert: Optional[tuple[str, str]] = None,
) -> Answer:
    """Ask `url`/v2/ once. `server_name` is the name checked against the certificate (and sent
    as SNI) when the URL's host is an address the certificate does not carry; `client_cert`
    (certificate, key) is presented to a registry that asks for one."""
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"registry URL {url!r} is not valid; expected http(s)://HOST[:PORT]")
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=cafile)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if client_cert:
            context.load_cert_chain(*client_cert)
        conn = _NamedHTTPSConnection(host, port, context, server_name or host)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=PROBE_TIMEOUT)
    try:
        conn.request("GET", "/v2/", headers={"User-Agent": "dockyard-probe"})
        reply = conn.getresponse()
        reply.read()
    except ssl.SSLCertVerificationError as exc:
        return Answer(False, f"certificate not trusted: {exc.verify_message}")
    except (OSError, http.client.HTTPException) as exc:
        return Answer(False, f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()
    if reply.status in (200, 401) and reply.getheader(API_VERSION_HEADER):
        return Answer(True, f"HTTP {reply.status}")
    return Answer(False, f"HTTP {reply.status} without {API_VERSION_HEADER}: not a registry")


def wait_ready(
    url: str,
    timeout: float,
    cafile: Optional[str] = None,
    server_name: Optional[str] = None,
    client_cert: Optional[tuple[str, str]] = None,
) -> Answer:
    """Probe until the registry answers or `timeout` seconds pass; the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        answer = probe(url, cafile, server_name, client_cert)
        if answer.ready or time.monotonic() >= deadline:
            return answer
        time.sleep(PROBE_INTERVAL)


class _NamedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address, with the certificate checked for (and SNI sent as) another name."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, name: str) -> None:
        super().__init__(host, port, timeout=PROBE_TIMEOUT, context=context)
        self._name = name
        self._context = context

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._name)
