"""Docker named volumes and host volume directories on Docker hosts: each declared volume exists
with exactly its driver, options and labels (the `nfs` shorthand becomes the local driver's
`type=nfs` options, its server by default the fleet's storage host); a volume whose options or
labels drifted is recreated only when no container uses it; nothing is removed unless its `state`
is `absent`. Host directories get their owner, group and mode. Settings:
`settings.VolumeSettings` (`docker_volumes`, `docker_volume_dirs`), validated when they are
built."""

from __future__ import annotations

from typing import Optional

from pyinfra import inventory
from pyinfra.api import deploy
from pyinfra.operations import files

from dockyard_deploys import settings
from dockyard_deploys.operations import docker_volume
from dockyard_deploys.settings import VolumeSpec


def storage_address() -> Optional[str]:
    """The address of the fleet's NFS server (the first host of the `storage` group: its
    ssh_hostname, or its name), the server of an `nfs` shorthand that names none."""
    hosts = inventory.get_group("storage", None) or []
    if not hosts:
        return None
    first = hosts[0]
    return str(first.data.get("ssh_hostname") or first.name)


def describe(volume: VolumeSpec, options: dict[str, str]) -> str:
    """How a volume reads in the run output: `wp_content (nfs 10.0.0.5:/srv/exports/wp)`."""
    if volume.state == "absent":
        return f"Remove the Docker volume {volume.name}"
    if volume.nfs is not None:
        server = options["o"].split(",", 1)[0].split("=", 1)[1]
        where = f"NFS {server}:{volume.nfs.path}"
    else:
        where = f"driver {volume.driver}"
    return f"Docker volume {volume.name} ({where})"


@deploy("Docker volumes and host volume directories")
def configure_docker_volumes() -> None:
    """
    Create the host volume directories, then the named volumes; recreate a volume whose options
    or labels drifted only when no container uses it; remove only what is marked absent.

    + docker_volumes: list of {name, driver, nfs: {server, path, options}, driver_opts, labels,
      state}
    + docker_volume_dirs: list of {path, owner, group, mode, state, world_writable}

    Example:

    .. code:: python

        from dockyard_deploys.docker_volumes import configure_docker_volumes
        configure_docker_volumes()
    """
    wanted = settings.volumes()
    for directory in wanted.volume_dirs:
        present = directory.state == "present"
        files.directory(
            name=(
                f"Host volume directory {directory.path} ({directory.owner}:{directory.group} "
                f"{directory.mode})"
                if present
                else f"Remove the host volume directory {directory.path}"
            ),
            path=directory.path,
            present=present,
            user=directory.owner if present else None,
            group=directory.group if present else None,
            mode=directory.mode if present else None,
        )
    server = storage_address()
    for volume in wanted.volumes:
        options = volume.driver_options(server)
        docker_volume(
            name=describe(volume, options),
            volume=volume.name,
            driver=volume.driver,
            options=options,
            labels=volume.labels,
            present=volume.state == "present",
        )
