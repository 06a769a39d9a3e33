"""The lab's second kind of host: qemu VMs with a real Debian kernel (software emulation: KVM does
not work on the lab machine), booted from one cached debootstrap disk image (keyed by a hash of its
recipe) through a per-VM copy-on-write overlay, on the lab's own Docker network through a tap
device on its bridge, with their own ssh host keys and the lab's key authorised for root. A small
per-VM seed disk carries what differs between VMs (host keys, address, hostname); the qemu
processes are daemons with pidfiles in the lab's state directory; `lab down` removes them all."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from dockyard_lab import defaults
from dockyard_lab.docker import docker
from dockyard_lab.images import debian_mirror, install_boot_unit

Log = Callable[[str], None]


class VmError(RuntimeError):
    """A lab VM could not be built, started, reached or stopped."""


# Runs at every boot, before the network and sshd: copies this VM's own files (ssh host key,
# authorised key, address, hostname) from its read-only seed disk (the second virtio disk). It
# waits for the disk itself, bounded: a dependency on dev-vdb.device would fail after systemd's
# 90 s device timeout, which an emulated VM on a loaded machine reached (the VM then came up
# with no address and no host key).
_SEED_SCRIPT = """#!/bin/sh
set -e
waited=0
until [ -b /dev/vdb ]; do
    if [ "$waited" -ge 900 ]; then
        echo "dockyard-vm-seed: no seed disk /dev/vdb after 900 s" >&2
        exit 1
    fi
    sleep 1
    waited=$((waited + 1))
done
mkdir -p /run/dockyard-seed
mount -o ro /dev/vdb /run/dockyard-seed
cp -a /run/dockyard-seed/files/. /
umount /run/dockyard-seed
hostname -F /etc/hostname
"""

_SEED_UNIT = """[Unit]
Description=dockyard lab VM: this VM's ssh host key, address and hostname from its seed disk
DefaultDependencies=no
After=local-fs.target systemd-udevd.service
Wants=network-pre.target
Before=network-pre.target networking.service ssh.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/dockyard-vm-seed
RemainAfterExit=yes
TimeoutStartSec=960

[Install]
WantedBy=sysinit.target
"""

# The root filesystem is /dev/vda (kernel command line); no fsck: every VM starts from a clean
# overlay of an image made by mkfs.
_FSTAB = "/dev/vda / ext4 rw,errors=remount-ro 0 0\n"

# Loopback only; the seed writes the VM's full /etc/network/interfaces with its static address.
_BASE_INTERFACES = "auto lo\niface lo inet loopback\n"

# sshd offers the one host key each VM gets from its seed (no warnings about the others).
_SSHD_CONFIG = "HostKey /etc/ssh/ssh_host_ed25519_key\n"

# Timers that would only spend emulated CPU time in a short-lived lab VM.
_VM_MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
)

# The kernel command line: root on the first virtio disk, console on the serial port (logged to
# a file), eth0 as the interface name /etc/network/interfaces uses.
KERNEL_APPEND = "root=/dev/vda rw console=ttyS0 net.ifnames=0"


# --- the image -------------------------------------------------------------------------------


def vm_recipe(mirror: str) -> dict[str, object]:
    """Everything that determines the VM image's content; its hash names the cached image."""
    return {
        "suite": defaults.VM_SUITE,
        "variant": "minbase",
        "include": list(defaults.VM_INCLUDE),
        "mirror": mirror,
        "size": defaults.VM_DISK_SIZE,
        "seed_script": _SEED_SCRIPT,
        "seed_unit": _SEED_UNIT,
        "fstab": _FSTAB,
        "interfaces": _BASE_INTERFACES,
        "sshd_config": _SSHD_CONFIG,
        "masked": list(_VM_MASKED_UNITS),
        "version": defaults.VM_RECIPE_VERSION,
    }


def vm_image_key(mirror: str) -> str:
    """`<suite>-<first 12 hex of the recipe's sha256>`: the cached image's directory name."""
    text = json.dumps(vm_recipe(mirror), sort_keys=True).encode()
    return f"{defaults.VM_SUITE}-{hashlib.sha256(text).hexdigest()[:12]}"


@dataclass(frozen=True)
class VmImage:
    """A built VM image in the cache: the raw ext4 root disk and the kernel and initrd from it."""

    key: str
    disk: Path
    kernel: Path
    initrd: Path

    @classmethod
    def at(cls, directory: Path) -> VmImage:
        return cls(
            directory.name, directory / "disk.img", directory / "vmlinuz", directory / "initrd.img"
        )

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.disk, self.kernel, self.initrd))


