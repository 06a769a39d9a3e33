"""pyinfra inventory of the running local lab (`dockyard-lab up`): ssh hosts with the lab key and
known_hosts, grouped by role. The last host gets a btrfs data root on a loop file, so the lab
covers both overlay2 on ext4 and btrfs. Works from any working directory: `inventory/group_data`
links to the project's `group_data/` (pyinfra reads `group_data/` beside the inventory file and in
the working directory).

The lab also closes the push-to-staging loop (README "Push to staging"): a `staging` group of two
container Docker hosts (neither the storage nor the registry host), and the registry host sending
its push events to a receiver on the control machine — the lab network's gateway, port
LAB_RECEIVER_PORT, with a bearer token kept in the lab's state directory. Nothing needs to listen
there: the registry's durable queue keeps the events and retries until a receiver answers."""

import sys
from pathlib import Path
from typing import Any

# pyinfra puts only the working directory on sys.path: this checkout's packages come first.
_CHECKOUT = str(Path(__file__).resolve().parent.parent)
if _CHECKOUT not in sys.path:
    sys.path.insert(0, _CHECKOUT)

from dockyard_lab import defaults
from dockyard_lab.docker import DockerError, docker
from dockyard_lab.inventory import lab_groups, lab_secret

# Port of the control machine's receiver on the lab network's gateway (`dockyard receive`).
LAB_RECEIVER_PORT = 9443
# Hosts of the staging group: this many container Docker hosts after the storage/registry host.
LAB_STAGING_HOSTS = 2


def lab_receiver_token() -> str:
    """The bearer token the registry sends to the lab's receiver: made once (0600) in the lab's
    state directory, `<lab>.receiver-token`."""
    return lab_secret("receiver-token", 32)


def lab_gateway() -> str:
    """The control machine's address on the lab network (its Docker network's gateway)."""
    out = docker(
        "network", "inspect", defaults.LAB_NAME, "--format", "{{(index .IPAM.Config 0).Gateway}}"
    )
    return out.strip()


def _close_the_loop(groups: dict[str, list[tuple[str, dict[str, Any]]]]) -> None:
    """The lab's staging group, and the registry host's notification endpoint (the control
    machine's receiver; the registry verifies its certificate, issued from the fleet CA, with the
    fleet CA: `registry_notifications_fleet_ca`, on by default)."""
    special = {name for group in ("storage", "registry") for name, _ in groups.get(group, [])}
    containers = [
        (name, data)
        for name, data in groups.get("docker_hosts", [])
        if data.get("lab_kind") == "container" and name not in special
    ]
    if len(containers) >= LAB_STAGING_HOSTS:
        groups["staging"] = containers[:LAB_STAGING_HOSTS]
    try:
        gateway = lab_gateway()
    except DockerError:
        return
    if not gateway:
        return
    for _, data in groups.get("registry", [])[:1]:
        data["registry_notifications"] = [
            {
                "name": "lab-receiver",
                "url": f"https://{gateway}:{LAB_RECEIVER_PORT}/events",
                "headers": {"Authorization": [f"Bearer {lab_receiver_token()}"]},
                "timeout": "2s",
                "ignoredmediatypes": ["application/octet-stream"],
                "ignore": {"actions": ["pull", "mount", "delete"]},
            }
        ]


_groups = lab_groups()
_close_the_loop(_groups)
globals().update(_groups)
