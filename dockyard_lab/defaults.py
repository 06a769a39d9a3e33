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

# The VM hosts' suite: one kernel for every VM (a real one, with nfsd, unlike the machine's).
VM_SUITE = "bookworm"

# Packages baked into the VM image: a kernel and the tools to boot it from a disk (udev, kmod),
# ifupdown for the static address, the kernel NFS server and client, the same sshd/python3 the
# container hosts carry (pyinfra's ssh connector, testinfra), and what the deploy installs on the
# seed topology's VMs (Debian's Docker engine, apparmor for it on this AppArmor kernel,
# python3-venv for the core). Baked, because dpkg
# under software emulation is several times slower than on the machine; the deploy's package
# operations still run there (and find them installed).
VM_INCLUDE: tuple[str, ...] = (
    "linux-image-amd64",
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    "python3",
    "nfs-kernel-server",
    "nfs-common",
    "iproute2",
    "kmod",
    "ifupdown",
    "ca-certificates",
    "docker.io",
    "apparmor",
    "python3-venv",
)

# Bumped whenever the VM image customisation changes, so the recipe hash (and the cache) changes.
VM_RECIPE_VERSION = 1

# Size of the VM's root filesystem (a sparse raw ext4 image; each VM writes to its own overlay).
VM_DISK_SIZE = "3G"

# qemu's machine: KVM fails on this kind of machine (shared/LAB.md), so software emulation (TCG);
# two vCPUs and 1 GiB are enough for sshd, nfsd and a deploy.
VM_CPUS = 2
VM_MEMORY_MB = 1024

# Seconds a VM may take from qemu's start to sshd's banner (measured: about a minute under TCG).
VM_BOOT_TIMEOUT = 300.0

# Seconds `lab down` waits for a VM's qemu to exit after SIGTERM before it sends SIGKILL.
VM_STOP_TIMEOUT = 10.0

# The lab's topologies. `seed` (the default) is the seed's recipe on real kernels: a storage VM
# exporting with the kernel NFS server, a registry VM mounting that export from /etc/fstab with
# the kernel's NFS client and serving the registry from the mount, and the container Docker hosts
# (one per release). `containers` is the container-only lab (no VM, minutes faster): the first
# container exports with nfs-ganesha (the machine's kernel has no nfsd) and runs the registry on
# the export's directory; the others only get fstab lines.
LAB_TOPOLOGIES: tuple[str, ...] = ("seed", "containers")
DEFAULT_TOPOLOGY = "seed"

# The seed topology's VMs (<lab>-<role>) and their inventory groups. Both are Docker hosts too:
# the registry VM runs the registry:2-compatible container when `registry_image` asks for it, and
# two hosts with a kernel NFS client are what an NFS-backed named volume shared across hosts needs.
SEED_VMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("storage", ("storage", "docker_hosts")),
    ("registry", ("registry", "docker_hosts")),
)

# Inventory groups of extra VM hosts (`up --vms N`: no role of the deploys).
VM_GROUPS: tuple[str, ...] = ("vms",)

# Fallback Debian mirror when the machine's apt sources name none.
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def vm_image_dir() -> Path:
    """Cache of built VM images (disk, kernel, initrd), one directory per recipe hash; shared by
    every lab using this state directory and kept by `lab down`."""
    return lab_state_dir() / "vm-images"


def lab_vm_dir() -> Path:
    """Per-VM state of this lab (overlay, seed disk, pidfile, console log); `down` removes it."""
    return lab_state_dir() / f"{LAB_NAME}-vms"


def lab_state_dir() -> Path:
    """Directory holding the lab's ssh key and known_hosts (never the fleet CA)."""
    env = os.environ.get("DOCKYARD_LAB_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "dockyard" / "lab"
