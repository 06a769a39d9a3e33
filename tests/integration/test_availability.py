"""Availability under crowds of careless or hostile clients, end to end on loopback: the open-file
limit raised at start-up, clients served past the old limit and with the descriptor table full
of idle connections, request heads that never complete closed after a bound, downloads nobody
reads holding no other download up, malformed framing logged as one line without a traceback,
and TLS that answers TLS 1.0/1.1 with a protocol_version alert and offers only AEAD suites on
TLS 1.2. Every wait is bounded; what is asserted is that requests complete, never how fast."""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dockyard import pki as fleet_pki
from tests.integration.conftest import (
    RegistryServer,
    free_port,
    make_server,
    push_blob,
    sha256,
    with_digest,
    write_config,
)

# Seconds a liveness request may take while the crowd is connected (generous: the machine may
# be busy; before the fixes these requests waited for minutes).
LIVENESS_TIMEOUT = 20.0
# The registry's REQUEST_HEAD_SECONDS (dockyard.registry.server), and the slack on top of it a
# connection is given to be closed by.
REQUEST_HEAD_SECONDS = 20.0
CLOSE_SLACK = 20.0
# The registry's SLOW_BODY_GRACE (dockyard.registry.listener): seconds a crawling body is spared.
SLOW_BODY_GRACE = 5.0
MIB = 1024 * 1024


@dataclass
class LimitedServer(RegistryServer):
    """A dockyard registry started under an RLIMIT_NOFILE of (soft, hard), as a systemd unit
    without LimitNOFILE starts it (soft 1024)."""

    nofile: tuple[int, int] = (1024, 4096)

    def command(self) -> list[str]:
        soft, hard = self.nofile
        setlimit = (
            "import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
            "os.execv(sys.argv[1], sys.argv[1:])"
        )
        return [sys.executable, "-c", setlimit, *super().command()]


def limited_server(base: Path, nofile: tuple[int, int]) -> LimitedServer:
    base.mkdir(parents=True)
    port = free_port()
    server = LimitedServer(
        "dockyard",
        base,
        port,
        write_config(base, port),
        serve_args=["--workers", "1"],  # one process: the one whose limit is looked at
        nofile=nofile,
    )
    server.log_path = base / "server.log"
    server.start()
    return server


def soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-files line in /proc/<pid>/limits")


def get(port: int, path: str, timeout: float = LIVENESS_TIMEOUT) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def idle_crowd(port: int, count: int, partial: bytes = b"") -> list[socket.socket]:
    """`count` connections that send `partial` (perhaps nothing) and then nothing more."""
    crowd = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if partial:
            sock.sendall(partial)
        crowd.append(sock)
    return crowd


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (EOF or reset waiting), without blocking."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(65536, socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except ConnectionError:
        return True


@pytest.fixture
def crowd() -> Iterator[list[socket.socket]]:
    """Sockets a test opens in bulk, all closed at its end."""
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def test_fd_limit_is_raised_and_clients_are_served_past_the_old_one(
    tmp_path: Path, crowd: list[socket.socket]
) -> None:
    """Started with soft 256 / hard 4096 (a unit's default is soft 1024), the registry raises
    the soft limit to the hard one, logs it, and serves with 500 idle or half-sent connections
    open: before, accept(2) failed with EMFILE and every client waited."""
    server = limited_server(tmp_path / "nofile", (256, 4096))
    try:
        assert server.process is not None and server.log_path is not None
        assert soft_nofile(server.process.pid) == 4096
        assert "soft limit raised from 256 to 4096" in server.log_path.read_text()
        blob = os.urandom(4096)
        digest = push_blob(server, "avail/nofile", blob)
        crowd += idle_crowd(server.port, 250)
        crowd += idle_crowd(server.port, 250, partial=b"GET /v2/ HTTP/1.1\r\nHost: 127.0")
        assert get(server.port, "/v2/")[0] == 200
        assert get(server.port, f"/v2/avail/nofile/blobs/{digest}") == (200, blob)
    finally:
        server.stop()


