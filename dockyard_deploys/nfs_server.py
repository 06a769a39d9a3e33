"""NFS exports on storage hosts from structured data: each exported directory owned by the
anonymous user (never world-writable), clients limited to the fleet's own addresses unless told
otherwise, `rw,sync,all_squash` with anonuid/anongid by default. The kernel server per distro
(`exportfs -ra` only when the exports changed), or nfs-ganesha (NFSv4, VFS backend) where the
kernel has no NFS server — as in the lab — or when `nfs_server_impl` says so."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pyinfra import host, inventory, logger
from pyinfra.api import DeployError, deploy
from pyinfra.operations import files, server, systemd

from dockyard_deploys.common import Distro, current_distro, install_packages, unsupported
from dockyard_deploys.facts import KernelNfs

TEMPLATES = Path(__file__).resolve().parent / "templates"

DEFAULTS: dict[str, Any] = {
    # Exports: path (required), clients (None: every host of the inventory), options
    # (None: rw,sync,all_squash,no_subtree_check,anonuid,anongid), owner/group (None: the
    # anonymous user), mode (0750; world-writable modes are refused).
    "nfs_server_exports": [{"path": "/srv/exports/registry"}],
    # "kernel", "ganesha", or None: the kernel server where the kernel has nfsd, else ganesha.
    "nfs_server_impl": None,
    # uid/gid that every client user is squashed to (None: the distro's anonymous user).
    "nfs_server_anon_uid": None,
    "nfs_server_anon_gid": None,
}

# The anonymous user and group per family and major version.
ANON: dict[str, tuple[str, str, int]] = {
    "debian": ("nobody", "nogroup", 65534),
    "rhel-7": ("nfsnobody", "nfsnobody", 65534),
    "rhel": ("nobody", "nobody", 65534),
}
KERNEL_SERVER: dict[str, dict[str, Any]] = {
    "debian": {"packages": ["nfs-kernel-server"], "service": "nfs-kernel-server.service"},
    "rhel": {"packages": ["nfs-utils"], "service": "nfs-server.service"},
}
GANESHA_PACKAGES: dict[str, list[str]] = {
    "debian": ["nfs-ganesha", "nfs-ganesha-vfs"],
    "rhel": ["nfs-ganesha", "nfs-ganesha-vfs"],
}
EXPORTS_FILE = "/etc/exports.d/dockyard.exports"
GANESHA_CONF = "/etc/ganesha/ganesha.conf"
_CLIENT = re.compile(r"^[A-Za-z0-9.:/*?_-]+$")
_OPTION = re.compile(r"^[a-z_]+(=[A-Za-z0-9_.:/@-]+)?$")


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


def plan_exports(distro: Distro, data: Any, default_clients: list[str]) -> list[Export]:
    """Validate the exports' data and fill in defaults (pure; tested with fake data)."""
    anon_user, anon_group, anon_id = anonymous(distro)
    uid = int(data.get("nfs_server_anon_uid") or anon_id)
    gid = int(data.get("nfs_server_anon_gid") or anon_id)
    raw = data.get("nfs_server_exports")
    exports_data = DEFAULTS["nfs_server_exports"] if raw is None else raw
    if not isinstance(exports_data, list):
        raise DeployError(f"nfs_server_exports must be a list of mappings, got {exports_data!r}")
    out = []
    for item in exports_data:
        if not isinstance(item, dict) or not str(item.get("path", "")).startswith("/"):
            raise DeployError(f"each NFS export needs an absolute path: {item!r}")
        path = str(item["path"]).rstrip("/") or "/"
        if path in ("/", "/etc", "/root", "/var", "/usr", "/home"):
            raise DeployError(f"refusing to export {path}: export a dedicated directory")
        clients = item.get("clients") or default_clients
        if not clients:
            raise DeployError(f"export {path}: no clients (the inventory has no addresses)")
        for client in clients:
            if not _CLIENT.match(str(client)):
                raise DeployError(f"export {path}: client {client!r} is not a host, IP or CIDR")
        if "*" in clients:
            logger.warning(
                f"NFS export {path} is open to every client ('*'): set clients to "
                "your fleet's addresses unless that is intended"
            )
        options = item.get("options") or (
            f"rw,sync,all_squash,no_subtree_check,anonuid={uid},anongid={gid}"
        )
        for option in options.split(","):
            if not _OPTION.match(option):
                raise DeployError(f"export {path}: option {option!r} is not valid")
        mode = str(item.get("mode") or "0750")
        if not re.fullmatch(r"0?[0-7]{3,4}", mode):
            raise DeployError(f"export {path}: mode {mode!r} is not an octal mode like 0750")
        if int(mode, 8) & 0o002:
            raise DeployError(
                f"export {path}: mode {mode} is world-writable; exports are owned by the "
                f"anonymous user ({anon_user}) instead (use 0750 or 0770)"
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
                path=path,
                clients=[str(c) for c in clients],
                options=options,
                owner=str(item.get("owner") or anon_user),
                group=str(item.get("group") or anon_group),
                mode=mode,
                pseudo=str(item.get("pseudo") or path),
                access="RW" if "rw" in opts else "RO",
                squash=squash,
                anonuid=int(values.get("anonuid", uid)),
                anongid=int(values.get("anongid", gid)),
            )
        )
    return out


def choose_impl(data: Any, kernel_server: bool) -> str:
    impl = data.get("nfs_server_impl")
    if impl is None:
        return "kernel" if kernel_server else "ganesha"
    if impl not in ("kernel", "ganesha"):
        raise DeployError(f"nfs_server_impl={impl!r} is not valid; valid: kernel, ganesha")
    if impl == "kernel" and not kernel_server:
        raise DeployError(
            "nfs_server_impl='kernel' but this kernel has no NFS server (nfsd); use 'ganesha'"
        )
    return str(impl)


def current_exports() -> list[Export]:
    return plan_exports(current_distro(), host.data, fleet_addresses())


@deploy("Export NFS volumes", data_defaults=DEFAULTS)
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
    impl = choose_impl(host.data, host.get_fact(KernelNfs)["server"])
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


def exports_for_registry() -> Optional[Export]:
    """The export the registry's data lives in on this host, if any (lab topology)."""
    data_dir = str(host.data.get("registry_data_dir") or "")
    for export in current_exports():
        if data_dir == export.path or data_dir.startswith(export.path + "/"):
            return export
    return None
