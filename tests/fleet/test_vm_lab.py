"""Lab VM hosts end to end, and nfs-ganesha where the kernel has no NFS server: a small lab of
its own (DOCKYARD_LAB_NAME=dockyard-vmtest, the container-only topology plus one extra VM: a
bookworm container that is the storage, registry and Docker host, and one qemu VM) — the VM runs
a real kernel that loads nfsd, is reached over ssh with strict host-key checking, sits on the lab
network beside the container, boots from an overlay of the cached image, is listed with kind
`vm`; the deploy picks nfs-ganesha on the container from its facts, runs the registry on the
export's directory there, and the VM's kernel mounts the ganesha export (writes squashed to the
anonymous uid); `dockyard-lab down` leaves nothing of the VM (no qemu process, no tap device, no
overlay)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import testinfra

from dockyard_lab import defaults, vm

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LAB_NAME = "dockyard-vmtest"
VM_NAME = f"{LAB_NAME}-vm1"
ENV = {**os.environ, "DOCKYARD_LAB_NAME": LAB_NAME, "PYTHONUNBUFFERED": "1"}
# Bound on `dockyard-lab up`: a first run builds the VM image (debootstrap, about 4 minutes), then
# the VM boots under software emulation (about a minute).
UP_TIMEOUT = 1200
# Bound on `dockyard-lab down` (SIGTERM, then SIGKILL after a few seconds).
DOWN_TIMEOUT = 120
# Bound on the deploy to the container (the engine and nfs-ganesha from Debian's archive).
DEPLOY_TIMEOUT = 900
EXPORT = "/srv/exports/registry"


def _lab(*args: str, timeout: float = DOWN_TIMEOUT) -> str:
    proc = subprocess.run(
        [str(BIN / "dockyard-lab"), *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"dockyard-lab {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


def _vm_dir() -> Path:
    return defaults.lab_state_dir() / f"{LAB_NAME}-vms" / VM_NAME


def _qemu_processes() -> list[int]:
    """Every process whose command line names this lab's VM directory (its qemu)."""
    marker = str(_vm_dir()).encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def vm_lab() -> Iterator[dict[str, Any]]:
    """The VM test lab, up; `down` afterwards whatever happened."""
    _lab("down")
    started = time.monotonic()
    out = _lab(
        "up",
        "--topology",
        "containers",
        *("--hosts", "1", "--releases", "bookworm", "--vms", "1"),
        timeout=UP_TIMEOUT,
    )
    print(f"\n`dockyard-lab up --vms 1` took {time.monotonic() - started:.0f} s:\n{out}")
    try:
        hosts = json.loads(_lab("status", "--json"))
        yield {h["name"]: h for h in hosts}
    finally:
        if not os.environ.get("DOCKYARD_KEEP_LAB"):
            _lab("down")


@pytest.fixture(scope="module")
def vm_host(vm_lab: dict[str, Any]) -> Any:
    """testinfra over ssh with the lab key and strict host-key checking (as the fleet's hosts)."""
    return _testinfra(vm_lab[VM_NAME])


def test_status_lists_each_host_with_its_kind(vm_lab: dict[str, Any]) -> None:
    assert {name: h["kind"] for name, h in vm_lab.items()} == {
        f"{LAB_NAME}-bookworm": "container",
        VM_NAME: "vm",
    }
    vm_item = vm_lab[VM_NAME]
    assert vm_item["state"] == "running"
    assert vm_item["groups"] == ["vms"]
    assert vm_item["release"] == "bookworm"
    # The VM's address is on the lab network's subnet, and no container has it.
    network = vm.lab_network(LAB_NAME)
    assert vm_item["address"] not in network.containers
    assert (
        vm.allocate_addresses(network.subnet, network.gateway, [], 1)[0].exploded
        == (vm_item["address"])
    )


def test_inventory_has_the_vm_in_its_own_group(vm_lab: dict[str, Any]) -> None:
    code = (
        "import json; from dockyard_lab.inventory import lab_groups; "
        "print(json.dumps({g: [n for n, _ in m] for g, m in lab_groups().items()}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True
    )
    groups = json.loads(proc.stdout)
    assert groups["vms"] == [VM_NAME]
    assert all(VM_NAME not in names for group, names in groups.items() if group != "vms")