def test_a_full_descriptor_table_closes_idle_connections_for_new_clients(
    tmp_path: Path, crowd: list[socket.socket]
) -> None:
    """With a limit that cannot be raised (soft = hard = 256), 400 idle connections would take
    every descriptor: the oldest idle ones are closed to make room, and clients are served."""
    server = limited_server(tmp_path / "full", (256, 256))
    try:
        assert server.process is not None and server.log_path is not None
        assert soft_nofile(server.process.pid) == 256
        blob = os.urandom(4096)
        digest = push_blob(server, "avail/full", blob)
        crowd += idle_crowd(server.port, 400)
        assert get(server.port, "/v2/")[0] == 200
        assert get(server.port, f"/v2/avail/full/blobs/{digest}") == (200, blob)
        deadline = time.monotonic() + LIVENESS_TIMEOUT
        while not any(closed_by_peer(sock) for sock in crowd[:50]):  # the oldest went first
            assert time.monotonic() < deadline, "no idle connection was closed"
            time.sleep(0.1)
        assert "closed 16 idle connections" in server.log_path.read_text()
    finally:
        server.stop()


def test_request_heads_that_never_complete_are_closed(dockyard_server: RegistryServer) -> None:
    """A connection that sends nothing, one that trickles a request head a byte at a time and
    one left idle after a request are all closed once REQUEST_HEAD_SECONDS have passed."""
    silent = socket.create_connection(("127.0.0.1", dockyard_server.port), timeout=10)
    trickle = socket.create_connection(("127.0.0.1", dockyard_server.port), timeout=10)
    trickle.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    idle = http.client.HTTPConnection("127.0.0.1", dockyard_server.port, timeout=10)
    try:
        idle.request("GET", "/v2/")
        reply = idle.getresponse()
        reply.read()
        assert reply.status == 200 and not reply.will_close
        assert idle.sock is not None
        waiting = {"silent": silent, "trickle": trickle, "idle": idle.sock}
        deadline = time.monotonic() + REQUEST_HEAD_SECONDS + CLOSE_SLACK
        while waiting and time.monotonic() < deadline:
            time.sleep(1.0)
            try:
                trickle.send(b"X")  # one header byte a second: never a complete head
            except OSError:
                pass
            waiting = {name: s for name, s in waiting.items() if not closed_by_peer(s)}
        assert not waiting, f"still open: {sorted(waiting)}"
    finally:
        silent.close()
        trickle.close()
        idle.close()


def test_downloads_nobody_reads_do_not_hold_up_other_downloads(
    tmp_path: Path, crowd: list[socket.socket]
) -> None:
    """100 GETs of a 32 MiB blob that read the response head and then nothing more (as many as
    the old fixed pool of download threads, and more) must not keep a 1 KiB blob, or the whole
    large one, from being served to other clients."""
    server = make_server("dockyard", tmp_path / "stalled", serve_args=["--workers", "1"])
    try:
        big, small = os.urandom(32 * MIB), os.urandom(1024)
        big_digest = push_blob(server, "avail/stalled", big)
        small_digest = push_blob(server, "avail/stalled", small)
        request = f"GET /v2/avail/stalled/blobs/{big_digest} HTTP/1.1\r\nHost: x\r\n\r\n"
        for _ in range(100):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # little kernel memory
            sock.settimeout(LIVENESS_TIMEOUT)
            sock.connect(("127.0.0.1", server.port))
            crowd.append(sock)
            sock.sendall(request.encode())
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")  # its download has begun
        assert get(server.port, f"/v2/avail/stalled/blobs/{small_digest}") == (200, small)
        status, body = get(server.port, f"/v2/avail/stalled/blobs/{big_digest}", timeout=60)
        assert status == 200 and sha256(body) == big_digest
    finally:
        server.stop()


