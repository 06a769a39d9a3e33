"""The lab's constants, each with the reason it has its value."""

from __future__ import annotations

import os
from pathlib import Path

# Debian suites the lab can bootstrap; each becomes one lab host in the default topology.
LAB_RELEASES: tuple[str, ...] = ("bullseye", "bookworm", "trixie")

# Packages every lab image carries: systemd as PID 1, sshd for pyinfra's ssh connector,
# python3 for testinfra, iproute2 and ca-certificates for a host that looks like a real server.
LAB_INCLUDE: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "openssh-server",
    "iproute2",
    "ca-certificates",
)

# Bumped whenever the image customisation changes, so the recipe hash (and the cache) changes.
LAB_RECIPE_VERSION = 1

# Docker label that marks every container, volume and network the lab owns.
LAB_LABEL = "dockyard.lab"

# Name of the lab (containers are <prefix>-<release>[-N]); several labs can coexist.
LAB_NAME = os.environ.get("DOCKYARD_LAB_NAME", "dockyard-lab")

# Image repository the lab's base images are tagged under (tag: <suite>-<recipe hash>).
LAB_IMAGE_REPO = "dockyard-lab"

# Seconds a lab host may take to boot systemd and answer ssh before `lab up` gives up.
LAB_BOOT_TIMEOUT = 120.0

# Fallback Debian mirror when the machine's apt sources name none.
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def lab_state_dir() -> Path:
    """Directory holding the lab's ssh key and known_hosts (never the fleet CA)."""
    env = os.environ.get("DOCKYARD_LAB_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "dockyard" / "lab"
