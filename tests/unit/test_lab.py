"""The lab's pure parts: topology planning, image recipes and their cache keys, the mirror read
from apt sources, the VM hosts' image key, addresses, names and qemu command line, and the CLI's
errors for bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from dockyard_lab import cli, defaults, fleet, images, inventory, vm


def test_default_plan_is_one_docker_host_per_release_and_role_vms() -> None:
    """The seed topology (the default): every container is a Docker host; storage and registry
    are VMs of their own."""
    plan = fleet.plan(3, defaults.LAB_RELEASES)
    assert [release for _, release, _ in plan] == ["bullseye", "bookworm", "trixie"]
    assert all(groups == ("docker_hosts",) for _, _, groups in plan)
    assert [name for name, _, _ in plan] == [
        f"{defaults.LAB_NAME}-bullseye",
        f"{defaults.LAB_NAME}-bookworm",
        f"{defaults.LAB_NAME}-trixie",
    ]
    assert vm.vm_plan("seed", 0) == [
        (f"{defaults.LAB_NAME}-storage", ("storage", "docker_hosts")),
        (f"{defaults.LAB_NAME}-registry", ("registry", "docker_hosts")),
    ]
    assert vm.vm_plan("seed", 1)[-1] == (f"{defaults.LAB_NAME}-vm1", ("vms",))


def test_container_topology_gives_the_roles_to_the_first_container() -> None:
    plan = fleet.plan(3, defaults.LAB_RELEASES, "containers")
    assert plan[0][2] == ("docker_hosts", "storage", "registry")
    assert all(groups == ("docker_hosts",) for _, _, groups in plan[1:])
    assert vm.vm_plan("containers", 0) == []


def test_unknown_topology_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown lab topology 'mesh'; valid: seed, containers"):
        fleet.plan(3, defaults.LAB_RELEASES, "mesh")
    with pytest.raises(ValueError, match="unknown lab topology"):
        vm.vm_plan("mesh", 0)


def test_larger_lab_cycles_releases_with_unique_names() -> None:
    plan = fleet.plan(5, ["bookworm", "trixie"])
    names = [name for name, _, _ in plan]
    assert len(set(names)) == 5
    assert [r for _, r, _ in plan] == ["bookworm", "trixie", "bookworm", "trixie", "bookworm"]


@pytest.mark.parametrize(("hosts", "releases"), [(0, ["bookworm"]), (2, ["jessie"]), (1, [])])
def test_bad_plans_are_refused(hosts: int, releases: list[str]) -> None:
    with pytest.raises(ValueError):
        fleet.plan(hosts, releases)


def test_image_ref_is_stable_and_follows_the_recipe() -> None:
    a = images.image_ref("bookworm", "http://deb.debian.org/debian")
    assert a == images.image_ref("bookworm", "http://deb.debian.org/debian")
    assert a.startswith(f"{defaults.LAB_IMAGE_REPO}:bookworm-")
    assert a != images.image_ref("bookworm", "http://mirror.example/debian")
    assert a != images.image_ref("trixie", "http://deb.debian.org/debian")


def test_mirror_from_deb822_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.local/debian\nSuites: bookworm\n"
        "Types: deb\nURIs: http://mirror.local/debian-security\n"
    )
    assert images.debian_mirror(tmp_path) == "http://mirror.local/debian"


def test_mirror_from_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64] http://ftp.local/debian/ bookworm main\n"
    )
    assert images.debian_mirror(tmp_path) == "http://ftp.local/debian"


def test_mirror_default_when_none_found(tmp_path: Path) -> None:
    assert images.debian_mirror(tmp_path) == defaults.DEBIAN_MIRROR


def test_customise_removes_host_keys_and_enables_first_boot_unit(tmp_path: Path) -> None:
    root = tmp_path
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("secret")
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/local/sbin").mkdir(parents=True)
    (root / "root").mkdir()
    images._customise(root)
    assert not list((root / "etc/ssh").glob("ssh_host_*"))
    link = root / "etc/systemd/system/sysinit.target.wants/dockyard-lab-init.service"
    assert link.is_symlink()
    assert (root / "usr/local/sbin/dockyard-lab-init").stat().st_mode & 0o111
    assert (root / "etc/machine-id").read_text() == ""
    for unit in ("console-getty.service", "systemd-udevd.service"):
        assert (root / "etc/systemd/system" / unit).resolve() == Path("/dev/null")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["up", "--hosts", "0"], "'0' is not a whole number of at least 1"),
        (["up", "--releases", "buster"], "unknown release(s) buster; valid: bullseye"),
        (["sideways"], "invalid choice: 'sideways'"),
    ],
)
def test_cli_bad_input_is_a_clear_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["lab", "up"], ["lab", "status", "--json"], ["lab"]])
def test_the_core_cli_points_at_dockyard_lab(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Hosts install the core alone: `dockyard lab …` is one line naming `dockyard-lab`."""
    from dockyard import cli as core_cli

    assert core_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("dockyard: error: the lab is not part of the core; run `dockyard-lab ")


