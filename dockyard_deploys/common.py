"""What every deploy needs to know about a host's distribution: one `Distro` value built from
pyinfra's LinuxDistribution fact, and the one error for hosts a concern does not support."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from pyinfra import host
from pyinfra.api import DeployError
from pyinfra.facts.server import LinuxDistribution

# Distribution IDs (os-release ID) grouped by the family whose packaging they share.
FAMILIES: dict[str, str] = {
    "debian": "debian",
    "ubuntu": "debian",
    "centos": "rhel",
    "rhel": "rhel",
    "rocky": "rhel",
    "almalinux": "rhel",
}


@dataclass(frozen=True)
class Distro:
    """A host's distribution: os-release ID, major version, codename and packaging family."""

    id: str
    major: int
    version: str
    codename: str
    pretty: str

    @property
    def family(self) -> str:
        return FAMILIES.get(self.id, "unknown")

    @property
    def key(self) -> str:
        """`debian-12`, `ubuntu-22.04`, `centos-7`: the key of per-distro tables."""
        if self.id == "ubuntu":
            return f"ubuntu-{self.version}"
        return f"{self.id}-{self.major}"

    @classmethod
    def from_fact(cls, fact: dict) -> Distro:
        meta = {k.upper(): v for k, v in (fact.get("release_meta") or {}).items()}
        distro_id = str(meta.get("ID") or fact.get("name") or "unknown").lower()
        version = str(meta.get("VERSION_ID") or fact.get("major") or "")
        major = fact.get("major")
        if major is None:
            try:
                major = int(version.split(".")[0])
            except ValueError:
                major = 0
        return cls(
            id=distro_id,
            major=int(major),
            version=version,
            codename=str(meta.get("VERSION_CODENAME") or ""),
            pretty=str(fact.get("name") or distro_id),
        )


def unsupported(what: str, distro: Distro) -> DeployError:
    """The error for a host a concern cannot handle, naming the distro and version."""
    return DeployError(f"{what} is not supported on {distro.pretty} {distro.version}")


# Each host's distribution, read once per run: pyinfra 3 keeps no fact cache, and every concern
# asks (six LinuxDistribution commands per host before this, about a second each on an emulated
# VM). Keyed by host name, valid only for the State it was read in.
_DISTROS: dict[str, tuple[Any, Distro]] = {}


def current_distro() -> Distro:
    """The distribution of the host pyinfra is preparing or running now (read once per run)."""
    run = getattr(host, "state", None)
    cached = _DISTROS.get(host.name)
    if run is not None and cached is not None and cached[0] is run:
        return cached[1]
    fact = cast(Any, host.get_fact)(LinuxDistribution)
    distro = Distro.from_fact(dict(fact))
    if run is not None:
        _DISTROS[host.name] = (run, distro)
    return distro


def install_packages(name: str, packages: list[str], distro: Distro) -> Any:
    """Install packages with the distro's manager (apt with a 1-hour cache, yum on 7, dnf)."""
    from pyinfra.operations import apt, dnf, yum

    if distro.family == "debian":
        return apt.packages(name=name, packages=packages, update=True, cache_time=3600)
    return (yum if distro.major <= 7 else dnf).packages(name=name, packages=packages)
