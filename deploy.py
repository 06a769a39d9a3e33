"""dockyard's entry point: `pyinfra inventory/lab.py deploy.py`, from any working directory. Only
composes the deploys, in order, by host group; every tunable is host data documented in the
README."""

import sys
from pathlib import Path
from typing import Any, cast

from pyinfra import host

# pyinfra puts only the working directory on sys.path: this checkout's packages come first.
_CHECKOUT = str(Path(__file__).resolve().parent)
if _CHECKOUT not in sys.path:
    sys.path.insert(0, _CHECKOUT)

from dockyard_deploys.docker_daemon import configure_docker_daemon
from dockyard_deploys.docker_engine import install_docker_engine
from dockyard_deploys.docker_storage import configure_docker_storage
from dockyard_deploys.docker_volumes import configure_docker_volumes
from dockyard_deploys.dockyard_core import install_dockyard_core
from dockyard_deploys.nfs_client import configure_nfs_client
from dockyard_deploys.nfs_server import configure_nfs_server
from dockyard_deploys.operations import ordering_point
from dockyard_deploys.receiver import configure_receiver, pull_release_images
from dockyard_deploys.registry import configure_registry
from dockyard_deploys.registry_pki import install_registry_certificate
from dockyard_deploys.registry_trust import configure_registry_trust

# Tier 1 — graph-driver storage, and registry trust in the same daemon.json.
if "docker_hosts" in host.groups:
    install_docker_engine()
    configure_docker_storage()
    configure_registry_trust()
    configure_docker_daemon()
    # The release images (by digest; a staging rollout sets them), through the trust above.
    pull_release_images()

# The bundled core (layer store, registry) on every host.
core = install_dockyard_core()
if "receiver" in host.groups:
    # The registry's event receiver (push to staging), restarted when the core changes.
    configure_receiver(restart_on=[core])

# Tier 2 — persistent volumes.
if "storage" in host.groups:
    configure_nfs_server()
# One step on every host: pyinfra merges the hosts' operation lists, so without it a host could
# mount an export before the storage host has exported it (the registry host did, in the lab).
ordering_point(
    name="Wait until the storage hosts have exported",
    reason="the storage hosts have exported (every host passes this point together)",
)
configure_nfs_client()
if "docker_hosts" in host.groups:
    # Named volumes (NFS-backed through the local driver) and host volume directories.
    configure_docker_volumes()

# Tier 3 — the TLS registry, its data on the NFS-backed path.
if "registry" in host.groups:
    # A new certificate or a new core (the registry runs it) restarts the registry.
    certificate: list[Any] = cast(Any, install_registry_certificate)()
    configure_registry(restart_on=[*certificate, core])
