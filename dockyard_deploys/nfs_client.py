"""NFS mounts on client hosts: one fstab line per mount point (replaced when it changes, never
duplicated, with `_netdev`), the mount point created, and mounted now where the kernel has an
NFS client — otherwise the run says plainly that only fstab was written."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pyinfra import host, logger
from pyinfra.api import DeployError, deploy, operation
from pyinfra.facts.server import Mounts
from pyinfra.operations import files, systemd

from dockyard_deploys.common import current_distro, install_packages, unsupported
from dockyard_deploys.facts import KernelNfs

DEFAULTS: dict[str, Any] = {
    # Mounts: src ("server:/export"), path (mount point), options (default below), fstype.
    "nfs_client_mounts": [],
    # Options of every mount unless it sets its own; _netdev orders it after the network.
    "nfs_client_options": "rw,hard,noatime,_netdev",
    # Extra packages on clients (the lab adds libnfs-utils to reach ganesha without a kernel).
    "nfs_client_extra_packages": [],
}

CLIENT_PACKAGES: dict[str, list[str]] = {"debian": ["nfs-common"], "rhel": ["nfs-utils"]}
_SRC = re.compile(r"^[A-Za-z0-9.\[\]:_-]+:/[A-Za-z0-9._/-]*$")
_OPTIONS = re.compile(r"^[a-z0-9_]+(=[A-Za-z0-9_.:/-]+)?(,[a-z0-9_]+(=[A-Za-z0-9_.:/-]+)?)*$")


@dataclass(frozen=True)
class NfsMount:
    src: str
    path: str
    fstype: str
    options: str

    @property
    def fstab_line(self) -> str:
        return f"{self.src} {self.path} {self.fstype} {self.options} 0 0"


def plan_mounts(data: Any) -> list[NfsMount]:
    """Validate the mounts' data (pure; tested with fake data)."""
    mounts = data.get("nfs_client_mounts") or []
    if not isinstance(mounts, list):
        raise DeployError(f"nfs_client_mounts must be a list of mappings, got {mounts!r}")
    default_options = str(data.get("nfs_client_options") or DEFAULTS["nfs_client_options"])
    out: list[NfsMount] = []
    for item in mounts:
        src, path = str(item.get("src", "")), str(item.get("path", ""))
        if not _SRC.match(src):
            raise DeployError(f"NFS mount source {src!r} is not server:/path")
        if not path.startswith("/") or path == "/" or " " in path:
            raise DeployError(f"NFS mount point {path!r} must be an absolute path")
        options = str(item.get("options") or default_options)
        if not _OPTIONS.match(options):
            raise DeployError(f"NFS mount {path}: options {options!r} are not valid")
        if "_netdev" not in options.split(","):
            options += ",_netdev"
        fstype = str(item.get("fstype") or "nfs4")
        if fstype not in ("nfs", "nfs4"):
            raise DeployError(f"NFS mount {path}: fstype {fstype!r}; valid: nfs, nfs4")
        if any(m.path == path for m in out):
            raise DeployError(f"NFS mount point {path} is listed twice")
        out.append(NfsMount(src, path.rstrip("/"), fstype, options))
    return out


@operation()
def mount_now(path: str):
    """
    Mount an fstab entry now when the kernel has an NFS client; say so when it has none.

    + path: the mount point (as in /etc/fstab)
    """
    mounts = host.get_fact(Mounts)
    if path in mounts:
        host.noop(f"{path} is mounted")
        return
    if not host.get_fact(KernelNfs)["client"]:
        logger.warning(
            f"{host.print_prefix}the kernel has no NFS client: only /etc/fstab was written for "
            f"{path} (it mounts at boot on a kernel with NFS)"
        )
        host.noop(f"{path}: fstab written, not mounted (no NFS client in the kernel)")
        return
    yield f"mount {path} || {{ echo 'dockyard: mounting {path} failed' >&2; exit 1; }}"


@deploy("Mount NFS volumes", data_defaults=DEFAULTS)
def configure_nfs_client() -> None:
    """
    Write fstab entries for NFS volumes and mount them where the kernel can.

    + nfs_client_mounts: list of {src, path, options, fstype}
    + nfs_client_options: default mount options

    Example:

    .. code:: python

        from dockyard_deploys.nfs_client import configure_nfs_client
        configure_nfs_client()
    """
    mounts = plan_mounts(host.data)
    extra = list(host.data.get("nfs_client_extra_packages") or [])
    if not mounts and not extra:
        return
    distro = current_distro()
    if distro.family not in CLIENT_PACKAGES:
        raise unsupported("The NFS client deploy", distro)
    packages = CLIENT_PACKAGES[distro.family] + extra
    install_packages(f"Install the NFS client ({', '.join(packages)})", packages, distro)
    for mount in mounts:
        files.directory(name=f"Create the mount point {mount.path}", path=mount.path, present=True)
        fstab = files.line(
            name=f"Mount {mount.src} at {mount.path} (fstab)",
            path="/etc/fstab",
            line=rf"^\S+\s+{re.escape(mount.path)}\s+.*$",
            replace=mount.fstab_line,
            extended_regex=True,
        )
        systemd.daemon_reload(name="Reload systemd for the new fstab", _if=fstab.did_change)
        mount_now(name=f"Mount {mount.path} now if the kernel can", path=mount.path)
