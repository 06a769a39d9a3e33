"""The one owner of /etc/docker/daemon.json: merges the keys every concern contributes (storage
driver, insecure registries) with the keys set by hand, writes the file once, validates it,
restarts the engine only on change and rolls back when the engine does not come up."""

from __future__ import annotations

from typing import Any

from pyinfra.api import deploy

from dockyard_deploys import docker_storage, registry_trust
from dockyard_deploys.operations import daemon_json

DEFAULTS: dict[str, Any] = {
    # Path of the engine's configuration file.
    "docker_daemon_config_path": "/etc/docker/daemon.json",
}


def managed_keys(current: dict[str, Any]) -> dict[str, Any]:
    """Every key dockyard manages in daemon.json for the current host (None removes a key):
    the storage driver's, and the registry trust's insecure-registries."""
    keys: dict[str, Any] = {}
    try:
        keys.update(docker_storage.current_plan().daemon_keys())
    except docker_storage.StorageRefused:
        pass
    keys.update(registry_trust.daemon_keys(current))
    return keys


@deploy("Configure the Docker daemon", data_defaults=DEFAULTS)
def configure_docker_daemon() -> None:
    """
    Write daemon.json from every concern's keys; restart and verify only when it changed.

    + docker_daemon_config_path: the configuration file

    Example:

    .. code:: python

        from dockyard_deploys.docker_daemon import configure_docker_daemon
        configure_docker_daemon()
    """
    from pyinfra import host

    daemon_json(
        name="Write daemon.json, validate it, restart the engine on change and verify the driver",
        keys=managed_keys,
        path=str(host.data.get("docker_daemon_config_path")),
    )