def test_vm_runs_a_real_kernel_that_loads_nfsd(vm_host: Any) -> None:
    release = vm_host.check_output("uname -r")
    assert release != os.uname().release and release.endswith("-amd64")
    vm_host.run_expect([0], "modprobe nfsd")
    filesystems = vm_host.file("/proc/filesystems").content_string.split()
    assert "nfsd" in filesystems


def test_vm_has_its_own_host_key_and_hostname(vm_lab: dict[str, Any], vm_host: Any) -> None:
    item = vm_lab[VM_NAME]
    host_key = vm_host.file("/etc/ssh/ssh_host_ed25519_key.pub").content_string.split()[:2]
    known = Path(item["ssh_known_hosts"]).read_text().splitlines()
    assert f"{item['address']} {' '.join(host_key)}" in [" ".join(k.split()[:3]) for k in known]
    assert vm_host.check_output("hostname") == VM_NAME
    container = vm_lab[f"{LAB_NAME}-bookworm"]
    assert all(not k.startswith(f"{container['address']} {' '.join(host_key)}") for k in known)


def test_vm_reaches_the_container_on_the_lab_network(vm_lab: dict[str, Any], vm_host: Any) -> None:
    container = vm_lab[f"{LAB_NAME}-bookworm"]["address"]
    banner = vm_host.check_output(
        "python3 -c 'import socket,sys; s=socket.create_connection((sys.argv[1], 22), 10); "
        "print(s.recv(8).decode())' %s",
        container,
    )
    assert banner.startswith("SSH-")


def _testinfra(item: dict[str, Any]) -> Any:
    return testinfra.get_host(
        f"ssh://{item['ssh_user']}@{item['address']}",
        ssh_identity_file=item["ssh_key"],
        ssh_extra_args=(
            f"-o UserKnownHostsFile={item['ssh_known_hosts']} "
            "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -o BatchMode=yes"
        ),
    )


def test_ganesha_serves_where_the_kernel_has_no_nfsd_and_a_vm_kernel_mounts_it(
    vm_lab: dict[str, Any], vm_host: Any
) -> None:
    container_item = vm_lab[f"{LAB_NAME}-bookworm"]
    proc = subprocess.run(
        [str(BIN / "pyinfra"), "inventory/lab.py", "deploy.py", "-y"]
        + ["--limit", container_item["name"]],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=DEPLOY_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Install the NFS server (ganesha: nfs-ganesha, nfs-ganesha-vfs)" in proc.stderr
    container = _testinfra(container_item)
    assert container.service("nfs-ganesha").is_running
    assert container.service("dockyard-registry").is_running
    config = container.file("/etc/dockyard/registry/config.yml").content_string
    assert f"rootdirectory: {EXPORT}" in config  # the export's directory on this host
    mounted = "/mnt/dockyard-ganesha"
    vm_host.check_output(f"mkdir -p {mounted}")
    vm_host.check_output(f"mount -t nfs4 {container_item['address']}:{EXPORT} {mounted}")
    try:
        vm_host.check_output(f"echo from-the-vm > {mounted}/vm-probe.txt")
        probe = container.file(f"{EXPORT}/vm-probe.txt")
        assert probe.content_string == "from-the-vm\n"
        assert (probe.uid, probe.gid) == (65534, 65534)  # root on the VM, squashed
    finally:
        vm_host.run(f"rm -f {mounted}/vm-probe.txt; umount {mounted}")


def test_vm_boots_from_an_overlay_of_the_cached_image(vm_lab: dict[str, Any]) -> None:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(_vm_dir() / "overlay.qcow2")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == vm_lab[VM_NAME]["image"]
    assert info["backing-filename-format"] == "raw"


def test_down_leaves_nothing_of_the_vm(vm_lab: dict[str, Any]) -> None:
    pid = int((_vm_dir() / "qemu.pid").read_text())
    tap = vm.tap_name(VM_NAME)
    assert _qemu_processes() == [pid]
    assert Path("/sys/class/net", tap).exists()
    _lab("down")
    assert _qemu_processes() == []  # the qemu (pid above) is gone, and no other of this lab's
    assert not Path("/sys/class/net", tap).exists()
    assert not _vm_dir().exists()  # overlay, seed disk, pidfile, console log
    assert not (defaults.lab_state_dir() / f"{LAB_NAME}-vms").exists()
    assert json.loads(_lab("status", "--json")) == []
    # The cached image stays for the next lab.
    assert Path(vm_lab[VM_NAME]["image"]).is_file()
