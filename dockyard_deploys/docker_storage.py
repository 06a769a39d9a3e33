"""Choose and prepare the Docker storage driver from facts: distro, kernel filesystems, the data
root's backing filesystem, the engine's version and what it holds now. Optionally give the data
root a dedicated backing store (xfs with ftype=1 or btrfs). The driver's daemon.json keys are
written by `deploys.docker_daemon`, the one owner of that file."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from pyinfra import host
from pyinfra.api import deploy, operation
from pyinfra.operations import files, systemd

from dockyard_deploys import docker_engine
from dockyard_deploys.common import Distro, current_distro, install_packages, unsupported
from dockyard_deploys.facts import (
    BlockDevice,
    BlockDeviceDict,
    DockerEngine,
    DockerEngineDict,
    KernelFilesystems,
    PathFilesystem,
    PathFilesystemDict,
)
from dockyard_deploys.operations import data_root_device, fail_command

DEFAULTS: dict[str, Any] = {
    # Storage driver; None chooses from facts (btrfs on btrfs, zfs on zfs, else overlay2).
    # devicemapper (direct-lvm) only when asked for, and only on engines <= 24.
    "docker_storage_driver": None,
    # Extra storage-opts appended to the driver's own (list of "key=value" strings).
    "docker_storage_opts": [],
    # The engine's data root; written as data-root only when it differs from the default.
    "docker_storage_data_root": "/var/lib/docker",
    # Dedicated backing store for the data root: a block device, or a loop file path.
    "docker_storage_device": None,
    # Filesystem made on docker_storage_device when it holds none: xfs (ftype=1) or btrfs.
    "docker_storage_device_fs": "xfs",
    # Size of the sparse loop file created when docker_storage_device is a missing file ("4G").
    "docker_storage_device_size": None,
    # Allow a driver switch (or a new backing store) that hides existing images and containers.
    "docker_storage_allow_switch": False,
}

DEFAULT_DATA_ROOT = "/var/lib/docker"

# Drivers dockyard configures; aufs and the legacy overlay driver are never chosen.
DRIVERS: tuple[str, ...] = ("overlay2", "btrfs", "zfs", "devicemapper", "vfs")
REMOVED_DRIVERS: dict[str, str] = {
    "aufs": "aufs was removed from the engine (24) and was never upstream in the kernel",
    "overlay": "the legacy overlay driver was removed from the engine (24); use overlay2",
}
# Backing filesystems overlay2 runs on (xfs only with ftype=1, checked separately).
OVERLAY2_BACKING: tuple[str, ...] = ("ext4", "xfs", "btrfs", "tmpfs", "ext3")
# The last engine major that has devicemapper.
DEVICEMAPPER_LAST_MAJOR = 24
# Filesystems a backing store may be made with, and the package that has the mkfs.
DEVICE_FILESYSTEMS: dict[str, dict[str, str]] = {
    "xfs": {"debian": "xfsprogs", "rhel": "xfsprogs"},
    "btrfs": {"debian": "btrfs-progs", "rhel": "btrfs-progs"},
}
# Storage options of devicemapper in direct-lvm mode: the engine builds the thin pool itself.
DEVICEMAPPER_OPTS: tuple[str, ...] = (
    "dm.thinp_percent=95",
    "dm.thinp_metapercent=1",
    "dm.thinp_autoextend_threshold=80",
    "dm.thinp_autoextend_percent=20",
    "dm.directlvm_device_force=false",
)
_SIZE = re.compile(r"^[1-9][0-9]*[KMGT]$")


class StorageRefused(Exception):
    """This host cannot take the requested storage configuration; the message says why."""


@dataclass(frozen=True)
class StoragePlan:
    """The storage configuration for one host, and why that driver was chosen."""

    driver: str
    opts: list[str]
    data_root: str
    reason: str
    device: Optional[str] = None
    device_fs: Optional[str] = None
    device_size: Optional[str] = None
    device_is_file: bool = False
    device_mounted: bool = False
    warnings: list[str] = field(default_factory=list)

    def daemon_keys(self) -> dict[str, Any]:
        """Keys this concern owns in daemon.json (None removes a key)."""
        return {
            "storage-driver": self.driver,
            "storage-opts": self.opts or None,
            "data-root": None if self.data_root == DEFAULT_DATA_ROOT else self.data_root,
        }


def _setting(data: Any, key: str) -> Any:
    value = data.get(key)
    return DEFAULTS[key] if value is None else value


def _overlay2_problem(kernel_fs: list[str], backing: str, xfs_ftype: Optional[bool]) -> str:
    if "overlay" not in kernel_fs:
        return "the kernel has no overlay filesystem (not in /proc/filesystems)"
    if backing not in OVERLAY2_BACKING:
        return f"overlay2 cannot run on a {backing or 'unknown'} backing filesystem"
    if backing == "xfs" and xfs_ftype is False:
        return "the xfs backing filesystem was made with ftype=0 (overlay2 needs ftype=1)"
    return ""


def plan_storage(
    distro: Distro,
    kernel_fs: list[str],
    path_fs: Optional[PathFilesystemDict],
    engine: Optional[DockerEngineDict],
    device_state: Optional[BlockDeviceDict],
    data: Any,
    expected_major: int,
) -> StoragePlan:
    """Choose the driver and backing store from facts; raise StorageRefused when the host can't.

    Pure: every input is a fact or data value, so it is tested per distro with fake facts.
    """
    requested = data.get("docker_storage_driver")
    data_root = str(_setting(data, "docker_storage_data_root"))
    device = data.get("docker_storage_device")
    device_fs = str(_setting(data, "docker_storage_device_fs"))
    device_size = data.get("docker_storage_device_size")
    extra_opts = list(_setting(data, "docker_storage_opts"))
    allow_switch = bool(_setting(data, "docker_storage_allow_switch"))
    major = engine["major"] if engine else expected_major

    if not posixpath.isabs(data_root):
        raise StorageRefused(f"docker_storage_data_root={data_root!r} must be an absolute path")
    if not all(isinstance(o, str) and "=" in o for o in extra_opts):
        raise StorageRefused(
            f"docker_storage_opts={extra_opts!r} must be a list of 'key=value' strings"
        )
    if requested is not None and requested in REMOVED_DRIVERS:
        raise StorageRefused(
            f"docker_storage_driver={requested!r} is never configured: "
            f"{REMOVED_DRIVERS[requested]}; valid: {', '.join(DRIVERS)}"
        )
    if requested is not None and requested not in DRIVERS:
        raise StorageRefused(
            f"docker_storage_driver={requested!r} is not a storage driver; "
            f"valid: {', '.join(DRIVERS)} (or None to choose from facts)"
        )

    # The backing filesystem the engine will see: the device's, when one is configured.
    backing = path_fs["fstype"] if path_fs else ""
    xfs_ftype = path_fs["xfs_ftype"] if path_fs else None
    device_mounted = False
    device_is_file = False
    if device and requested != "devicemapper":
        device = str(device)
        if not posixpath.isabs(device):
            raise StorageRefused(f"docker_storage_device={device!r} must be an absolute path")
        if device_fs not in DEVICE_FILESYSTEMS:
            raise StorageRefused(
                f"docker_storage_device_fs={device_fs!r} is not supported; "
                f"valid: {', '.join(DEVICE_FILESYSTEMS)}"
            )
        if device_fs not in kernel_fs:
            raise StorageRefused(f"the kernel cannot mount {device_fs} (not in /proc/filesystems)")
        device_is_file = not device.startswith("/dev/")
        state = device_state or {"exists": False, "fstype": "", "mountpoints": []}
        if not state["exists"]:
            if not device_is_file:
                raise StorageRefused(f"docker_storage_device {device} does not exist")
            if not (isinstance(device_size, str) and _SIZE.match(device_size)):
                raise StorageRefused(
                    f"docker_storage_device {device} does not exist; set "
                    f"docker_storage_device_size (like '4G'; got {device_size!r}) to create it"
                )
        elif state["fstype"] and state["fstype"] != device_fs:
            raise StorageRefused(
                f"docker_storage_device {device} already holds a {state['fstype']} filesystem; "
                f"it is never reformatted (wanted {device_fs}): wipe it by hand or choose "
                "another device"
            )
        # The btrfs driver mounts the same filesystem again below the data root: that is ours.
        others = [
            m for m in state["mountpoints"] if m != data_root and not m.startswith(data_root + "/")
        ]
        if others:
            raise StorageRefused(
                f"docker_storage_device {device} is mounted at {', '.join(others)}, "
                f"not at the data root {data_root}"
            )
        device_mounted = data_root in state["mountpoints"]
        backing = device_fs
        xfs_ftype = True if device_fs == "xfs" else None

    problem = _overlay2_problem(kernel_fs, backing, xfs_ftype)
    opts: list[str] = []
    if requested is None:
        if backing == "btrfs" and "btrfs" in kernel_fs:
            driver, reason = "btrfs", "the data root is on btrfs"
        elif backing == "zfs" and "zfs" in kernel_fs:
            driver, reason = "zfs", "the data root is on zfs"
        elif not problem:
            driver, reason = "overlay2", f"overlay2 on {backing}"
        else:
            hint = (
                "set docker_storage_driver='devicemapper' with a docker_storage_device for "
                "direct-lvm"
                if major <= DEVICEMAPPER_LAST_MAJOR
                else f"devicemapper is gone from engine {major}"
            )
            raise StorageRefused(
                f"no supported storage driver: {problem}; give the data root a backing store "
                f"(docker_storage_device, xfs or btrfs), or {hint}"
            )
    else:
        driver, reason = requested, "requested by docker_storage_driver"
        if driver == "overlay2" and problem:
            raise StorageRefused(f"docker_storage_driver='overlay2' cannot run here: {problem}")
        if driver in ("btrfs", "zfs") and (backing != driver or driver not in kernel_fs):
            raise StorageRefused(
                f"docker_storage_driver={driver!r} needs the data root {data_root} on {driver}, "
                f"but it is on {backing or 'an unknown filesystem'}"
            )
        if driver == "devicemapper":
            if major > DEVICEMAPPER_LAST_MAJOR:
                raise StorageRefused(
                    f"docker_storage_driver='devicemapper' was removed in engine 25; "
                    f"this host's engine is {major}"
                )
            if not device:
                raise StorageRefused(
                    "docker_storage_driver='devicemapper' needs docker_storage_device "
                    "(direct-lvm; loop-lvm is not for production)"
                )
    if driver == "devicemapper":
        opts = [f"dm.directlvm_device={device}", *DEVICEMAPPER_OPTS]
    opts += extra_opts

    if engine and engine["running"]:
        changing = engine["driver"] != driver or (bool(device) and not device_mounted)
        held = (engine["images"] or 0) + (engine["containers"] or 0)
        if changing and held and not allow_switch:
            what = (
                f"switching the storage driver from {engine['driver']} to {driver}"
                if engine["driver"] != driver
                else f"mounting {device} over {data_root}"
            )
            raise StorageRefused(
                f"{what} would hide {engine['images']} image(s) and {engine['containers']} "
                f"container(s) stored under {engine['driver']}; set "
                "docker_storage_allow_switch=true to do it anyway"
            )

    return StoragePlan(
        driver=driver,
        opts=opts,
        data_root=data_root,
        reason=reason,
        device=device if driver != "devicemapper" else None,
        device_fs=device_fs if device and driver != "devicemapper" else None,
        device_size=device_size if device_is_file else None,
        device_is_file=device_is_file,
        device_mounted=device_mounted,
    )


def current_plan() -> StoragePlan:
    """The storage plan of the host pyinfra is preparing now (facts are cached per host)."""
    distro = current_distro()
    if distro.family not in ("debian", "rhel"):
        raise unsupported("Docker storage", distro)
    data_root = str(_setting(host.data, "docker_storage_data_root"))
    device = host.data.get("docker_storage_device")
    return plan_storage(
        distro=distro,
        kernel_fs=host.get_fact(KernelFilesystems),
        path_fs=host.get_fact(PathFilesystem, path=data_root),
        engine=host.get_fact(DockerEngine),
        device_state=host.get_fact(BlockDevice, device=str(device)) if device else None,
        data=host.data,
        expected_major=docker_engine.current_plan().expected_major,
    )


@operation()
def storage_driver_check():
    """
    Decide the storage driver from facts when the operation runs, print it with the reason, and
    fail the host with a clear error when it cannot take the requested configuration.

    .. code:: python

        storage_driver_check(name="Choose the Docker storage driver")
    """
    try:
        plan = current_plan()
    except StorageRefused as exc:
        yield fail_command(str(exc))
        return
    host.noop(f"storage driver {plan.driver} ({plan.reason})")


@deploy("Prepare Docker storage", data_defaults=DEFAULTS)
def configure_docker_storage() -> None:
    """
    Choose the storage driver from facts and give the data root its backing store when asked;
    the driver is written to daemon.json by ``configure_docker_daemon``.

    + docker_storage_driver: driver name, or None to choose from facts
    + docker_storage_device: block device or loop file for the data root
    + docker_storage_device_fs: ``xfs`` or ``btrfs``
    + docker_storage_allow_switch: allow hiding images and containers of the old driver

    Example:

    .. code:: python

        from dockyard_deploys.docker_storage import configure_docker_storage
        configure_docker_storage()
    """
    storage_driver_check(name="Choose the Docker storage driver from facts")
    try:
        plan = current_plan()
    except StorageRefused:
        return
    if not (plan.device and plan.device_fs):
        return
    distro = current_distro()
    package = DEVICE_FILESYSTEMS[plan.device_fs][distro.family]
    install_packages(f"Install {package} for the {plan.device_fs} backing store", [package], distro)
    options = "defaults,loop" if plan.device_is_file else "defaults"
    fstab = files.line(
        name=f"Mount {plan.device} at {plan.data_root} at boot (fstab)",
        path="/etc/fstab",
        line=rf"^\S+\s+{re.escape(plan.data_root)}\s+.*$",
        replace=f"{plan.device} {plan.data_root} {plan.device_fs} {options} 0 0",
        extended_regex=True,
    )
    systemd.daemon_reload(name="Reload systemd for the new fstab", _if=fstab.did_change)
    data_root_device(
        name=f"Give the data root {plan.data_root} its {plan.device_fs} backing store",
        device=plan.device,
        fstype=plan.device_fs,
        mountpoint=plan.data_root,
        size=plan.device_size,
    )
