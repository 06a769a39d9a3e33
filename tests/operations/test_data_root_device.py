"""The backing-store operation: never formats a filesystem, creates only loop files it was told
the size of, does nothing when the device is already mounted at the data root."""

from __future__ import annotations

from typing import Any

from dockyard_deploys.facts import BlockDevice
from dockyard_deploys.operations import data_root_device
from tests.operations.fakes import FakeHost, as_current


def _run(block: list[str], size: str | None = "4G", fstype: str = "btrfs") -> list[str]:
    fake = FakeHost({BlockDevice: block})
    with as_current(fake):
        gen: Any = data_root_device._inner(
            device="/srv/d.img", fstype=fstype, mountpoint="/var/lib/docker", size=size
        )
        return [str(c) for c in gen]


def test_mounted_device_is_a_noop() -> None:
    assert _run(["__exists__", "TYPE=btrfs", "/var/lib/docker", "/var/lib/docker/btrfs"]) == []


def test_missing_loop_file_is_created_formatted_and_mounted() -> None:
    commands = _run([])
    assert "truncate -s 4G /srv/d.img" in commands[0]
    assert "mkfs.btrfs -q /srv/d.img" in commands[1]
    assert "blkid -p /srv/d.img" in commands[1]
    assert "mount /var/lib/docker" in commands[2]
    assert "systemctl stop docker.socket docker.service" in commands[2]


def test_xfs_is_made_with_ftype_1() -> None:
    commands = _run(["__exists__", "TYPE="], fstype="xfs")
    assert "mkfs.xfs -q -n ftype=1 /srv/d.img" in commands[0]


def test_existing_matching_filesystem_is_mounted_not_formatted() -> None:
    commands = _run(["__exists__", "TYPE=btrfs"])
    assert len(commands) == 1 and "mount /var/lib/docker" in commands[0]
    assert not any("mkfs" in c for c in commands)


def test_other_filesystem_fails_the_host() -> None:
    commands = _run(["__exists__", "TYPE=ext4"])
    assert len(commands) == 1
    assert "holds a ext4 filesystem and is never reformatted" in commands[0]
    assert "exit 1" in commands[0]


def test_missing_device_without_size_fails() -> None:
    commands = _run([], size=None)
    assert len(commands) == 1 and "does not exist" in commands[0]
