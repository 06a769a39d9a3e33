"""Turn the running lab into pyinfra inventory groups: every host over ssh (the production
connector) with strict host-key checking against the lab's known_hosts."""

from __future__ import annotations

from typing import Any

from dockyard.lab.docker import DockerError
from dockyard.lab.fleet import status

# Host data of the lab's btrfs host: a sparse loop file formatted btrfs under the data root.
BTRFS_HOST_DATA: dict[str, Any] = {
    "docker_storage_device": "/srv/dockyard/docker-data.img",
    "docker_storage_device_fs": "btrfs",
    "docker_storage_device_size": "4G",
}


def lab_groups() -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Inventory groups {group: [(name, data), ...]} of the running lab hosts."""
    hosts = [h for h in status() if h.state == "running"]
    if not hosts:
        raise DockerError("no running lab hosts: run `dockyard lab up` (or `make deploy`) first")
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for index, lab_host in enumerate(hosts):
        data: dict[str, Any] = {
            "ssh_hostname": lab_host.address,
            "ssh_user": lab_host.ssh_user,
            "ssh_key": lab_host.ssh_key,
            "ssh_known_hosts_file": lab_host.ssh_known_hosts,
            "ssh_strict_host_key_checking": "yes",
            "ssh_allow_agent": False,
            "ssh_look_for_keys": False,
            "lab_release": lab_host.release,
        }
        if index == len(hosts) - 1 and len(hosts) > 1:
            data.update(BTRFS_HOST_DATA)
        for group in lab_host.groups:
            groups.setdefault(group, []).append((lab_host.name, data))
    return groups
