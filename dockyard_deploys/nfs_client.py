"""NFS mounts on client hosts: one fstab line per mount point (replaced when it changes, never
duplicated, with `_netdev`), the mount point created, and mounted now where the kernel has an
NFS client — otherwise the run says plainly that only fstab was written. Settings:
`settings.NfsClientSettings` (`nfs_client_*`), validated when they are built."""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import files, systemd

from dockyard_deploys import settings
from dockyard_deploys.common import current_distro, install_packages, unsupported
from dockyard_deploys.operations import fstab_entry, mount_now
from dockyard_deploys.settings import NfsMount

CLIENT_PACKAGES: dict[str, list[str]] = {"debian": ["nfs-common"], "rhel": ["nfs-utils"]}


def plan_mounts() -> list[NfsMount]:
    """This host's NFS mounts (validated in its settings)."""
    return list(settings.nfs_client().mounts)


@deploy("Mount NFS volumes")
def configure_nfs_client() -> None:
    """
    Write fstab entries for NFS volumes and mount them where the kernel can.

    + nfs_client_mounts: list of {src, path, options, fstype}
    + nfs_client_options: default mount options
    + nfs_client_extra_packages: more client packages

    Example:

    .. code:: python

        from dockyard_deploys.nfs_client import configure_nfs_client
        configure_nfs_client()
    """
    client = settings.nfs_client()
    if not client.mounts and not client.extra_packages:
        return
    distro = current_distro()
    if distro.family not in CLIENT_PACKAGES:
        raise unsupported("The NFS client deploy", distro)
    packages = CLIENT_PACKAGES[distro.family] + list(client.extra_packages)
    install_packages(f"Install the NFS client ({', '.join(packages)})", packages, distro)
    for mount in client.mounts:
        files.directory(name=f"Create the mount point {mount.path}", path=mount.path, present=True)
        fstab = fstab_entry(
            name=f"Mount {mount.src} at {mount.path} (fstab)",
            mountpoint=mount.path,
            line=mount.fstab_line,
        )
        systemd.daemon_reload(name="Reload systemd for the new fstab", _if=fstab.did_change)
        mount_now(name=f"Mount {mount.path} now if the kernel can", path=mount.path)
