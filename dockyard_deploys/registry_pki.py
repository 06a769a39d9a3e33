"""The registry's TLS material: issued on the control machine by `dockyard.pki` (the CA key never
leaves it) and pushed to registry hosts — certificate 0644, key 0600 — with the fleet CA for
client-certificate checks. Reissued only when missing, expiring or renamed."""

from __future__ import annotations

import ipaddress
from typing import Any

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.server import Hostname
from pyinfra.operations import files

from dockyard import pki
from dockyard_deploys.common import current_distro
from dockyard_deploys.nfs_server import anonymous

DEFAULTS: dict[str, Any] = {
    # Control-machine directory of the fleet CA and issued certificates (0700, CA key 0600).
    "registry_pki_dir": "~/.local/share/dockyard/pki",
    # Extra DNS names and IPs for the registry certificate (its address and hostname are in).
    "registry_names": [],
    # Directory of the registry's certificate, key and the CA on registry hosts.
    "registry_certs_dir": "/etc/dockyard/registry/certs",
}


def registry_names() -> tuple[list[str], list[str]]:
    """(DNS names, IPs) the registry certificate must carry for this host."""
    dns: list[str] = []
    ips: list[str] = []
    candidates = [
        str(host.data.get("ssh_hostname") or host.name),
        host.name,
        str(host.get_fact(Hostname) or ""),
    ] + list(host.data.get("registry_names") or [])
    for name in candidates:
        if not name:
            continue
        try:
            ips.append(str(ipaddress.ip_address(name)))
        except ValueError:
            dns.append(name.lower())
    return sorted(set(dns)), sorted(set(ips))


def issue() -> pki.Issued:
    dns, ips = registry_names()
    return pki.ensure_server_cert(
        str(host.data.get("registry_pki_dir")), f"registry-{host.name}", dns, ips
    )


@deploy("Install the registry's TLS certificate", data_defaults=DEFAULTS)
def install_registry_certificate() -> list[Any]:
    """
    Issue (on the control machine) and push the registry server certificate and key.

    + registry_pki_dir: control-machine PKI directory
    + registry_names: extra subjectAltNames
    + registry_certs_dir: where they go on the registry host

    Example:

    .. code:: python

        from dockyard_deploys.registry_pki import install_registry_certificate
        install_registry_certificate()
    """
    issued = issue()
    certs = str(host.data.get("registry_certs_dir"))
    ca_cert, _ = pki.ensure_ca(str(host.data.get("registry_pki_dir")))
    owner, group, _ = anonymous(current_distro())
    files.directory(name=f"Create {certs}", path=certs, mode="0755", present=True)
    return [
        files.put(
            name="Push the registry certificate",
            src=str(issued.cert),
            dest=f"{certs}/registry.crt",
            mode="0644",
        ),
        files.put(
            name=f"Push the registry key (0600, owned by {owner}, the registry's user)",
            src=str(issued.key),
            dest=f"{certs}/registry.key",
            user=owner,
            group=group,
            mode="0600",
        ),
        files.put(
            name="Push the fleet CA certificate (never its key)",
            src=str(ca_cert),
            dest=f"{certs}/ca.crt",
            mode="0644",
        ),
    ]
