"""NFS exports on storage hosts from structured data: each exported directory owned by the
anonymous user (never world-writable), clients limited to the fleet's own addresses unless told
otherwise, `rw,sync,all_squash` with anonuid/anongid by default. The kernel server per distro
(`exportfs -ra` only when the exports changed), or nfs-ganesha (NFSv4, VFS backend) where the
kernel has no NFS server — as in the lab — or when `nfs_server_impl` says so. Only hosts in the
`storage` group export; settings: `settings.NfsServerSettings` (`nfs_server_*`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pyinfra import host, inventory, logger
from pyinfra.api import DeployError, deploy
from pyinfra.operations import files, server, systemd

from dockyard_deploys import settings
from dockyard_deploys.common import Distro, current_distro, install_packages, unsupported
from dockyard_deploys.facts import KernelNfs
from dockyard_deploys.settings import NfsServerSettings

TEMPLATES = Path(__file__).resolve().parent / "templates"

# Hosts in this group run `configure_nfs_server` (deploy.py): only they export anything.
STORAGE_GROUP = "storage"

# The anonymous user and group per family and major version.
ANON: dict[str, tuple[str, str, int]] = {
    "debian": ("nobody", "nogroup", 65534),
    "rhel-7": ("nfsnobody", "nfsnobody", 65534),
    "rhel": ("nobody", "nobody", 65534),
}
# The kernel server's unit by its own name: on Debian `nfs-kernel-server.service` is only an alias
# of nfs-server.service, which `systemctl is-enabled` reports as "alias" — never "enabled", so
# a deploy naming the alias enabled it again on every run (seen on the lab's storage VM).
KERNEL_SERVER: dict[str, dict[str, Any]] = {
    "debian": {"packages": ["nfs-kernel-server"], "service": "nfs-server.service"},
    "rhel": {"packages": ["nfs-utils"], "service": "nfs-server.service"},
}
GANESHA_PACKAGES: dict[str, list[str]] = {
    "debian": ["nfs-ganesha", "nfs-ganesha-vfs"],
    "rhel": ["nfs-ganesha", "nfs-ganesha-vfs"],
}
EXPORTS_FILE = "/etc/exports.d/dockyard.exports"
GANESHA_CONF = "/etc/ganesha/ganesha.conf"


@dataclass(frozen=True)
class Export:
    path: str
    clients: list[str]
    options: str
    owner: str
    group: str
    mode: str
    pseudo: str
    access: str
    squash: str
    anonuid: int
    anongid: int


def anonymous(distro: Distro) -> tuple[str, str, int]:
    if distro.family == "rhel":
        return ANON["rhel-7"] if distro.major <= 7 else ANON["rhel"]
    return ANON["debian"]


def fleet_addresses() -> list[str]:
    """Every inventory host's address (ssh_hostname, or its name): the default clients."""
    out = []
    for fleet_host in inventory:
        address = fleet_host.data.get("ssh_hostname") or fleet_host.name
        if address not in out and address != "@local":
            out.append(str(address))
    return sorted(out)


def plan_exports(
    distro: Distro, server: NfsServerSettings, default_clients: list[str]
) -> list[Export]:
    """Fill in the validated exports' per-distro defaults (pure; tested with fake data)."""
    anon_user, anon_group, anon_id = anonymous(distro)
    uid = anon_id if server.anon_uid is None else server.anon_uid
    gid = anon_id if server.anon_gid is None else server.anon_gid
    out = []
    for spec in server.exports:
        clients = list(spec.clients or default_clients)
        if not clients:
            raise DeployError(f"export {spec.path}: no clients (the inventory has no addresses)")
        if "*" in clients:
            logger.warning(
                f"NFS export {spec.path} is open to every client ('*'): set clients to "
                "your fleet's addresses unless that is intended"
            )
        options = spec.options or (
            f"rw,sync,all_squash,no_subtree_check,anonuid={uid},anongid={gid}"
        )
        opts = options.split(",")
        squash = (
            "All_Squash"
            if "all_squash" in opts
            else "No_Root_Squash"
            if "no_root_squash" in opts
            else "Root_Squash"
        )
        values = dict(o.split("=", 1) for o in opts if "=" in o)
        out.append(
            Export(
                path=spec.path,
                clients=clients,
                options=options,
                owner=spec.owner or anon_user,
                group=spec.group or anon_group,
                mode=spec.mode,
                pseudo=spec.pseudo or spec.path,
                access="RW" if "rw" in opts else "RO",
                squash=squash,
                anonuid=int(values.get("anonuid", uid)),
                anongid=int(values.get("anongid", gid)),
            )
        )
    return out


