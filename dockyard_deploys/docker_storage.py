"""Choose and prepare the Docker storage driver from facts: distro, kernel filesystems, the data
root's backing filesystem, the engine's version and what it holds now. Optionally give the data
root a dedicated backing store (xfs with ftype=1 or btrfs). The driver's daemon.json keys are
contributed to `docker_daemon`, the one owner of that file; the settings are
`settings.StorageSettings` (`docker_storage_*`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import systemd

from dockyard_deploys import docker_engine, settings
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
from dockyard_deploys.operations import data_root_device, fstab_entry, storage_driver_check
from dockyard_deploys.settings import DEFAULT_DATA_ROOT, StorageSettings

# Backing filesystems overlay2 runs on (xfs only with ftype=1, checked separately).
OVERLAY2_BACKING: tuple[str, ...] = ("ext4", "xfs", "btrfs", "tmpfs", "ext3")
# The last engine major that has devicemapper.
DEVICEMAPPER_LAST_MAJOR = 24
# The package that has the mkfs of each backing-store filesystem, per family.
DEVICE_PACKAGES: dict[str, dict[str, str]] = {
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
    storage: StorageSettings,
    expected_major: int,
) -> StoragePlan:
    """Choose the driver and backing store from facts; raise StorageRefused when the host can't.

    Pure: every input is a fact or a (validated) settings value, so it is tested per distro with
    fake facts.
    """
    requested = storage.driver
    data_root = storage.data_root
    device = storage.device
    device_fs = storage.device_fs
    device_size = storage.device_size
    extra_opts = list(storage.opts)
    allow_switch = storage.allow_switch
    major = engine["major"] if engine else expected_major

    # The backing filesystem the engine will see: the device's, when one is configured.
    backing = path_fs["fstype"] if path_fs else ""
    xfs_ftype = path_fs["xfs_ftype"] if path_fs else None
    device_mounted = False
    device_is_file = False
    if device and requested != "devicemapper":
        if device_fs not in kernel_fs:
            raise StorageRefused(f"the kernel cannot mount {device_fs} (not in /proc/filesystems)")
        device_is_file = not device.startswith("/dev/")
        state = device_state or {"exists": False, "fstype": "", "mountpoints": []}
        if not state["exists"]:
            if not device_is_file:
                raise StorageRefused(f"docker_storage_device {device} does not exist")
            if device_size is None:
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
    """The storage plan of the host pyinfra is preparing or running now (facts are cached per
    host)."""
    distro = current_distro()
    if distro.family not in ("debian", "rhel"):
        raise unsupported("Docker storage", distro)
    storage = settings.storage()
    return plan_storage(
        distro=distro,
        kernel_fs=host.get_fact(KernelFilesystems),
        path_fs=host.get_fact(PathFilesystem, path=storage.data_root),
        engine=host.get_fact(DockerEngine),
        device_state=(
            host.get_fact(BlockDevice, device=storage.device) if storage.device else None
        ),
        storage=storage,
        expected_major=docker_engine.current_plan().expected_major,
    )


def daemon_keys(current: dict[str, Any]) -> dict[str, Any]:
    """This concern's daemon.json keys on the current host (a `docker_daemon` contributor);
    raises StorageRefused when the host cannot take the requested storage."""
    return current_plan().daemon_keys()


@deploy("Prepare Docker storage")
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
    package = DEVICE_PACKAGES[plan.device_fs][distro.family]
    install_packages(f"Install {package} for the {plan.device_fs} backing store", [package], distro)
    options = "defaults,loop" if plan.device_is_file else "defaults"
    fstab = fstab_entry(
        name=f"Mount {plan.device} at {plan.data_root} at boot (fstab)",
        mountpoint=plan.data_root,
        line=f"{plan.device} {plan.data_root} {plan.device_fs} {options} 0 0",
    )
    systemd.daemon_reload(name="Reload systemd for the new fstab", _if=fstab.did_change)
    data_root_device(
        name=f"Give the data root {plan.data_root} its {plan.device_fs} backing store",
        device=plan.device,
        fstype=plan.device_fs,
        mountpoint=plan.data_root,
        size=plan.device_size,
    )
