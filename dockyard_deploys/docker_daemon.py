"""The one owner of /etc/docker/daemon.json: merges the keys set by hand in the file, the free-form
`docker_daemon_options` and the keys of every concern in `CONTRIBUTORS` (live-restore, storage
driver, insecure registries), writes the file once, validates it, restarts the engine only on
change — one host at a time, and by a reload where only reloadable keys changed — and rolls back
when the engine does not come up. A key a concern manages may not be set to a
conflicting value in `docker_daemon_options`; a refused storage plan writes nothing and says so."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyinfra.api import deploy

from dockyard_deploys import docker_storage, registry_trust, settings
from dockyard_deploys.operations import daemon_json, merge_config


class DaemonConfigRefused(Exception):
    """daemon.json cannot be written for this host; the message says why and what it held."""


@dataclass(frozen=True)
class Contributor:
    """A concern that owns keys in daemon.json."""

    # The concern's name, as in its module and its keys' prefix.
    concern: str
    # Given the file's content (with docker_daemon_options over it), the concern's keys
    # (None removes a key); raises docker_storage.StorageRefused when the host cannot take it.
    keys: Callable[[dict[str, Any]], dict[str, Any]]
    # Per daemon.json key: the setting to use instead of docker_daemon_options.
    settings_for: dict[str, str]


def daemon_keys(current: dict[str, Any]) -> dict[str, Any]:
    """This concern's own keys: `live-restore` (on unless docker_daemon_live_restore=false), so
    running containers survive the engine restarts dockyard does."""
    return {"live-restore": settings.daemon().live_restore}


# Every concern that writes daemon.json keys, in merge order. Add a concern here, nowhere else.
CONTRIBUTORS: tuple[Contributor, ...] = (
    Contributor(
        "docker_daemon",
        daemon_keys,
        {"live-restore": "docker_daemon_live_restore"},
    ),
    Contributor(
        "docker_storage",
        docker_storage.daemon_keys,
        {
            "storage-driver": "docker_storage_driver",
            "storage-opts": "docker_storage_opts",
            "data-root": "docker_storage_data_root",
        },
    ),
    Contributor(
        "registry_trust",
        registry_trust.daemon_keys,
        {"insecure-registries": "registry_trust_mode"},
    ),
)


def _agrees(option: Any, managed: Any) -> bool:
    """A concern may add to a list set in docker_daemon_options, never take from it or replace a
    value set there."""
    if managed is None:
        return False
    if isinstance(option, list) and isinstance(managed, list):
        return all(item in managed for item in option)
    return bool(option == managed)


def desired_config(current: dict[str, Any], options: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(daemon.json as it must be, the storage driver the engine must then report) for the
    current host, from the file's content and docker_daemon_options; raises DaemonConfigRefused
    when a contributor refuses or an option conflicts with a concern's key."""
    base = merge_config(current, options)
    managed: dict[str, Any] = {}
    refused: list[str] = []
    for contributor in CONTRIBUTORS:
        try:
            keys = contributor.keys(base)
        except docker_storage.StorageRefused as exc:
            refused.append(f"{contributor.concern}: {exc}")
            continue
        for key, value in keys.items():
            if key in options and not _agrees(options[key], value):
                setting = contributor.settings_for.get(key, f"{contributor.concern}_*")
                raise DaemonConfigRefused(
                    f"docker_daemon_options[{key!r}]={options[key]!r} conflicts with "
                    f"{contributor.concern}, which manages {key} ({value!r} on this host): "
                    f"remove it from docker_daemon_options and set {setting} instead"
                )
            managed[key] = value
    wanted = merge_config(base, managed)
    if refused:
        pending = sorted(k for k in wanted if wanted.get(k) != current.get(k))
        pending += sorted(k for k in current if k not in wanted)
        raise DaemonConfigRefused(
            "daemon.json was left as it is because "
            + "; ".join(refused)
            + (f" — so these keys were not written either: {', '.join(pending)}" if pending else "")
        )
    return wanted, str(managed["storage-driver"])


@deploy("Configure the Docker daemon")
def configure_docker_daemon() -> None:
    """
    Write daemon.json from every concern's keys and docker_daemon_options; restart (or reload,
    where only reloadable keys changed) and verify only when it changed, one host at a time.

    + docker_daemon_config_path: the configuration file
    + docker_daemon_options: free-form keys merged into it
    + docker_daemon_live_restore: live-restore, on by default

    Example:

    .. code:: python

        from dockyard_deploys.docker_daemon import configure_docker_daemon
        configure_docker_daemon()
    """
    daemon = settings.daemon()
    # Every host at once: read the file and the engine, and stage the new file where something
    # must change. pyinfra runs a _serial operation host by host even where it changes nothing,
    # so without this step a run that changes nothing read every host's facts one after another.
    staged = daemon_json(
        name="Stage daemon.json where it or the engine needs a change",
        path=daemon.config_path,
        options=daemon.options,
        stage_only=True,
    )
    daemon_json(
        name="Write daemon.json, validate it, restart the engine on change and verify the driver",
        path=daemon.config_path,
        options=daemon.options,
        # One engine at a time: never every host's engine down at once.
        _serial=True,
        _if=staged.did_change,
    )
