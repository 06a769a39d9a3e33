"""Install, enable and start the Docker engine per distribution: Debian/Ubuntu from the distro
(`docker.io`) or Docker's repository (`docker-ce`), the RHEL family from Docker's repository
(CentOS 7 may also use its legacy distro `docker`). Per-distro differences live in the tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pyinfra import host
from pyinfra.api import DeployError, deploy
from pyinfra.operations import apt, dnf, files, systemd, yum

from dockyard_deploys import settings
from dockyard_deploys.common import Distro, current_distro, install_packages, unsupported
from dockyard_deploys.facts import KernelAppArmor
from dockyard_deploys.settings import EngineSettings

# Releases the engine deploy supports, by Distro.key.
SUPPORTED: tuple[str, ...] = (
    "debian-11",
    "debian-12",
    "debian-13",
    "ubuntu-22.04",
    "ubuntu-24.04",
    "centos-7",
    "rhel-8",
    "rhel-9",
    "rocky-8",
    "rocky-9",
    "almalinux-8",
    "almalinux-9",
)

# Major engine version each distro's own package ships, used to plan storage before the engine
# is installed (devicemapper exists only up to 24; `dockerd --validate` from 23).
DISTRO_ENGINE_MAJOR: dict[str, int] = {
    "debian-11": 20,
    "debian-12": 20,
    "debian-13": 26,
    "ubuntu-22.04": 24,
    "ubuntu-24.04": 24,
    "centos-7": 1,
}

# Newest docker-ce major per distro when no version is pinned (CentOS 7 builds ended at 26).
DOCKER_CE_MAJOR: dict[str, int] = {"centos-7": 26}
DOCKER_CE_MAJOR_DEFAULT = 28

# Path of Docker's repository for each distribution ID.
DOCKER_CE_REPO_DIST: dict[str, str] = {
    "debian": "debian",
    "ubuntu": "ubuntu",
    "centos": "centos",
    "rocky": "centos",
    "almalinux": "centos",
    "rhel": "rhel",
}

DOCKER_CE_PACKAGES: tuple[str, ...] = ("docker-ce", "docker-ce-cli", "containerd.io")


@dataclass(frozen=True)
class EnginePlan:
    """What to install on one host: packages, an optional repository, the expected major."""

    family: str
    source: str
    packages: list[str]
    expected_major: int
    repo_key_url: Optional[str] = None
    repo_line: Optional[str] = None
    repo_file_url: Optional[str] = None


def engine_plan(distro: Distro, engine: EngineSettings) -> EnginePlan:
    """Choose source and packages for `distro` from the engine settings (pure, tested per
    distro)."""
    if distro.key not in SUPPORTED:
        raise unsupported("The Docker engine deploy", distro)
    source = engine.source or ("docker-ce" if distro.family == "rhel" else "distro")
    version = engine.version
    base = engine.repo_url
    if source == "distro":
        if distro.key not in DISTRO_ENGINE_MAJOR:
            raise unsupported("docker_engine_source='distro' (no engine package)", distro)
        if version:
            raise DeployError(
                "docker_engine_version only applies to docker_engine_source='docker-ce' "
                f"(got {version!r} with the distro's package)"
            )
        package = "docker" if distro.family == "rhel" else "docker.io"
        return EnginePlan(
            family=distro.family,
            source=source,
            packages=[package],
            expected_major=DISTRO_ENGINE_MAJOR[distro.key],
        )
    expected = DOCKER_CE_MAJOR.get(distro.key, DOCKER_CE_MAJOR_DEFAULT)
    if version:
        expected = int(version.split(".")[0])
    repo_dist = DOCKER_CE_REPO_DIST[distro.id]
    if distro.family == "debian":
        packages = list(DOCKER_CE_PACKAGES)
        if version:
            packages = [f"{p}=5:{version}*" for p in packages[:2]] + [packages[2]]
        return EnginePlan(
            family="debian",
            source=source,
            packages=packages,
            expected_major=expected,
            repo_key_url=f"{base}/{repo_dist}/gpg",
            repo_line=(
                "deb [signed-by=/etc/apt/keyrings/docker.asc] "
                f"{base}/{repo_dist} {distro.codename} stable"
            ),
        )
    packages = list(DOCKER_CE_PACKAGES)
    if version:
        packages = [f"{p}-{version}" for p in packages[:2]] + [packages[2]]
    return EnginePlan(
        family="rhel",
        source=source,
        packages=packages,
        expected_major=expected,
        repo_file_url=f"{base}/{repo_dist}/docker-ce.repo",
    )


def current_plan() -> EnginePlan:
    """The engine plan for the host pyinfra is preparing now."""
    return engine_plan(current_distro(), settings.engine())


@deploy("Install and start the Docker engine")
def install_docker_engine() -> None:
    """
    Install the Docker engine from the distro or Docker's repository and keep it running.

    + docker_engine_source: ``distro`` or ``docker-ce`` (default per distro)
    + docker_engine_version: pin of a docker-ce version
    + docker_engine_repo_url: Docker's repository or a mirror of it
    + docker_engine_enabled: start at boot

    Example:

    .. code:: python

        from dockyard_deploys.docker_engine import install_docker_engine
        install_docker_engine()
    """
    distro = current_distro()
    engine = settings.engine()
    plan = engine_plan(distro, engine)
    if plan.family == "debian":
        if plan.repo_key_url and plan.repo_line:
            install_packages(
                "Install what Docker's apt repository needs", ["ca-certificates"], distro
            )
            files.directory(name="Create /etc/apt/keyrings", path="/etc/apt/keyrings", mode="0755")
            files.download(
                name="Download Docker's repository signing key",
                src=plan.repo_key_url,
                dest="/etc/apt/keyrings/docker.asc",
                mode="0644",
            )
            apt.repo(
                name="Add Docker's apt repository",
                src=plan.repo_line,
                filename="docker",
            )
    elif plan.repo_file_url:
        (yum if distro.major <= 7 else dnf).repo(
            name="Add Docker's yum repository", src=plan.repo_file_url
        )
    install_packages(
        f"Install the Docker engine ({', '.join(plan.packages)})", plan.packages, distro
    )
    if plan.family == "debian" and host.get_fact(KernelAppArmor):
        # dockerd loads its docker-default profile with apparmor_parser wherever the kernel
        # enforces AppArmor, and refuses to start any container without it. apt installs it as
        # docker.io's recommendation, unless recommends are off (or the engine came from an
        # image built without them, like the lab's VMs: that is how this was found).
        install_packages(
            "Install apparmor (the kernel enforces AppArmor: dockerd needs apparmor_parser)",
            ["apparmor"],
            distro,
        )
    systemd.service(
        name="Keep the Docker engine running" + (" and enabled at boot" if engine.enabled else ""),
        service="docker.service",
        running=True,
        enabled=engine.enabled,
    )
