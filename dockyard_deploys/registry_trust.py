"""Registry trust on every Docker host: by default the fleet CA at
`/etc/docker/certs.d/<host:port>/ca.crt` (root, 0444), optionally in the OS trust store;
`insecure` only when asked for — merged into the one daemon.json as `insecure-registries`, or the
`INSECURE_REGISTRY` line of `/etc/sysconfig/docker` on legacy RHEL engines — with a warning."""

from __future__ import annotations

from typing import Any, Optional

from pyinfra import host, inventory, logger
from pyinfra.api import DeployError, deploy
from pyinfra.operations import files, server, systemd

from dockyard import pki
from dockyard_deploys.common import current_distro

DEFAULTS: dict[str, Any] = {
    # "certs.d" (verify the registry with the fleet CA) or "insecure" (no TLS verification).
    "registry_trust_mode": "certs.d",
    # Also add the fleet CA to the OS trust store (update-ca-certificates / update-ca-trust).
    "registry_trust_os_store": False,
    # Port the registry listens on (the endpoint is the first registry host's address:port).
    "registry_port": 5443,
}

OS_STORE: dict[str, tuple[str, str]] = {
    "debian": ("/usr/local/share/ca-certificates/dockyard-fleet-ca.crt", "update-ca-certificates"),
    "rhel": ("/etc/pki/ca-trust/source/anchors/dockyard-fleet-ca.crt", "update-ca-trust extract"),
}


def registry_endpoint() -> Optional[str]:
    """`address:port` of the fleet's registry (the first host of the registry group)."""
    hosts = inventory.get_group("registry", None) or []
    if not hosts:
        return None
    first = hosts[0]
    address = str(first.data.get("ssh_hostname") or first.name)
    if ":" in address:
        address = f"[{address}]"
    port = int(first.data.get("registry_port") or DEFAULTS["registry_port"])
    return f"{address}:{port}"


def pki_dir() -> str:
    return str(host.data.get("registry_pki_dir") or "~/.local/share/dockyard/pki")


def mutual_tls() -> bool:
    """Whether the fleet registry asks for client certificates (its registry_client_certs)."""
    hosts = inventory.get_group("registry", None) or []
    return bool(hosts and hosts[0].data.get("registry_client_certs"))


def trust_mode() -> str:
    mode = str(host.data.get("registry_trust_mode") or DEFAULTS["registry_trust_mode"])
    if mode not in ("certs.d", "insecure"):
        raise DeployError(f"registry_trust_mode={mode!r} is not valid; valid: certs.d, insecure")
    return mode


def legacy_sysconfig() -> bool:
    """RHEL/CentOS 7 with the distro's docker 1.13 reads /etc/sysconfig/docker."""
    distro = current_distro()
    return (
        distro.family == "rhel"
        and distro.major <= 7
        and host.data.get("docker_engine_source") == "distro"
    )


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


@deploy("Trust the fleet registry", data_defaults=DEFAULTS)
def configure_registry_trust() -> None:
    """
    Make the engine trust the fleet registry: certs.d by default, insecure only when asked.

    + registry_trust_mode: ``certs.d`` or ``insecure``
    + registry_trust_os_store: also trust the CA system-wide
    + registry_port: the registry's port

    Example:

    .. code:: python

        from dockyard_deploys.registry_trust import configure_registry_trust
        configure_registry_trust()
    """
    endpoint = registry_endpoint()
    if endpoint is None:
        return
    mode = trust_mode()
    ca_cert, _ = pki.ensure_ca(pki_dir())
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
    files.put(
        name=f"Trust the fleet CA for {endpoint} (certs.d, 0444)",
        src=str(ca_cert),
        dest=f"{directory}/ca.crt",
        user="root",
        group="root",
        mode="0444",
    )
    if mutual_tls():
        client = pki.ensure_client_cert(pki_dir(), f"client-{host.name}")
        files.put(
            name=f"Install this host's client certificate for {endpoint}",
            src=str(client.cert),
            dest=f"{directory}/client.cert",
            user="root",
            group="root",
            mode="0444",
        )
        files.put(
            name=f"Install this host's client key for {endpoint} (0600)",
            src=str(client.key),
            dest=f"{directory}/client.key",
            user="root",
            group="root",
            mode="0600",
        )
    if host.data.get("registry_trust_os_store"):
        family = current_distro().family
        path, command = OS_STORE[family]
        anchor = files.put(
            name="Add the fleet CA to the OS trust store", src=str(ca_cert), dest=path, mode="0644"
        )
        server.shell(
            name=f"Refresh the OS trust store ({command})",
            commands=[command],
            _if=anchor.did_change,
        )