def customise_vm_root(root: Path) -> None:
    """Turn a debootstrap tree into the VM image's root: no ssh host keys (each VM gets its own),
    the seed unit enabled, root on /dev/vda, loopback-only interfaces, empty machine-id."""
    for key in root.glob("etc/ssh/ssh_host_*"):
        key.unlink()
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/ssh/sshd_config.d/dockyard-lab.conf").write_text(_SSHD_CONFIG)
    install_boot_unit(root, "dockyard-vm-seed", _SEED_SCRIPT, _SEED_UNIT, _VM_MASKED_UNITS)
    (root / "etc/fstab").write_text(_FSTAB)
    (root / "etc/network").mkdir(parents=True, exist_ok=True)
    (root / "etc/network/interfaces").write_text(_BASE_INTERFACES)
    (root / "root/.ssh").mkdir(mode=0o700, parents=True, exist_ok=True)
    (root / "etc/machine-id").write_text("")


def _run(cmd: Sequence[str], what: str) -> str:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise VmError(f"{what}: {cmd[0]} is not installed (run `make engine`)") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise VmError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout


def _unmount_under(root: Path) -> None:
    """Undo what a failed debootstrap left mounted in the tree (/proc, /sys), deepest first, so
    removing the tree never reaches the machine's own /proc or /sys."""
    prefix = str(root.resolve()) + "/"
    points = [
        line.split()[1]
        for line in Path("/proc/mounts").read_text().splitlines()
        if line.split()[1].startswith(prefix)
    ]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def ensure_vm_image(log: Log = print) -> VmImage:
    """The VM image for this machine's mirror, built with debootstrap and `mkfs.ext4 -d` when it
    is not cached (minutes); the cache entry appears whole (built aside, then renamed)."""
    mirror = debian_mirror()
    key = vm_image_key(mirror)
    cache = defaults.vm_image_dir()
    image = VmImage.at(cache / key)
    if image.complete():
        log(f"    VM image {key}: cached")
        return image
    for tool in ("debootstrap", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise VmError(f"{tool} is not installed (run `make engine`)")
    log(f"    VM image {key}: building with debootstrap from {mirror} (about 4 minutes)")
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dockyard-lab-vm-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "root"
        try:
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(defaults.VM_INCLUDE)}",
                    defaults.VM_SUITE,
                    str(root),
                    mirror,
                ],
                f"debootstrap {defaults.VM_SUITE}",
            )
        finally:
            _unmount_under(root)
        customise_vm_root(root)
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        initrds = sorted((root / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise VmError("the VM image has no kernel or initrd in /boot (linux-image-amd64)")
        building = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
        try:  # built aside, then renamed into place: the cache never holds half an image
            shutil.copyfile(kernels[-1], building / "vmlinuz")
            shutil.copyfile(initrds[-1], building / "initrd.img")
            disk = building / "disk.img"
            _run(["truncate", "-s", defaults.VM_DISK_SIZE, str(disk)], "sizing the VM disk")
            _run(
                ["mkfs.ext4", "-q", "-F", "-L", "dockyard-vm", "-d", str(root), str(disk)],
                "making the VM root filesystem",
            )
            (building / "recipe.json").write_text(
                json.dumps(vm_recipe(mirror), indent=2, sort_keys=True)
            )
            if (cache / key).exists() and not image.complete():
                shutil.rmtree(cache / key)  # what an interrupted older build left
            try:
                os.rename(building, cache / key)
            except OSError:
                if not image.complete():  # else another build finished first: use its image
                    raise
        finally:
            shutil.rmtree(building, ignore_errors=True)
    log(f"    VM image {key}: built in {time.monotonic() - started:.0f} s")
    return image


# --- addresses, names and the qemu command line (pure) --------------------------------------


def vm_names(count: int) -> list[str]:
    """Names of a lab's `count` extra VMs: `<lab>-vm1`, `<lab>-vm2`, …"""
    if count < 0:
        raise ValueError(f"--vms must be 0 or more, got {count}")
    return [f"{defaults.LAB_NAME}-vm{i}" for i in range(1, count + 1)]


def vm_plan(topology: str, count: int) -> list[tuple[str, tuple[str, ...]]]:
    """Names and inventory groups of a lab's VMs: the topology's role VMs (`<lab>-storage`,
    `<lab>-registry` in the seed topology), then `count` extra VMs in the group `vms`."""
    if topology not in defaults.LAB_TOPOLOGIES:
        raise ValueError(
            f"unknown lab topology {topology!r}; valid: {', '.join(defaults.LAB_TOPOLOGIES)}"
        )
    roles = defaults.SEED_VMS if topology == "seed" else ()
    out = [(f"{defaults.LAB_NAME}-{role}", groups) for role, groups in roles]
    return out + [(name, defaults.VM_GROUPS) for name in vm_names(count)]


def allocate_addresses(
    subnet: str, gateway: str, taken: Iterable[str], count: int
) -> list[ipaddress.IPv4Address]:
    """`count` free addresses from the top of the lab network's subnet, downwards.

    Docker's IPAM hands container addresses out from the bottom of the subnet (after the
    gateway), so the top stays free for the VMs, which Docker does not know about; addresses in
    use (the gateway, containers, existing VMs) are skipped."""
    network = ipaddress.IPv4Network(subnet)
    avoid = {ipaddress.IPv4Address(a.split("/")[0]) for a in (gateway, *taken) if a}
    out: list[ipaddress.IPv4Address] = []
    candidate = network.broadcast_address - 1
    while len(out) < count:
        if candidate <= network.network_address:
            raise VmError(f"no free address left for a VM in the lab network {subnet}")
        if candidate not in avoid:
            out.append(candidate)
        candidate -= 1
    return out


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def tap_name(vm_name: str) -> str:
    """The VM's tap device: `dytap` and a hash of the (lab-qualified) VM name, within IFNAMSIZ."""
    return f"dytap{_digest(vm_name)[:10]}"


def mac_address(vm_name: str) -> str:
    """A stable MAC in qemu's locally administered range, derived from the VM name."""
    h = _digest(vm_name)
    return f"52:54:00:{h[0:2]}:{h[2:4]}:{h[4:6]}"


def interfaces_text(address: str, prefixlen: int, gateway: str) -> str:
    """The VM's /etc/network/interfaces: a static address on the lab network, routed through
    the network's gateway (the machine), like the containers beside it."""
    return (
        "auto lo\niface lo inet loopback\n\n"
        "auto eth0\niface eth0 inet static\n"
        f"    address {address}/{prefixlen}\n"
        f"    gateway {gateway}\n"
    )


def qemu_command(image: VmImage, vm_dir: Path, name: str, tap: str, mac: str) -> list[str]:
    """The qemu command line of one VM: TCG, the cached kernel, the overlay and seed disks, a
    virtio NIC on its tap; a daemon with a pidfile, its serial console written to a file."""
    return [
        "qemu-system-x86_64",
        "-name",
        name,
        "-machine",
        "q35,accel=tcg",
        "-cpu",
        "max",
        "-smp",
        str(defaults.VM_CPUS),
        "-m",
        str(defaults.VM_MEMORY_MB),
        "-nographic",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        KERNEL_APPEND,
        "-drive",
        f"file={vm_dir / 'overlay.qcow2'},if=virtio,format=qcow2",
        "-drive",
        f"file={vm_dir / 'seed.img'},if=virtio,format=raw,readonly=on",
        "-netdev",
        f"tap,id=n0,ifname={tap},script=no,downscript=no",
        "-device",
        f"virtio-net-pci,netdev=n0,mac={mac}",
        # -nographic's serial and monitor go to stdio, which a daemon has not: send them to the
        # console log and nowhere, explicitly (qemu accepts -nographic with -daemonize then).
        "-serial",
        f"file:{vm_dir / 'console.log'}",
        "-monitor",
        "none",
        "-parallel",
        "none",
        "-daemonize",
        "-pidfile",
        str(vm_dir / "qemu.pid"),
    ]


# --- the lab network -------------------------------------------------------------------------


@dataclass(frozen=True)
class LabNetwork:
    """The lab's Docker network as the VMs need it: its bridge, subnet, gateway, used addresses."""

    bridge: str
    subnet: str
    gateway: str
    containers: tuple[str, ...]


def lab_network(name: str) -> LabNetwork:
    info = json.loads(docker("network", "inspect", name))[0]
    configs = [c for c in (info.get("IPAM") or {}).get("Config") or [] if ":" not in c["Subnet"]]
    if not configs:
        raise VmError(f"the lab network {name} has no IPv4 subnet")
    subnet = configs[0]["Subnet"]
    gateway = configs[0].get("Gateway") or str(ipaddress.IPv4Network(subnet).network_address + 1)
    options = info.get("Options") or {}
    bridge = options.get("com.docker.network.bridge.name") or f"br-{info['Id'][:12]}"
    used = tuple(
        c["IPv4Address"].split("/")[0]
        for c in (info.get("Containers") or {}).values()
        if c.get("IPv4Address")
    )
    return LabNetwork(bridge, subnet, gateway, used)


# --- VM records, processes and devices -------------------------------------------------------


@dataclass(frozen=True)
class VmRecord:
    """One lab VM as recorded in its state directory (`vm.json`) when it was created."""

    name: str
    address: str
    tap: str
    mac: str
    image: str
    host_key: str
    # Inventory groups (the role VMs' groups, or `vms`).
    groups: tuple[str, ...] = defaults.VM_GROUPS

    @property
    def directory(self) -> Path:
        return defaults.lab_vm_dir() / self.name


def _record_path(name: str) -> Path:
    return defaults.lab_vm_dir() / name / "vm.json"


def records() -> list[VmRecord]:
    """Every VM of this lab that has a state directory, by name."""
    out = []
    for path in sorted(defaults.lab_vm_dir().glob("*/vm.json")):
        fields = json.loads(path.read_text())
        fields["groups"] = tuple(fields.get("groups") or defaults.VM_GROUPS)
        out.append(VmRecord(**fields))
    return out


def qemu_pid(vm_dir: Path) -> int | None:
    """The pid of the VM's qemu if it runs: from its pidfile, and only if that process is the
    qemu started with that pidfile (a recycled pid, or a zombie, is not)."""
    try:
        pid = int((vm_dir / "qemu.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if str(vm_dir / "qemu.pid").encode() in cmdline else None


def console_tail(vm_dir: Path, lines: int = 25) -> str:
    path = vm_dir / "console.log"
    if not path.exists():
        return "(no console output)"
    text = path.read_text(errors="replace").replace("\r", "")
    return "\n".join(text.splitlines()[-lines:])


def _link_exists(device: str) -> bool:
    return Path("/sys/class/net", device).exists()


def _add_tap(tap: str, bridge: str) -> None:
    if _link_exists(tap):
        _run(["ip", "link", "del", tap], f"removing a stale tap device {tap}")
    _run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], f"creating tap device {tap}")
    _run(["ip", "link", "set", tap, "master", bridge], f"attaching {tap} to the bridge {bridge}")
    _run(["ip", "link", "set", tap, "up"], f"bringing {tap} up")


def _make_seed(vm_dir: Path, name: str, address: str, network: LabNetwork, pubkey: str) -> str:
    """The VM's seed disk (a small ext4 image); returns the VM's public ssh host key line."""
    files = vm_dir / "seed" / "files"
    for directory, mode in (
        ("", 0o755),
        ("etc", 0o755),
        ("etc/ssh", 0o755),
        ("etc/network", 0o755),
        ("root", 0o700),
        ("root/.ssh", 0o700),
    ):
        (files / directory).mkdir(parents=True, exist_ok=True)
        os.chmod(files / directory, mode)
    key = files / "etc/ssh/ssh_host_ed25519_key"
    _run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}", "-f", str(key)],
        f"generating the ssh host key of {name}",
    )
    prefix = ipaddress.IPv4Network(network.subnet).prefixlen
    (files / "etc/network/interfaces").write_text(interfaces_text(address, prefix, network.gateway))
    (files / "etc/hostname").write_text(f"{name}\n")
    (files / "etc/hosts").write_text(f"127.0.0.1 localhost\n{address} {name}\n")
    authorized = files / "root/.ssh/authorized_keys"
    authorized.write_text(pubkey)
    authorized.chmod(0o600)
    seed = vm_dir / "seed.img"
    _run(["truncate", "-s", "8M", str(seed)], f"sizing the seed disk of {name}")
    _run(
        ["mkfs.ext4", "-q", "-F", "-L", "dockyard-seed", "-d", str(vm_dir / "seed"), str(seed)],
        f"making the seed disk of {name}",
    )
    host_key = key.with_suffix(".pub").read_text().strip()
    shutil.rmtree(vm_dir / "seed")
    return host_key


