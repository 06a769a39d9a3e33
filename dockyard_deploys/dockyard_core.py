"""Install the bundled dockyard core on every host, offline: a wheelhouse is built on the control
machine for each host's Python version and architecture (dockyard's own wheel plus binary wheels
of its dependencies), pushed, and installed into a venv with `pip --no-index`; the `dockyard` CLI
goes on the PATH. The wheelhouse is cached on the control machine by a hash of its inputs."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

from pyinfra import host
from pyinfra.api import DeployError, FactBase, deploy
from pyinfra.operations import files, pip, server

from dockyard_deploys.common import current_distro, install_packages

ROOT = Path(__file__).resolve().parent.parent

DEFAULTS: dict[str, Any] = {
    # Where the venv and the wheelhouse live on hosts.
    "dockyard_core_prefix": "/opt/dockyard",
    # Control-machine cache of built wheelhouses (one per Python version and architecture).
    "dockyard_core_cache": "~/.cache/dockyard/wheelhouse",
}

# What the core needs at run time (pyproject's dependencies), as pip requirement strings.
REQUIREMENTS: tuple[str, ...] = (
    "pyyaml>=6,<7",
    "cryptography>=42,<47",
    "aiohttp>=3.9,<4",
    "bcrypt>=4,<6",
)
# manylinux tags accepted when downloading binary wheels for hosts (glibc 2.17 and newer).
PLATFORMS: tuple[str, ...] = (
    "manylinux2014",
    "manylinux_2_17",
    "manylinux_2_28",
    "manylinux_2_31",
    "manylinux_2_34",
)
_BUILD_LOCK = threading.Lock()


class HostPython(FactBase[dict]):
    """
    The host's python3 version and machine architecture.

    .. code:: python

        # 3.11 x86_64
        {"version": "3.11", "machine": "x86_64"}
    """

    def command(self) -> str:
        return (
            "python3 -c 'import sys, platform; "
            'print("%d.%d" % sys.version_info[:2], platform.machine())\''
        )

    def requires_command(self) -> str:
        return "python3"

    @staticmethod
    def default() -> dict:
        return {}

    def process(self, output) -> dict:
        parts = " ".join(output).split()
        return {"version": parts[0], "machine": parts[1]} if len(parts) == 2 else {}


def _source_hash() -> str:
    hasher = hashlib.sha256()
    for path in sorted((ROOT / "dockyard").rglob("*.py")) + [ROOT / "pyproject.toml"]:
        hasher.update(str(path.relative_to(ROOT)).encode())
        hasher.update(path.read_bytes())
    hasher.update("\n".join(REQUIREMENTS).encode())
    return hasher.hexdigest()[:16]


def build_wheelhouse(version: str, machine: str, cache: str) -> Path:
    """Wheels for Python `version` on `machine`, built once per source hash."""
    target = Path(cache).expanduser() / f"py{version}-{machine}-{_source_hash()}"
    with _BUILD_LOCK:
        if (target / ".complete").exists():
            return target
        work = target.with_name(target.name + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        platforms = [arg for tag in PLATFORMS for arg in ("--platform", f"{tag}_{machine}")]
        steps = [
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--only-binary=:all:",
                "--python-version",
                version,
                "--implementation",
                "cp",
                *platforms,
                "-d",
                str(work),
                *REQUIREMENTS,
            ],
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "-w",
                str(work),
                str(ROOT),
            ],
        ]
        for cmd in steps:
            _pip(cmd, version, machine)
        # pip evaluates dependency markers (python_version < "3.11") for the running Python,
        # not the target: add what the target's markers ask for until nothing is missing.
        for _ in range(5):
            missing = _missing_marker_requirements(work, version, machine)
            if not missing:
                break
            _pip([*steps[0][: -len(REQUIREMENTS)], *missing], version, machine)
        (work / ".complete").write_text("ok\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(work, target)
        return target


def _pip(cmd: list[str], version: str, machine: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DeployError(
            f"building the dockyard wheelhouse for Python {version} ({machine}) failed: "
            f"{proc.stderr.strip()[-800:]}"
        )


def _missing_marker_requirements(work: Path, version: str, machine: str) -> list[str]:
    """Requirements of the wheels in `work` whose markers hold on the target but that no wheel
    in `work` provides."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    env.update(
        python_version=version,
        python_full_version=f"{version}.0",
        platform_machine=machine,
        sys_platform="linux",
        platform_system="Linux",
        implementation_name="cpython",
        platform_python_implementation="CPython",
    )
    present = set()
    requires: list[Requirement] = []
    for wheel in work.glob("*.whl"):
        present.add(canonicalize_name(wheel.name.split("-")[0]))
        with zipfile.ZipFile(wheel) as archive:
            meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            for line in archive.read(meta).decode("utf-8", "replace").splitlines():
                if line.startswith("Requires-Dist:"):
                    requires.append(Requirement(line.split(":", 1)[1].strip()))
    missing = []
    for req in requires:
        if req.marker is None or "extra" in str(req.marker):
            continue
        if req.marker.evaluate(env) and canonicalize_name(req.name) not in present:
            missing.append(str(req).split(";")[0].strip())
    return sorted(set(missing))


def venv_bin(data: Any) -> str:
    return f"{data.get('dockyard_core_prefix') or DEFAULTS['dockyard_core_prefix']}/venv/bin"


@deploy("Install the dockyard core", data_defaults=DEFAULTS)
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
    prefix = str(host.data.get("dockyard_core_prefix"))
    wheelhouse = build_wheelhouse(
        facts["version"], facts["machine"], str(host.data.get("dockyard_core_cache"))
    )
    venv_package = "python3-venv" if distro.family == "debian" else "python3"
    install_packages(f"Install {venv_package} for the dockyard core", [venv_package], distro)
    synced = files.sync(
        name=f"Push the dockyard wheelhouse (Python {facts['version']}, {facts['machine']})",
        src=str(wheelhouse),
        dest=f"{prefix}/wheelhouse",
        delete=True,
        exclude=".complete",
    )
    venv = pip.venv(name=f"Create the venv {prefix}/venv", path=f"{prefix}/venv", python="python3")
    installed = server.shell(
        name="Install the dockyard core from the wheelhouse (offline)",
        commands=[
            f"{prefix}/venv/bin/pip install --quiet --no-index --find-links {prefix}/wheelhouse "
            "--force-reinstall dockyard"
        ],
        _if=lambda: synced.did_change() or venv.did_change(),
    )
    files.link(
        name="Put the dockyard CLI on the PATH",
        path="/usr/local/bin/dockyard",
        target=f"{prefix}/venv/bin/dockyard",
    )
    return installed