# --- VM hosts ---------------------------------------------------------------------------------


def test_vm_image_key_is_stable_and_follows_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = "http://deb.debian.org/debian"
    key = vm.vm_image_key(mirror)
    assert key == vm.vm_image_key(mirror)
    assert key.startswith(f"{defaults.VM_SUITE}-") and len(key) == len("bookworm-") + 12
    assert key != vm.vm_image_key("http://mirror.example/debian")
    monkeypatch.setattr(defaults, "VM_INCLUDE", (*defaults.VM_INCLUDE, "btrfs-progs"))
    with_package = vm.vm_image_key(mirror)
    assert with_package != key
    monkeypatch.setattr(defaults, "VM_RECIPE_VERSION", defaults.VM_RECIPE_VERSION + 1)
    assert vm.vm_image_key(mirror) not in (key, with_package)
    assert vm.vm_recipe(mirror)["include"][-1] == "btrfs-progs"  # type: ignore[index]


def test_vm_image_carries_what_the_hosts_need() -> None:
    for package in ("linux-image-amd64", "openssh-server", "python3", "nfs-kernel-server"):
        assert package in defaults.VM_INCLUDE
    assert set(defaults.LAB_INCLUDE) - {"systemd"} <= set(defaults.VM_INCLUDE)


def test_vm_addresses_come_from_the_top_of_the_subnet_skipping_used_ones() -> None:
    got = vm.allocate_addresses(
        "172.20.0.0/16", "172.20.0.1", ["172.20.0.2", "172.20.255.253/16"], 3
    )
    assert [str(a) for a in got] == ["172.20.255.254", "172.20.255.252", "172.20.255.251"]
    small = vm.allocate_addresses("10.9.8.0/29", "10.9.8.1", ["10.9.8.2", "10.9.8.6"], 3)
    assert [str(a) for a in small] == ["10.9.8.5", "10.9.8.4", "10.9.8.3"]
    assert vm.allocate_addresses("10.9.8.0/29", "10.9.8.1", [], 0) == []


def test_vm_addresses_run_out_with_a_clear_error() -> None:
    with pytest.raises(vm.VmError, match=r"no free address left for a VM in the lab network"):
        vm.allocate_addresses("10.9.8.0/30", "10.9.8.1", ["10.9.8.2"], 1)


def test_vm_names_taps_and_macs() -> None:
    assert vm.vm_names(2) == [f"{defaults.LAB_NAME}-vm1", f"{defaults.LAB_NAME}-vm2"]
    assert vm.vm_names(0) == []
    with pytest.raises(ValueError, match="--vms must be 0 or more"):
        vm.vm_names(-1)
    taps = {
        vm.tap_name(f"{lab}-vm{i}") for lab in ("dockyard-lab", "dockyard-test") for i in (1, 2)
    }
    assert len(taps) == 4
    assert all(len(tap) <= 15 and tap.startswith("dytap") for tap in taps)  # IFNAMSIZ - 1
    assert vm.tap_name("dockyard-lab-vm1") == vm.tap_name("dockyard-lab-vm1")
    mac = vm.mac_address("dockyard-lab-vm1")
    assert mac.startswith("52:54:00:") and len(mac.split(":")) == 6
    assert mac != vm.mac_address("dockyard-test-vm1")