def _create(
    name: str,
    groups: tuple[str, ...],
    address: str,
    image: VmImage,
    network: LabNetwork,
    pubkey: str,
) -> VmRecord:
    vm_dir = defaults.lab_vm_dir() / name
    if vm_dir.exists():
        shutil.rmtree(vm_dir)
    vm_dir.mkdir(parents=True)
    _run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(image.disk),
            "-F",
            "raw",
            str(vm_dir / "overlay.qcow2"),
        ],
        f"creating the overlay disk of {name}",
    )
    host_key = _make_seed(vm_dir, name, address, network, pubkey)
    record = VmRecord(
        name, address, tap_name(name), mac_address(name), image.key, host_key, tuple(groups)
    )
    _record_path(name).write_text(json.dumps(asdict(record), indent=2))
    return record


def _start(record: VmRecord, image: VmImage, bridge: str) -> None:
    vm_dir = record.directory
    _add_tap(record.tap, bridge)
    (vm_dir / "console.log").unlink(missing_ok=True)
    _run(
        qemu_command(image, vm_dir, record.name, record.tap, record.mac),
        f"starting VM {record.name}",
    )


def start_vms(
    wanted: Sequence[tuple[str, tuple[str, ...]]],
    pubkey: str,
    network_name: str,
    image: VmImage,
    log: Log = print,
) -> list[VmRecord]:
    """Make sure the lab has the `wanted` VMs (names and groups, from `vm_plan`) running:
    creating the missing ones on `image`, restarting stopped ones on their own overlay; returns
    their records. A VM that exists with other groups (a lab made with another topology) is an
    error. Does not wait for them to boot."""
    names = [name for name, _ in wanted]
    if not names:
        return []
    existing = {r.name: r for r in records()}
    for name, groups in wanted:
        if name in existing and tuple(existing[name].groups) != tuple(groups):
            raise VmError(
                f"lab VM {name} exists with groups {','.join(existing[name].groups)}, not "
                f"{','.join(groups)} (another topology): run `dockyard-lab down` first"
            )
    for tool in ("qemu-system-x86_64", "qemu-img", "ip", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise VmError(f"{tool} is not installed (run `make engine`)")
    network = lab_network(network_name)
    taken = [*network.containers, *(r.address for r in existing.values())]
    fresh = [n for n in names if n not in existing]
    addresses = iter(allocate_addresses(network.subnet, network.gateway, taken, len(fresh)))
    out = []
    for name, groups in wanted:
        record = existing.get(name)
        if record is None:
            record = _create(name, groups, str(next(addresses)), image, network, pubkey)
            log(f"--> Starting lab VM {name} at {record.address}")
        elif qemu_pid(record.directory) is not None:
            out.append(record)
            continue
        else:
            log(f"--> Restarting lab VM {name} at {record.address}")
        _start(record, VmImage.at(defaults.vm_image_dir() / record.image), network.bridge)
        out.append(record)
    return out


def wait_for_ssh(record: VmRecord, deadline: float) -> None:
    """Bounded wait for the VM's sshd banner; a qemu that exits, or the deadline, is an error
    naming the VM with the tail of its console log."""
    vm_dir = record.directory
    while time.monotonic() < deadline:
        if qemu_pid(vm_dir) is None:
            raise VmError(
                f"lab VM {record.name}: qemu exited while booting; console log "
                f"{vm_dir / 'console.log'} ends:\n{console_tail(vm_dir)}"
            )
        try:
            with socket.create_connection((record.address, 22), timeout=2) as sock:
                sock.settimeout(5)
                if sock.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        time.sleep(1)
    raise VmError(
        f"lab VM {record.name} at {record.address}: sshd did not answer within "
        f"{defaults.VM_BOOT_TIMEOUT:.0f} s; console log {vm_dir / 'console.log'} ends:\n"
        f"{console_tail(vm_dir)}"
    )


def _wait_gone(pid: int, vm_dir: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if qemu_pid(vm_dir) != pid:
            return True
        time.sleep(0.1)
    return qemu_pid(vm_dir) != pid


def stop_vms(log: Log = print) -> None:
    """Kill every VM of this lab (SIGTERM, then SIGKILL), remove its tap device and its state
    directory (overlay, seed, pidfile, console log). The image cache stays."""
    vm_root = defaults.lab_vm_dir()
    if not vm_root.exists():
        return
    for vm_dir in sorted(p for p in vm_root.iterdir() if p.is_dir()):
        log(f"--> Removing lab VM {vm_dir.name}")
        pid = qemu_pid(vm_dir)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, vm_dir, defaults.VM_STOP_TIMEOUT):
                os.kill(pid, signal.SIGKILL)
                if not _wait_gone(pid, vm_dir, defaults.VM_STOP_TIMEOUT):
                    raise VmError(f"lab VM {vm_dir.name}: qemu (pid {pid}) did not exit")
        tap = tap_name(vm_dir.name)
        if _link_exists(tap):
            _run(["ip", "link", "del", tap], f"removing tap device {tap}")
        shutil.rmtree(vm_dir)
    vm_root.rmdir()
