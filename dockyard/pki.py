"""The fleet's PKI on the control machine: a CA whose private key never leaves it (0600 in a
0700 directory), registry server certificates with DNS and IP subjectAltNames (current clients
ignore the CN), and optional client certificates for mutual TLS. A certificate is reissued only
when it is missing, expires within the renewal window, was signed by another CA, or its names
changed — so a second run changes nothing."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dockyard.fsutil import atomic_write

# Lifetimes in days: the CA long, leaf certificates within the 825-day limit clients enforce.
CA_DAYS = 3650
LEAF_DAYS = 825
# A leaf certificate is reissued when it expires within this many days.
RENEW_BEFORE_DAYS = 30
_LOCK = threading.Lock()


class PKIError(Exception):
    """A PKI file that cannot be used as it is; the message names the file."""


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    changed: bool


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write(path: Path, data: bytes, mode: int) -> None:
    atomic_write(str(path), data, mode)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if os.stat(path).st_mode & 0o077:
        raise PKIError(f"{path} is readable by others; it must be mode 0600")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path} is not an EC private key")
    return key


def ensure_ca(directory: Union[str, Path], name: str = "dockyard fleet CA") -> tuple[Path, Path]:
    """The CA certificate and key in `directory`, created once; (cert path, key path)."""
    base = Path(directory).expanduser()
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(base, 0o700)
    cert_path, key_path = base / "ca.crt", base / "ca.key"
    with _LOCK:
        if cert_path.exists() and key_path.exists():
            _load_key(key_path)
            return cert_path, key_path
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return cert_path, key_path


def _names(dns: Iterable[str], ips: Iterable[str]) -> tuple[set[str], set[str]]:
    dns_set = {d.lower() for d in dns if d}
    ip_set = set()
    for ip in ips:
        try:
            ip_set.add(str(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise PKIError(f"{ip!r} is not an IP address") from exc
    return dns_set, ip_set


def cert_names(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return (
        {d.lower() for d in san.get_values_for_type(x509.DNSName)},
        {str(i) for i in san.get_values_for_type(x509.IPAddress)},
    )


def needs_issue(
    cert_path: Path,
    key_path: Path,
    ca: x509.Certificate,
    wanted: Optional[tuple[set[str], set[str]]],
) -> Optional[str]:
    """Why the certificate at `cert_path` would be issued again (missing, signed by another CA,
    expiring, names other than `wanted` (DNS names, IPs; None: not checked), a key that does not
    match), or None when it is good; reads only."""
    if not cert_path.exists() or not key_path.exists():
        return "missing"
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "signed by another CA"
    if cert.not_valid_after_utc - _now() < dt.timedelta(days=RENEW_BEFORE_DAYS):
        return "expires soon"
    if wanted is not None and cert_names(cert) != wanted:
        return "names changed"
    key = _load_key(key_path)
    if key.public_key() != cert.public_key():
        return "key does not match"
    return None


def pending(
    directory: Union[str, Path],
    name: Optional[str] = None,
    dns: Iterable[str] = (),
    ips: Iterable[str] = (),
    server: bool = True,
) -> str:
    """Why `ensure_ca` (name None), `ensure_server_cert` or `ensure_client_cert` (server False)
    would write something in `directory`, "" when it would not: the same rules, read-only (for
    change detection and dry runs; nothing is created)."""
    base = Path(directory).expanduser()
    ca_cert_path, ca_key_path = base / "ca.crt", base / "ca.key"
    if not (ca_cert_path.exists() and ca_key_path.exists()):
        return "the fleet CA does not exist yet"
    if name is None:
        return ""
    ca = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    wanted = _names(dns, ips)
    reason = needs_issue(base / f"{name}.crt", base / f"{name}.key", ca, wanted if server else None)
    return reason or ""


def _issue_leaf(
    directory: Union[str, Path],
    name: str,
    dns: Iterable[str],
    ips: Iterable[str],
    server: bool,
) -> Issued:
    base = Path(directory).expanduser()
    ca_cert_path, ca_key_path = ensure_ca(base)
    ca = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    cert_path, key_path = base / f"{name}.crt", base / f"{name}.key"
    wanted = _names(dns, ips)
    if server and not (wanted[0] or wanted[1]):
        raise PKIError(f"the server certificate {name!r} needs at least one DNS name or IP")
    with _LOCK:
        reason = needs_issue(cert_path, key_path, ca, wanted if server else None)
        if reason is None:
            return Issued(cert_path, key_path, False)
        ca_key = _load_key(ca_key_path)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    cast(ec.EllipticCurvePublicKey, ca.public_key())
                ),
                critical=False,
            )
        )
        if server:
            names: list[x509.GeneralName] = [x509.DNSName(d) for d in sorted(wanted[0])]
            names += [x509.IPAddress(ipaddress.ip_address(i)) for i in sorted(wanted[1])]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return Issued(cert_path, key_path, True)


def ensure_server_cert(
    directory: Union[str, Path], name: str, dns: Iterable[str], ips: Iterable[str]
) -> Issued:
    """A registry server certificate with these subjectAltNames, reissued only when needed."""
    return _issue_leaf(directory, name, dns, ips, server=True)


def ensure_client_cert(directory: Union[str, Path], name: str) -> Issued:
    """A client certificate for mutual TLS (docker reads it from certs.d as *.cert/*.key)."""
    return _issue_leaf(directory, name, [], [], server=False)