def test_vm_interfaces_give_a_static_address_and_the_network_gateway() -> None:
    text = vm.interfaces_text("172.20.255.254", 16, "172.20.0.1")
    assert "auto eth0\niface eth0 inet static\n" in text
    assert "address 172.20.255.254/16\n" in text
    assert "gateway 172.20.0.1\n" in text


def test_qemu_command_line(tmp_path: Path) -> None:
    image = vm.VmImage.at(tmp_path / "cache" / "bookworm-0123456789ab")
    vm_dir = tmp_path / "lab-vms" / "lab-vm1"
    cmd = vm.qemu_command(image, vm_dir, "lab-vm1", "dytap0123456789", "52:54:00:aa:bb:cc")
    line = " ".join(cmd)
    assert cmd[0] == "qemu-system-x86_64"
    assert "-machine q35,accel=tcg -cpu max -smp 2 -m 1024 -nographic" in line
    assert f"-kernel {image.kernel} -initrd {image.initrd}" in line
    assert cmd[cmd.index("-append") + 1] == "root=/dev/vda rw console=ttyS0 net.ifnames=0"
    drives = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-drive"]
    assert drives == [
        f"file={vm_dir / 'overlay.qcow2'},if=virtio,format=qcow2",
        f"file={vm_dir / 'seed.img'},if=virtio,format=raw,readonly=on",
    ]
    assert str(image.disk) not in line  # the base image is only the overlay's backing file
    assert "-netdev tap,id=n0,ifname=dytap0123456789,script=no,downscript=no" in line
    assert "-device virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:cc" in line
    assert f"-serial file:{vm_dir / 'console.log'}" in line
    assert "-monitor none -parallel none" in line  # what makes -nographic legal as a daemon
    assert line.endswith(f"-daemonize -pidfile {vm_dir / 'qemu.pid'}")


def test_customise_vm_root(tmp_path: Path) -> None:
    root = tmp_path
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/ssh_host_rsa_key").write_text("secret")
    vm.customise_vm_root(root)
    assert not list((root / "etc/ssh").glob("ssh_host_*"))
    link = root / "etc/systemd/system/sysinit.target.wants/dockyard-vm-seed.service"
    assert link.is_symlink()
    assert (root / "usr/local/sbin/dockyard-vm-seed").stat().st_mode & 0o111
    assert (root / "etc/fstab").read_text().startswith("/dev/vda / ext4 ")
    assert "eth0" not in (root / "etc/network/interfaces").read_text()
    assert (root / "etc/systemd/system/apt-daily.timer").resolve() == Path("/dev/null")
    assert (root / "etc/machine-id").read_text() == ""


def test_vm_seed_waits_for_its_disk_without_systemds_device_timeout(tmp_path: Path) -> None:
    """On a loaded machine udev announced /dev/vdb after systemd's 90 s device timeout: a unit
    requiring dev-vdb.device then failed, and the VM came up with no address and no host key.
    The seed unit has no device dependency; its script waits for the block device itself,
    bounded, and the unit's start timeout outlasts that bound."""
    vm.customise_vm_root(tmp_path)
    unit = (tmp_path / "etc/systemd/system/dockyard-vm-seed.service").read_text()
    assert "dev-vdb.device" not in unit
    timeout = int(unit.split("TimeoutStartSec=", 1)[1].split()[0])
    script = (tmp_path / "usr/local/sbin/dockyard-vm-seed").read_text()
    wait = script.index("until [ -b /dev/vdb ]")
    assert wait < script.index("mount -o ro /dev/vdb")
    bound = int(script.split('"$waited" -ge ', 1)[1].split("]")[0])
    assert 300 <= bound < timeout


def _vm_record(name: str, address: str) -> vm.VmRecord:
    return vm.VmRecord(
        name, address, vm.tap_name(name), vm.mac_address(name), "bookworm-0", "ssh-ed25519 AAAA"
    )


