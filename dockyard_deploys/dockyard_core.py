"""Install the bundled dockyard core on every host, offline: a wheelhouse is built on the control
machine for each host's Python version and architecture (`wheelhouse.py`), pushed, and installed
with `--no-index` into a venv made without pip (the wheelhouse's own pip wheel runs the install);
the `dockyard` CLI goes on the PATH. The wheelhouse is built only while operations execute: change
detection and `pyinfra --dry` create nothing locally."""

from __future__ import annotations

import shlex
from typing import Any

from pyinfra import host, logger
from pyinfra.api import DeployError, deploy
from pyinfra.operations import files, server

from dockyard_deploys import settings
from dockyard_deploys.common import current_distro, install_packages
from dockyard_deploys.facts import HostPython
from dockyard_deploys.operations import core_venv, sync_wheelhouse
from dockyard_deploys.wheelhouse import (  # noqa: F401 (the core's packaging, re-exported)
    REQUIREMENTS,
    build_core_wheel,
    build_wheelhouse,
    wheelhouse_path,
    wheelhouse_ready,
)


def install_command(prefix: str) -> str:
    """The venv's Python runs pip from the wheelhouse's pip wheel (the venv has no pip), offline,
    and reinstalls the core and its dependencies from the wheelhouse."""
    wheels = shlex.quote(f"{prefix}/wheelhouse")
    python = shlex.quote(f"{prefix}/venv/bin/python")
    missing = shlex.quote(f"dockyard: no pip wheel in {prefix}/wheelhouse (push it again)")
    return (
        f"set -- {wheels}/pip-*.whl; "
        f'if ! test -f "$1"; then echo {missing} >&2; exit 1; fi; '
        f'{python} "$1/pip" install --quiet --disable-pip-version-check --no-index '
        f"--find-links {wheels} --force-reinstall dockyard"
    )


@deploy("Install the dockyard core")
def install_dockyard_core() -> Any:
    """
    Push a wheelhouse built on the control machine and install the core into a venv, offline.

    + dockyard_core_prefix: where the venv and wheelhouse live on hosts
    + dockyard_core_cache: control-machine cache of wheelhouses

    Returns the install operation: services that run the core restart when it changed.

    Example:

    .. code:: python

        from dockyard_deploys.dockyard_core import install_dockyard_core
        install_dockyard_core()
    """
    distro = current_distro()
    facts = host.get_fact(HostPython)
    if not facts:
        raise DeployError(f"{host.name} has no python3: install it before the dockyard core")
    core = settings.core()
    prefix, cache = core.prefix, core.cache
    version, machine = facts["version"], facts["machine"]
    venv_package = "python3-venv" if distro.family == "debian" else "python3"
    install_packages(f"Install {venv_package} for the dockyard core", [venv_package], distro)
    # The wheelhouse is built when this operation executes, never while the deploy is defined
    # (so `--dry` builds nothing). One name for every host: pyinfra shows one per operation.
    if not wheelhouse_ready(version, machine, cache):
        logger.info(
            f"{host.print_prefix}the dockyard wheelhouse for Python {version} ({machine}) is not "
            f"in {cache} yet: it is built when operations run (never with --dry)"
        )
    synced = sync_wheelhouse(
        name="Push the dockyard wheelhouse (built on the control machine if not cached)",
        version=version,
        machine=machine,
        cache=cache,
        dest=f"{prefix}/wheelhouse",
    )
    venv = core_venv(name=f"Create the venv {prefix}/venv", path=f"{prefix}/venv")
    installed = server.shell(
        name="Install the dockyard core from the wheelhouse (offline)",
        commands=[install_command(prefix)],
        _if=lambda: synced.did_change() or venv.did_change(),
    )
    files.link(
        name="Put the dockyard CLI on the PATH",
        path="/usr/local/bin/dockyard",
        target=f"{prefix}/venv/bin/dockyard",
    )
    return installed
