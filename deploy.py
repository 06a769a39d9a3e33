"""dockyard's entry point: `pyinfra inventory/lab.py deploy.py`. Only composes the deploys, in
order, by host group; every tunable is host data documented in the README."""

from pyinfra import host

from deploys.docker_daemon import configure_docker_daemon
from deploys.docker_engine import install_docker_engine
from deploys.docker_storage import configure_docker_storage

# Tier 1 — graph-driver storage, on every Docker host.
if "docker_hosts" in host.groups:
    install_docker_engine()
    configure_docker_storage()
    configure_docker_daemon()