def choose_impl(impl: Optional[str], kernel_server: bool) -> str:
    """The NFS server to run: `nfs_server_impl`, or the kernel's where it has nfsd."""
    if impl is None:
        return "kernel" if kernel_server else "ganesha"
    if impl == "kernel" and not kernel_server:
        raise DeployError(
            "nfs_server_impl='kernel' but this kernel has no NFS server (nfsd); use 'ganesha'"
        )
    return impl


def current_exports() -> list[Export]:
    return plan_exports(current_distro(), settings.nfs_server(), fleet_addresses())


@deploy("Export NFS volumes")
def configure_nfs_server() -> None:
    """
    Export directories over NFS to the fleet, owned by the anonymous user.

    + nfs_server_exports: list of {path, clients, options, owner, group, mode}
    + nfs_server_impl: ``kernel`` or ``ganesha`` (default from the kernel)
    + nfs_server_anon_uid / nfs_server_anon_gid: squash target

    Example:

    .. code:: python

        from dockyard_deploys.nfs_server import configure_nfs_server
        configure_nfs_server()
    """
    distro = current_distro()
    if distro.family not in KERNEL_SERVER:
        raise unsupported("The NFS server deploy", distro)
    exports = current_exports()
    impl = choose_impl(settings.nfs_server().impl, host.get_fact(KernelNfs)["server"])
    packages = (
        KERNEL_SERVER[distro.family]["packages"]
        if impl == "kernel"
        else GANESHA_PACKAGES[distro.family]
    )
    install_packages(f"Install the NFS server ({impl}: {', '.join(packages)})", packages, distro)
    for export in exports:
        files.directory(
            name=f"Own {export.path} by {export.owner}:{export.group} (mode {export.mode})",
            path=export.path,
            user=export.owner,
            group=export.group,
            mode=export.mode,
            present=True,
        )
    if impl == "kernel":
        service = KERNEL_SERVER[distro.family]["service"]
        files.directory(name="Create /etc/exports.d", path="/etc/exports.d", mode="0755")
        table = files.template(
            name=f"Write {EXPORTS_FILE}",
            src=str(TEMPLATES / "exports.j2"),
            dest=EXPORTS_FILE,
            mode="0644",
            exports=exports,
        )
        systemd.service(
            name="Keep the NFS server running and enabled",
            service=service,
            running=True,
            enabled=True,
        )
        server.shell(
            name="Re-export (exportfs -ra) because the exports changed",
            commands=["exportfs -ra"],
            _if=table.did_change,
        )
        return
    conf = files.template(
        name=f"Write {GANESHA_CONF}",
        src=str(TEMPLATES / "ganesha.conf.j2"),
        dest=GANESHA_CONF,
        mode="0644",
        exports=exports,
        graceless=True,
    )
    systemd.service(
        name="Keep nfs-ganesha running and enabled",
        service="nfs-ganesha.service",
        running=True,
        enabled=True,
    )
    systemd.service(
        name="Restart nfs-ganesha because its exports changed",
        service="nfs-ganesha.service",
        restarted=True,
        _if=conf.did_change,
    )


def export_holding(path: str) -> Optional[Export]:
    """The export of this host that holds `path`, if any. Only hosts in the `storage` group
    export: on any other host there is none, whatever the NFS server's defaults say."""
    if STORAGE_GROUP not in host.groups:
        return None
    for export in current_exports():
        if path == export.path or path.startswith(export.path.rstrip("/") + "/"):
            return export
    return None
