"""The fleet PKI: CA key 0600 in a 0700 directory, server certificates with DNS and IP SANs
verified by a real TLS handshake, reissue only when missing, expiring, re-signed or renamed."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509

from dockyard import pki


def test_ca_is_made_once_with_a_private_key(tmp_path: Path) -> None:
    cert, key = pki.ensure_ca(tmp_path / "pki")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700
    before = cert.read_bytes()
    again, _ = pki.ensure_ca(tmp_path / "pki")
    assert again.read_bytes() == before
    ca = x509.load_pem_x509_certificate(before)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_server_cert_has_sans_and_is_not_reissued(tmp_path: Path) -> None:
    issued = pki.ensure_server_cert(tmp_path, "registry", ["registry.lab"], ["127.0.0.1"])
    assert issued.changed
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    assert pki.cert_names(cert) == ({"registry.lab"}, {"127.0.0.1"})
    assert stat.S_IMODE(issued.key.stat().st_mode) == 0o600
    again = pki.ensure_server_cert(tmp_path, "registry", ["REGISTRY.lab"], ["127.0.0.1"])
    assert not again.changed


def test_reissued_when_names_change_or_ca_changes(tmp_path: Path) -> None:
    pki.ensure_server_cert(tmp_path, "registry", ["a.lab"], [])
    assert pki.ensure_server_cert(tmp_path, "registry", ["a.lab", "b.lab"], []).changed
    (tmp_path / "ca.crt").unlink()
    (tmp_path / "ca.key").unlink()
    assert pki.ensure_server_cert(tmp_path, "registry", ["a.lab", "b.lab"], []).changed


def test_reissued_when_about_to_expire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki.ensure_server_cert(tmp_path, "registry", ["a.lab"], [])
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=pki.LEAF_DAYS - 10)
    monkeypatch.setattr(pki, "_now", lambda: later)
    assert pki.ensure_server_cert(tmp_path, "registry", ["a.lab"], []).changed


def test_a_world_readable_ca_key_is_refused(tmp_path: Path) -> None:
    _, key = pki.ensure_ca(tmp_path)
    os.chmod(key, 0o644)
    with pytest.raises(pki.PKIError, match="must be mode 0600"):
        pki.ensure_ca(tmp_path)


def test_bad_ip_and_no_names_are_errors(tmp_path: Path) -> None:
    with pytest.raises(pki.PKIError, match="'300.1.1.1' is not an IP address"):
        pki.ensure_server_cert(tmp_path, "r", [], ["300.1.1.1"])
    with pytest.raises(pki.PKIError, match="needs at least one DNS name or IP"):
        pki.ensure_server_cert(tmp_path, "r", [], [])


def test_real_handshake_with_san_and_client_cert(tmp_path: Path) -> None:
    server = pki.ensure_server_cert(tmp_path, "registry", ["localhost"], ["127.0.0.1"])
    client = pki.ensure_client_cert(tmp_path, "client-host1")
    ca = str(tmp_path / "ca.crt")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    server_ctx.load_cert_chain(server.cert, server.key)
    server_ctx.load_verify_locations(ca)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[str] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            peer = tls.getpeercert()
            seen.append(dict(x[0] for x in peer["subject"])["commonName"])
            tls.sendall(b"ok")

    thread = threading.Thread(target=serve)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=ca)
    client_ctx.load_cert_chain(client.cert, client.key)
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.recv(2) == b"ok"
    thread.join(5)
    listener.close()
    assert seen == ["client-host1"]
