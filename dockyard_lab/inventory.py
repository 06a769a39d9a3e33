"""Turn the running lab into pyinfra inventory groups: every host (container or VM) over ssh (the
production connector) with strict host-key checking against the lab's known_hosts."""

from __future__ import annotations

import os
import secrets
from typing import Any

from dockyard_lab import defaults
from dockyard_lab.docker import DockerError
from dockyard_lab.fleet import LabHost, status

# The exported directory on the storage host (on the /srv volume: ganesha needs file handles).
LAB_EXPORT = "/srv/exports/registry"
# Where the other hosts mount it (fstab only: the lab kernel has no NFS client).
LAB_MOUNT = "/mnt/registry"
# The registry's user in the lab (its password is made once, in the lab's state directory).
LAB_REGISTRY_USER = "fleet"

# Host data of the lab's btrfs host: a sparse loop file formatted btrfs under the data root.
BTRFS_HOST_DATA: dict[str, Any] = {
    "docker_storage_device": "/srv/dockyard/docker-data.img",
    "docker_storage_device_fs": "btrfs",
    "docker_storage_device_size": "4G",
}


def _lab_secret(name: str) -> str:
    """A random secret kept in the lab's state directory (0600), made once."""
    path = defaults.lab_state_dir() / f"{defaults.LAB_NAME}.{name}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(18))
    return path.read_text().strip()


def lab_groups() -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Inventory groups {group: [(name, data), ...]} of the running lab hosts.

    Topology: the first host is the NFS server (nfs-ganesha: the kernel has no nfsd) and runs
    the registry with its data in the exported directory; the other containers get fstab entries
    for the export (only written: no NFS client in the kernel) and libnfs-utils to reach it. VM
    hosts (`up --vms N`) are ssh hosts in their own group `vms`, with no role yet."""
    running = [h for h in status() if h.state == "running"]
    hosts = [h for h in running if h.kind == "container"]
    vms = [h for h in running if h.kind == "vm"]
    if not hosts:
        raise DockerError("no running lab hosts: run `dockyard-lab up` (or `make deploy`) first")
    storage = next((h for h in hosts if "storage" in h.groups), hosts[0])
    export = LAB_EXPORT
    common: dict[str, Any] = {
        "registry_pki_dir": str(defaults.lab_state_dir() / f"{defaults.LAB_NAME}-pki"),
        "registry_users": {LAB_REGISTRY_USER: _lab_secret("registry-password")},
        "nfs_server_exports": [{"path": export}],
        "registry_data_dir": export,
    }
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for index, lab_host in enumerate(hosts):
        data: dict[str, Any] = {**_ssh_data(lab_host), **common}
        if lab_host.name != storage.name:
            data["nfs_client_mounts"] = [{"src": f"{storage.address}:{export}", "path": LAB_MOUNT}]
            data["nfs_client_extra_packages"] = ["libnfs-utils"]
        if index == len(hosts) - 1 and len(hosts) > 1:
            data.update(BTRFS_HOST_DATA)
        for group in lab_host.groups:
            groups.setdefault(group, []).append((lab_host.name, data))
    for lab_vm in vms:
        for group in lab_vm.groups:
            groups.setdefault(group, []).append((lab_vm.name, {**_ssh_data(lab_vm), **common}))
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
