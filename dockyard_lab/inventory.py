"""Turn the running lab into pyinfra inventory groups: every host (container or VM) over ssh (the
production connector) with strict host-key checking against the lab's known_hosts."""

from __future__ import annotations

import os
import secrets
from typing import Any

from dockyard_lab import defaults
from dockyard_lab.docker import DockerError
from dockyard_lab.fleet import LabHost, status

# The registry's exported directory on the storage host (group_data/storage.py exports it; in
# the container-only lab on the /srv volume: ganesha needs file handles).
LAB_EXPORT = "/srv/exports/registry"
# Where the registry host mounts it (the seed topology: the kernel's NFS client, from fstab), and
# where the container Docker hosts get an fstab line for it (only written: no NFS client in the
# machine's kernel; libnfs-utils reaches the export from userspace).
LAB_MOUNT = "/mnt/registry"
# The registry's user in the lab (its password is made once, in the lab's state directory).
LAB_REGISTRY_USER = "fleet"

# Host data of the lab's btrfs host: a sparse loop file formatted btrfs under the data root.
BTRFS_HOST_DATA: dict[str, Any] = {
    "docker_storage_device": "/srv/dockyard/docker-data.img",
    "docker_storage_device_size": "4G",
    "docker_storage_device_fs": "btrfs",
}


def lab_secret(name: str, nbytes: int = 18) -> str:
    """A random secret kept in the lab's state directory (`<lab>.<name>`, 0600), made once."""
    path = defaults.lab_state_dir() / f"{defaults.LAB_NAME}.{name}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(nbytes))
    return path.read_text().strip()


def lab_groups() -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Inventory groups {group: [(name, data), ...]} of the running lab hosts.

    The storage host (group `storage`) exports what group_data/storage.py lists — with the
    kernel NFS server on the seed topology's storage VM, with nfs-ganesha on a container (the
    machine's kernel has no nfsd). The registry host (group `registry`) keeps its data on the
    export: on the seed topology's registry VM through the kernel NFS mount at /mnt/registry
    (fstab), on the container-only lab in the export's directory on the storage host itself. The
    other container Docker hosts get the mount's fstab line only, and libnfs-utils to reach the
    export from userspace. The last container (of two or more) has a btrfs data root."""
    running = [h for h in status() if h.state == "running"]
    if not running:
        raise DockerError("no running lab hosts: run `dockyard-lab up` (or `make deploy`) first")
    containers = [h for h in running if h.kind == "container"]
    storage = next((h for h in running if "storage" in h.groups), running[0])
    registry = next((h for h in running if "registry" in h.groups), storage)
    mount = {"src": f"{storage.address}:{LAB_EXPORT}", "path": LAB_MOUNT}
    common: dict[str, Any] = {
        "registry_pki_dir": str(defaults.lab_state_dir() / f"{defaults.LAB_NAME}-pki"),
        "registry_users": {LAB_REGISTRY_USER: lab_secret("registry-password")},
    }
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for lab_host in containers + [h for h in running if h.kind == "vm"]:
        data: dict[str, Any] = {**_ssh_data(lab_host), **common}
        if lab_host.name == registry.name:
            on_storage = registry.name == storage.name
            data["registry_data_dir"] = LAB_EXPORT if on_storage else LAB_MOUNT
            if not on_storage:
                data["nfs_client_mounts"] = [mount]
        elif lab_host.kind == "container" and lab_host.name != storage.name:
            data["nfs_client_mounts"] = [mount]
            data["nfs_client_extra_packages"] = ["libnfs-utils"]
        if len(containers) > 1 and lab_host.name == containers[-1].name:
            data.update(BTRFS_HOST_DATA)
        for group in lab_host.groups:
            groups.setdefault(group, []).append((lab_host.name, data))
    return groups


def _ssh_data(lab_host: LabHost) -> dict[str, Any]:
    """How pyinfra reaches a lab host: ssh with the lab key, strict host-key checking."""
    return {
        "ssh_hostname": lab_host.address,
        "ssh_user": lab_host.ssh_user,
        "ssh_key": lab_host.ssh_key,
        "ssh_known_hosts_file": lab_host.ssh_known_hosts,
        "ssh_strict_host_key_checking": "yes",
        "ssh_allow_agent": False,
        "ssh_look_for_keys": False,
        "lab_release": lab_host.release,
        "lab_kind": lab_host.kind,
    }
