"""Registry trust on every Docker host: by default the fleet CA at
`/etc/docker/certs.d/<host:port>/ca.crt` (root, 0444), optionally in the OS trust store;
`insecure` only when asked for — contributed to the one daemon.json as `insecure-registries`, or
the `INSECURE_REGISTRY` line of `/etc/sysconfig/docker` on legacy RHEL engines — with a warning.
The endpoint, its port and mutual TLS come from the registry host's `RegistrySettings`."""

from __future__ import annotations

from typing import Any, Optional

from pyinfra import host, inventory, logger
from pyinfra.api import deploy
from pyinfra.operations import files, server, systemd

from dockyard_deploys import settings
from dockyard_deploys.common import current_distro
from dockyard_deploys.operations import pki_file

OS_STORE: dict[str, tuple[str, str]] = {
    "debian": ("/usr/local/share/ca-certificates/dockyard-fleet-ca.crt", "update-ca-certificates"),
    "rhel": ("/etc/pki/ca-trust/source/anchors/dockyard-fleet-ca.crt", "update-ca-trust extract"),
}


def registry_host() -> Optional[Any]:
    """The fleet's registry host: the first host of the `registry` group, if any."""
    hosts = inventory.get_group("registry", None) or []
    return hosts[0] if hosts else None


def registry_endpoint() -> Optional[str]:
    """`address:port` of the fleet's registry (the first host of the registry group, its port
    from that host's registry settings)."""
    first = registry_host()
    if first is None:
        return None
    address = str(first.data.get("ssh_hostname") or first.name)
    if ":" in address:
        address = f"[{address}]"
    return f"{address}:{settings.registry(first).port}"


def mutual_tls() -> bool:
    """Whether the fleet registry asks for client certificates (its registry_client_certs)."""
    first = registry_host()
    return first is not None and settings.registry(first).client_certs


def trust_mode() -> str:
    return settings.trust().mode


def legacy_sysconfig() -> bool:
    """RHEL/CentOS 7 with the distro's docker 1.13 reads /etc/sysconfig/docker."""
    distro = current_distro()
    return distro.family == "rhel" and distro.major <= 7 and settings.engine().source == "distro"


def daemon_keys(current: dict[str, Any]) -> dict[str, Any]:
    """insecure-registries with our endpoint added (insecure) or taken out (certs.d); entries
    set by hand are kept."""
    endpoint = registry_endpoint()
    existing = [e for e in current.get("insecure-registries", []) if isinstance(e, str)]
    if endpoint is None or legacy_sysconfig():
        return {}
    if trust_mode() == "insecure":
        wanted = existing if endpoint in existing else existing + [endpoint]
    else:
        wanted = [e for e in existing if e != endpoint]
    if wanted == existing:
        return {}
    return {"insecure-registries": wanted or None}


@deploy("Trust the fleet registry")
def configure_registry_trust() -> None:
    """
    Make the engine trust the fleet registry: certs.d by default, insecure only when asked.

    + registry_trust_mode: ``certs.d`` or ``insecure``
    + registry_trust_os_store: also trust the CA system-wide
    + registry_port: the registry's port (the registry host's setting)

    Example:

    .. code:: python

        from dockyard_deploys.registry_trust import configure_registry_trust
        configure_registry_trust()
    """
    endpoint = registry_endpoint()
    if endpoint is None:
        return
    mode = trust_mode()
    pki_dir = settings.pki().pki_dir
    if mode == "insecure":
        logger.warning(
            f"{host.print_prefix}registry_trust_mode=insecure: the engine will talk to "
            f"{endpoint} without verifying its certificate (plain HTTP allowed) — anyone on the "
            "path can read or replace the images it pulls"
        )
        if legacy_sysconfig():
            line = files.line(
                name="Allow the insecure registry in /etc/sysconfig/docker (legacy engine)",
                path="/etc/sysconfig/docker",
                line=r"^INSECURE_REGISTRY=.*$",
                replace=f"INSECURE_REGISTRY='--insecure-registry {endpoint}'",
                extended_regex=True,
            )
            systemd.service(
                name="Restart the legacy engine for the insecure registry",
                service="docker.service",
                restarted=True,
                _if=line.did_change,
            )
        return
    directory = f"/etc/docker/certs.d/{endpoint}"
    files.directory(name=f"Create {directory}", path=directory, mode="0755", present=True)
    pki_file(
        name=f"Trust the fleet CA for {endpoint} (certs.d, 0444)",
        pki_dir=pki_dir,
        kind="ca",
        dest=f"{directory}/ca.crt",
        user="root",
        group="root",
        mode="0444",
    )
    if mutual_tls():
        for part, dest, mode in (("cert", "client.cert", "0444"), ("key", "client.key", "0600")):
            pki_file(
                name=f"Install this host's client {part} for {endpoint} ({mode})",
                pki_dir=pki_dir,
                kind="client",
                leaf=f"client-{host.name}",
                part=part,
                dest=f"{directory}/{dest}",
                user="root",
                group="root",
                mode=mode,
            )
    if settings.trust().os_store:
        family = current_distro().family
        path, command = OS_STORE[family]
        anchor = pki_file(
            name="Add the fleet CA to the OS trust store",
            pki_dir=pki_dir,
            kind="ca",
            dest=path,
            mode="0644",
        )
        server.shell(
            name=f"Refresh the OS trust store ({command})",
            commands=[command],
            _if=anchor.did_change,
        )