@pytest.fixture
def lab_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A lab state directory of its own, with a recorded VM whose qemu is not running."""
    monkeypatch.setenv("DOCKYARD_LAB_DIR", str(tmp_path))
    record = _vm_record(f"{defaults.LAB_NAME}-vm1", "172.20.255.254")
    record.directory.mkdir(parents=True)
    (record.directory / "vm.json").write_text(json.dumps(dataclasses.asdict(record)))
    (record.directory / "qemu.pid").write_text(f"{os.getpid()}\n")  # not a qemu: not running
    (record.directory / "overlay.qcow2").write_text("")
    return tmp_path


def test_status_lists_vms_with_their_kind(lab_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet, "docker_ok", lambda *args: True)
    monkeypatch.setattr(fleet, "docker", lambda *args, **kw: "")
    (host,) = fleet.status()
    assert host.kind == "vm" and host.to_json()["kind"] == "vm"
    assert host.groups == list(defaults.VM_GROUPS)
    assert host.state == "exited"  # the pidfile names a process that is not this VM's qemu
    assert host.address == "172.20.255.254"
    assert host.ssh_known_hosts == str(lab_dir / f"{defaults.LAB_NAME}.known_hosts")


def test_stop_vms_removes_their_state_and_spares_a_process_that_is_not_their_qemu(
    lab_dir: Path,
) -> None:
    vm.stop_vms(log=lambda line: None)  # the stale pidfile names this test's own process
    assert not defaults.lab_vm_dir().exists()


def test_a_vm_whose_qemu_died_is_an_error_with_its_console_tail(lab_dir: Path) -> None:
    (record,) = vm.records()
    (record.directory / "console.log").write_text("[ 1.0] booting\r\nKernel panic - not syncing\n")
    with pytest.raises(vm.VmError) as raised:
        vm.wait_for_ssh(record, time.monotonic() + 60)
    message = str(raised.value)
    assert message.startswith(f"lab VM {record.name}: qemu exited while booting; console log ")
    assert message.endswith("[ 1.0] booting\nKernel panic - not syncing")


def test_a_vm_that_never_answers_ssh_times_out_naming_it(
    lab_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (record,) = vm.records()
    monkeypatch.setattr(vm, "qemu_pid", lambda vm_dir: 4242)  # "running"
    with pytest.raises(vm.VmError) as raised:
        vm.wait_for_ssh(record, time.monotonic() - 1)  # the deadline has passed
    message = str(raised.value)
    assert f"lab VM {record.name} at 172.20.255.254: sshd did not answer within" in message
    assert message.endswith("(no console output)")


def _lab_host(name: str, kind: str, groups: list[str], address: str = "10.0.0.9") -> fleet.LabHost:
    return fleet.LabHost(
        name=name,
        address=address,
        release="bookworm",
        groups=groups,
        ssh_user="root",
        ssh_key="key",
        ssh_known_hosts="known_hosts",
        state="running",
        image="image",
        kind=kind,
    )


def test_inventory_puts_vms_in_their_own_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKYARD_LAB_DIR", str(tmp_path))
    monkeypatch.setattr(
        inventory,
        "status",
        lambda: [
            _lab_host("c1", "container", ["docker_hosts", "storage", "registry"]),
            _lab_host("c2", "container", ["docker_hosts"]),
            _lab_host("v1", "vm", ["vms"]),
        ],
    )
    groups = inventory.lab_groups()
    assert [name for name, _ in groups["vms"]] == ["v1"]
    others = [name for group, members in groups.items() if group != "vms" for name, _ in members]
    assert "v1" not in others and "c1" in others
    vm_data = groups["vms"][0][1]
    assert vm_data["ssh_strict_host_key_checking"] == "yes"
    assert vm_data["lab_kind"] == "vm"
    assert "nfs_client_mounts" not in vm_data and "docker_storage_device" not in vm_data
    assert groups["docker_hosts"][-1][1]["docker_storage_device_fs"] == "btrfs"  # last container
    # container-only: the registry keeps its data in the export's directory on the storage host
    storage_data = groups["storage"][0][1]
    assert storage_data["registry_data_dir"] == inventory.LAB_EXPORT
    assert "nfs_client_mounts" not in storage_data


def test_inventory_of_the_seed_topology(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry VM mounts the storage VM's export (fstab, the kernel's client) and keeps the
    registry's data there; the containers get the fstab line only (no NFS client in the
    machine's kernel); the btrfs data root goes to the last container, never a VM."""
    monkeypatch.setenv("DOCKYARD_LAB_DIR", str(tmp_path))
    monkeypatch.setattr(
        inventory,
        "status",
        lambda: [
            _lab_host("c1", "container", ["docker_hosts"], "10.0.0.2"),
            _lab_host("c2", "container", ["docker_hosts"], "10.0.0.3"),
            _lab_host("storage", "vm", ["storage", "docker_hosts"], "10.0.0.254"),
            _lab_host("registry", "vm", ["registry", "docker_hosts"], "10.0.0.253"),
        ],
    )
    groups = inventory.lab_groups()
    data = {name: d for members in groups.values() for name, d in members}
    assert [n for n, _ in groups["storage"]] == ["storage"]
    assert [n for n, _ in groups["registry"]] == ["registry"]
    mount = {"src": f"10.0.0.254:{inventory.LAB_EXPORT}", "path": inventory.LAB_MOUNT}
    assert data["registry"]["nfs_client_mounts"] == [mount]
    assert data["registry"]["registry_data_dir"] == inventory.LAB_MOUNT
    assert "nfs_client_extra_packages" not in data["registry"]
    assert "nfs_client_mounts" not in data["storage"] and "registry_data_dir" not in data["storage"]
    for name in ("c1", "c2"):
        assert data[name]["nfs_client_mounts"] == [mount]
        assert data[name]["nfs_client_extra_packages"] == ["libnfs-utils"]
    assert data["c2"]["docker_storage_device_fs"] == "btrfs"
    assert not any("docker_storage_device" in data[n] for n in ("c1", "storage", "registry"))
    # the exports come from group_data/storage.py, not from the lab's host data
    assert not any("nfs_server_exports" in d for d in data.values())