def test_malformed_framing_is_refused_with_one_log_line(dockyard_server: RegistryServer) -> None:
    """Two Content-Length headers, or Content-Length with Transfer-Encoding: 400, and one
    warning line each in the log, no traceback."""
    requests = [
        b"PUT /v2/a/manifests/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Content-Length: 4\r\n\r\nabcd",
        b"PUT /v2/a/manifests/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ]
    for raw in requests:
        with socket.create_connection(("127.0.0.1", dockyard_server.port), timeout=10) as sock:
            sock.sendall(raw)
            head = sock.recv(4096)
            assert head.split(b" ", 2)[1] == b"400", head[:200]
    assert dockyard_server.log_path is not None
    log = dockyard_server.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    refused = [line for line in log.splitlines() if "malformed request" in line]
    assert len(refused) == 2, log[-3000:]
    assert "Duplicate Content-Length" in refused[0]
    assert "Transfer-Encoding" in refused[1]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fleet CA with a server certificate (ECDSA), made by dockyard.pki itself."""
    base = tmp_path_factory.mktemp("pki")
    fleet_pki.ensure_server_cert(base, "server", ["localhost"], ["127.0.0.1"])
    return base


@pytest.fixture
def tls_server(pki: Path, tmp_path: Path) -> Iterator[RegistryServer]:
    tls = {"certificate": str(pki / "server.crt"), "key": str(pki / "server.key")}
    server = make_server("dockyard", tmp_path / "tls", extra={"http.tls": tls})
    yield server
    server.stop()


def s_client(server: RegistryServer, pki: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", *args, "-connect", server.address, "-CAfile", str(pki / "ca.crt")],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


@pytest.mark.parametrize("version", ["tls1", "tls1_1"])
def test_tls_1_0_and_1_1_get_a_protocol_version_alert(
    tls_server: RegistryServer, pki: Path, version: str
) -> None:
    """The client learns why (alert 70, protocol_version), instead of a bare close."""
    old = s_client(tls_server, pki, f"-{version}", "-cipher", "DEFAULT@SECLEVEL=0")
    assert old.returncode != 0
    assert "alert protocol version" in old.stdout + old.stderr, old.stderr


def test_tls_1_2_offers_only_aead_suites(
    tls_server: RegistryServer, pki: Path, tmp_path: Path
) -> None:
    """CBC suites (ECDHE-*-AES*-SHA*) are refused on TLS 1.2; ECDHE with AES-GCM or
    ChaCha20-Poly1305 is served, and so is a blob download over it."""
    cbc = "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES128-SHA256"
    refused = s_client(tls_server, pki, "-tls1_2", "-cipher", cbc)
    assert refused.returncode != 0 and "Cipher is (NONE)" in refused.stdout
    for suite in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        served = s_client(tls_server, pki, "-tls1_2", "-cipher", suite)
        assert served.returncode == 0 and f"Cipher is {suite}" in served.stdout, served.stdout

    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    blob = os.urandom(3 * MIB + 17)
    conn = http.client.HTTPSConnection("127.0.0.1", tls_server.port, context=context, timeout=30)
    try:
        conn.request("POST", "/v2/avail/tls/blobs/uploads/")
        start = conn.getresponse()
        start.read()
        assert start.status == 202
        conn.request("PUT", with_digest(start.headers["Location"], sha256(blob)), body=blob)
        done = conn.getresponse()
        done.read()
        assert done.status == 201
        conn.request("GET", f"/v2/avail/tls/blobs/{sha256(blob)}")
        whole = conn.getresponse()
        assert whole.status == 200 and whole.read() == blob
        conn.request("GET", f"/v2/avail/tls/blobs/{sha256(blob)}", headers={"Range": "bytes=5-"})
        ranged = conn.getresponse()
        assert ranged.status == 206 and ranged.read() == blob[5:]
    finally:
        conn.close()


def _slow_body_crowd(port: int, count: int) -> list[socket.socket]:
    """Up to `count` manifest PUTs that announce 1000 body bytes and send one, each once its
    handler reads the body (`100 Continue`); those the registry refuses (its table full) are
    left out."""
    head = (
        b"PUT /v2/avail/crawl/manifests/t HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 1000\r\n\r\n"
    )
    crowd = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            sock.sendall(head)
            answer = b""
            while b"\r\n\r\n" not in answer:
                piece = sock.recv(64)
                if not piece:
                    raise ConnectionResetError("refused")
                answer += piece
            assert answer.startswith(b"HTTP/1.1 100"), answer
            sock.sendall(b"{")
        except OSError:
            sock.close()
            continue
        crowd.append(sock)
    return crowd


def test_requests_whose_body_crawls_do_not_lock_clients_out(
    tmp_path: Path, crowd: list[socket.socket]
) -> None:
    """Soft = hard = 256: 300 requests whose body comes a byte a second (progress, but far too
    slow) would hold every descriptor; once they have crawled for SLOW_BODY_GRACE, the oldest
    are closed for new clients (refused by their handlers without a traceback) and a client is
    served. Before, only connections between requests could be closed: the client was reset."""
    server = limited_server(tmp_path / "crawl", (256, 256))
    try:
        assert server.log_path is not None
        blob = os.urandom(4096)
        digest = push_blob(server, "avail/crawl", blob)
        crowd += _slow_body_crowd(server.port, 300)
        assert len(crowd) >= 200, len(crowd)  # the table is full of them
        for _ in range(int(SLOW_BODY_GRACE) + 2):
            time.sleep(1.0)
            for sock in crowd:
                try:
                    sock.send(b" ")  # one more body byte each: never idle, never finished
                except OSError:
                    pass
        assert get(server.port, "/v2/")[0] == 200
        assert get(server.port, f"/v2/avail/crawl/blobs/{digest}") == (200, blob)
        log = server.log_path.read_text()
        assert "descriptor table nearly full: closed" in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    finally:
        server.stop()


def test_responses_being_written_are_not_cut_to_free_descriptors(
    tmp_path: Path, crowd: list[socket.socket]
) -> None:
    """Soft = hard = 256: 8 clients read a 3.5 MB manifest slowly (its handler has returned,
    aiohttp still writes the body) while 300 idle connections fill the table. Only the idle
    ones are closed: every slow reader gets the whole manifest. Before, a connection counted as
    idle once its handler returned, and the slow readers, the oldest, were closed first."""
    server = limited_server(tmp_path / "inflight", (256, 256))
    try:
        layer = b"inflight layer"
        config = b"{}"
        media = "application/vnd.oci.image.manifest.v1+json"
        doc = {
            "schemaVersion": 2,
            "mediaType": media,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": push_blob(server, "avail/inflight", config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": push_blob(server, "avail/inflight", layer),
                    "size": len(layer),
                }
            ],
            "annotations": {"org.example.padding": "a" * 3_500_000},
        }
        raw = json.dumps(doc).encode()
        put = server.request(
            "PUT", "/v2/avail/inflight/manifests/big", body=raw, headers={"Content-Type": media}
        )
        assert put.status == 201, (put.status, put.body[:300])
        readers = []
        for _ in range(8):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(LIVENESS_TIMEOUT)
            sock.connect(("127.0.0.1", server.port))
            crowd.append(sock)
            sock.sendall(
                f"GET /v2/avail/inflight/manifests/big HTTP/1.1\r\nHost: x\r\nAccept: {media}"
                "\r\nConnection: close\r\n\r\n".encode()
            )
            readers.append(sock)
        time.sleep(1.0)  # the handlers have returned; the bodies wait in the write buffers
        crowd += idle_crowd(server.port, 300)
        assert get(server.port, "/v2/")[0] == 200
        for sock in readers:
            got = b""
            while piece := sock.recv(1 << 20):
                got += piece
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head[:200]
            assert body == raw, f"a slow reader got {len(body)} of {len(raw)} bytes"
    finally:
        server.stop()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_1_1_hello_sent_in_pieces_gets_a_protocol_version_alert(
    tls_server: RegistryServer,
) -> None:
    """A TLS 1.1-only ClientHello whose first 3 bytes come apart from the rest still gets the
    alert (70): the screen peeks until the hello's version is there, not once."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("ALL:@SECLEVEL=0")
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[9:11] in (b"\x03\x01", b"\x03\x02"), hello[:11].hex()
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=LIVENESS_TIMEOUT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(hello[:3])
        time.sleep(0.3)
        s.sendall(hello[3:])
        answer = s.recv(100)
    assert answer[:1] == b"\x15" and answer[-2:] == b"\x02\x46", answer.hex()
