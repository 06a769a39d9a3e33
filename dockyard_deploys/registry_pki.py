"""The registry's TLS material: issued on the control machine by `dockyard.pki` (the CA key never
leaves it) and pushed to registry hosts — certificate 0644, key 0600 — with the fleet CA for
client-certificate checks. Reissued only when missing, expiring or renamed, and only when
operations execute: a `--dry` run creates nothing and says what it would issue. Settings:
`settings.PkiSettings` (`registry_pki_dir`, `registry_names`, `registry_certs_dir`)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.server import Hostname
from pyinfra.operations import files

from dockyard_deploys import settings
from dockyard_deploys.common import current_distro
from dockyard_deploys.nfs_server import anonymous
from dockyard_deploys.operations import pki_file, pki_source


def host_names(extra: Any = ()) -> tuple[list[str], list[str]]:
    """(DNS names, IPs) a certificate for this host carries: its ssh address, inventory name
    and hostname, and `extra`, each sorted into names and addresses."""
    dns: set[str] = set()
    ips: set[str] = set()
    candidates = [
        str(host.data.get("ssh_hostname") or host.name),
        host.name,
        str(host.get_fact(Hostname) or ""),
        *extra,
    ]
    for name in candidates:
        if not name:
            continue
        try:
            ips.add(str(ipaddress.ip_address(name)))
        except ValueError:
            dns.add(name.lower())
    return sorted(dns), sorted(ips)


def registry_names() -> tuple[list[str], list[str]]:
    """(DNS names, IPs) the registry certificate must carry for this host."""
    return host_names(settings.pki().names)


def leaf_name() -> str:
    """The name of this host's registry certificate in the PKI directory."""
    return f"registry-{host.name}"


def issued_files() -> list[Path]:
    """The control-machine certificate and key of this host's registry (issued when operations
    execute; they may not exist while pyinfra prepares)."""
    pki_dir = settings.pki().pki_dir
    return [pki_source(pki_dir, "server", leaf_name(), part) for part in ("cert", "key")]


@deploy("Install the registry's TLS certificate")
def install_registry_certificate() -> list[Any]:
    """
    Issue (on the control machine, when operations execute) and push the registry server
    certificate and key, and the fleet CA certificate.

    + registry_pki_dir: control-machine PKI directory
    + registry_names: extra subjectAltNames
    + registry_certs_dir: where they go on the registry host

    Example:

    .. code:: python

        from dockyard_deploys.registry_pki import install_registry_certificate
        install_registry_certificate()
    """
    pki = settings.pki()
    dns, ips = registry_names()
    certs = pki.certs_dir
    owner, group, _ = anonymous(current_distro())
    files.directory(name=f"Create {certs}", path=certs, mode="0755", present=True)
    leaf: dict[str, Any] = {"pki_dir": pki.pki_dir, "leaf": leaf_name(), "dns": dns, "ips": ips}
    return [
        pki_file(
            name="Push the registry certificate",
            kind="server",
            part="cert",
            dest=f"{certs}/registry.crt",
            mode="0644",
            **leaf,
        ),
        pki_file(
            name=f"Push the registry key (0600, owned by {owner}, the registry's user)",
            kind="server",
            part="key",
            dest=f"{certs}/registry.key",
            user=owner,
            group=group,
            mode="0600",
            **leaf,
        ),
        pki_file(
            name="Push the fleet CA certificate (never its key)",
            pki_dir=pki.pki_dir,
            kind="ca",
            dest=f"{certs}/ca.crt",
            mode="0644",
        ),
    ]