def test_cli_vms_must_not_be_negative(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["up", "--vms", "-1"])
    assert exited.value.code == 2
    assert "'-1' is not a whole number of at least 0" in capsys.readouterr().err


def test_cli_up_defaults_to_no_vms() -> None:
    assert cli.build_parser().parse_args(["up"]).vms == 0
    assert cli.build_parser().parse_args(["up", "--vms", "2"]).vms == 2


def test_images_are_built_side_by_side_and_every_build_finishes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fresh machine builds three container images and the VM image: side by side (each
    fake build below waits for all four to have started), and one failing build neither stops
    the others nor hides its error."""
    import threading

    started = threading.Barrier(4, timeout=10)
    finished: list[str] = []

    def build(release: str, log: object = None) -> str:
        started.wait()
        if release == "trixie":
            raise fleet.DockerError("debootstrap trixie failed (exit 1)")
        finished.append(release)
        return f"image-{release}"

    def build_vm(log: object = None) -> str:
        started.wait()
        finished.append("vm")
        return "vm-image"

    monkeypatch.setattr(fleet, "ensure_image", build)
    monkeypatch.setattr(fleet.vm, "ensure_vm_image", build_vm)
    with pytest.raises(fleet.DockerError, match="debootstrap trixie failed"):
        fleet._ensure_images(["bullseye", "bookworm", "trixie"], True, log=lambda _: None)
    assert sorted(finished) == ["bookworm", "bullseye", "vm"]

    started.reset()
    monkeypatch.setattr(fleet, "ensure_image", lambda release, log=None: f"image-{release}")
    images, vm_image = fleet._ensure_images(["bookworm"], False, log=lambda _: None)
    assert images == {"bookworm": "image-bookworm"} and vm_image is None
