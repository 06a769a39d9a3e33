"""Bring the lab fleet up and down and report it: systemd host containers (one per Debian release
by default) on a Docker network the lab owns, each with sshd, a unique host key, and the lab's own
ssh key authorised for root; optionally qemu VMs on the same network (`dockyard_lab.vm`). The
running containers and the VMs' state directories are the source of truth for `status`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from dockyard_lab import defaults, vm
from dockyard_lab.docker import DockerError, docker, docker_ok
from dockyard_lab.images import ensure_image

Log = Callable[[str], None]

# Groups of the containers. In the seed topology every container is a Docker host (storage and
# registry are VMs); in the container-only topology the first container is also the storage and
# registry host (the registry on the export's directory: no NFS client in the kernel).
FIRST_HOST_GROUPS: tuple[str, ...] = ("docker_hosts", "storage", "registry")
OTHER_HOST_GROUPS: tuple[str, ...] = ("docker_hosts",)

# How a systemd host runs unprivileged on this kind of machine (see shared/LAB.md): every
# capability but SYS_RESOURCE, host cgroup namespace, loop devices for loop-file backing stores.
_RUN_FLAGS: tuple[str, ...] = (
    "--cap-add",
    "ALL",
    "--cap-drop",
    "SYS_RESOURCE",
    "--security-opt",
    "seccomp=unconfined",
    "--security-opt",
    "apparmor=unconfined",
    "--cgroupns=host",
    "-v",
    "/sys/fs/cgroup:/sys/fs/cgroup:rw",
    "--tmpfs",
    "/run",
    "--tmpfs",
    "/tmp",
    "--device",
    "/dev/loop-control",
    "--device-cgroup-rule",
    "b 7:* rmw",
    "--stop-signal",
    "SIGRTMIN+3",
)


@dataclass(frozen=True)
class LabHost:
    """One lab host as `status --json` reports it and `inventory/lab.py` consumes it."""

    name: str
    address: str
    release: str
    groups: list[str]
    ssh_user: str
    ssh_key: str
    ssh_known_hosts: str
    state: str
    image: str
    # `container` (a systemd host container) or `vm` (a qemu VM with its own kernel).
    kind: str = "container"

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _network() -> str:
    return defaults.LAB_NAME


def _key_paths() -> tuple[Path, Path]:
    state = defaults.lab_state_dir()
    return state / "id_ed25519", state / f"{defaults.LAB_NAME}.known_hosts"


def ensure_ssh_key(log: Log = print) -> Path:
    """The lab's own ssh key pair (0600 private key), made once per state directory."""
    key, _ = _key_paths()
    key.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(key.parent, 0o700)
    if not key.exists():
        log(f"    ssh key: generating {key}")
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dockyard-lab", "-f", str(key)],
            check=True,
        )
    os.chmod(key, 0o600)
    return key


def plan(
    hosts: int, releases: Sequence[str], topology: str = defaults.DEFAULT_TOPOLOGY
) -> list[tuple[str, str, tuple[str, ...]]]:
    """Names, releases and groups for a lab of `hosts` containers cycling through `releases`."""
    if topology not in defaults.LAB_TOPOLOGIES:
        raise ValueError(
            f"unknown lab topology {topology!r}; valid: {', '.join(defaults.LAB_TOPOLOGIES)}"
        )
    if hosts < 1:
        raise ValueError(f"--hosts must be at least 1, got {hosts}")
    bad = [r for r in releases if r not in defaults.LAB_RELEASES]
    if bad or not releases:
        raise ValueError(
            f"unknown lab release(s) {', '.join(bad) or '(none)'}; "
            f"valid: {', '.join(defaults.LAB_RELEASES)}"
        )
    counts: dict[str, int] = {}
    out = []
    for index in range(hosts):
        release = releases[index % len(releases)]
        counts[release] = counts.get(release, 0) + 1
        suffix = "" if hosts <= len(releases) else f"-{counts[release]}"
        first = index == 0 and topology == "containers"
        groups = FIRST_HOST_GROUPS if first else OTHER_HOST_GROUPS
        out.append((f"{defaults.LAB_NAME}-{release}{suffix}", release, groups))
    return out


def _wait_for_boot(name: str, deadline: float) -> None:
    state = ""
    while time.monotonic() < deadline:
        proc = subprocess.run(
            ["docker", "exec", name, "systemctl", "is-system-running"],
            capture_output=True,
            text=True,
            check=False,
        )
        state = proc.stdout.strip()
        if state in ("running", "degraded"):
            return
        time.sleep(0.5)
    raise DockerError(f"lab host {name} did not finish booting (systemd state {state!r})")


def _wait_for_ssh(address: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, 22), timeout=2) as sock:
                if sock.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise DockerError(f"sshd on lab host {address} did not answer")


def _address(name: str) -> str:
    out = docker(
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
        name,
    )
    return out.split()[0] if out.split() else ""


# Volumes of every lab host: the inner engine's data root, and /srv on a real filesystem
# (nfs-ganesha's VFS backend needs file handles, which the container's overlay root lacks).
HOST_VOLUMES: tuple[tuple[str, str], ...] = (("docker", "/var/lib/docker"), ("srv", "/srv"))


def _start_host(name: str, release: str, groups: Sequence[str], image: str) -> None:
    mounts = []
    for suffix, target in HOST_VOLUMES:
        volume = f"{name}-{suffix}"
        if not docker_ok("volume", "inspect", volume):
            docker(
                "volume", "create", "--label", f"{defaults.LAB_LABEL}={defaults.LAB_NAME}", volume
            )
        mounts += ["-v", f"{volume}:{target}"]
    docker(
        "run",
        "-d",
        "--name",
        name,
        "--hostname",
        name,
        "--network",
        _network(),
        "--label",
        f"{defaults.LAB_LABEL}={defaults.LAB_NAME}",
        "--label",
        f"{defaults.LAB_LABEL}.release={release}",
        "--label",
        f"{defaults.LAB_LABEL}.groups={','.join(groups)}",
        *_RUN_FLAGS,
        *mounts,
        image,
    )


def _authorise(name: str, pubkey: str) -> str:
    docker(
        "exec",
        "-i",
        name,
        "sh",
        "-c",
        "umask 077; mkdir -p /root/.ssh; cat > /root/.ssh/authorized_keys",
        input_text=pubkey,
    )
    return docker("exec", name, "cat", "/etc/ssh/ssh_host_ed25519_key.pub").strip()


def _ensure_images(
    releases: list[str], with_vm: bool, log: Log
) -> tuple[dict[str, str], Optional[vm.VmImage]]:
    """The container image of each release and, `with_vm`, the VM image: built side by side
    when not cached (each debootstrap spends much of its time downloading, so a fresh machine
    waits for the longest build, not for their sum). Every build runs to its end; the first
    error is raised then."""
    for release in releases:
        log(f"--> Lab image for {release}")
    if with_vm:
        log(f"--> Lab VM image ({defaults.VM_SUITE})")
    with ThreadPoolExecutor(max_workers=len(releases) + 1) as pool:
        futures = {release: pool.submit(ensure_image, release, log=log) for release in releases}
        vm_future = pool.submit(vm.ensure_vm_image, log) if with_vm else None
    images = {release: future.result() for release, future in futures.items()}
    return images, vm_future.result() if vm_future else None


def up(
    hosts: int = len(defaults.LAB_RELEASES),
    releases: Sequence[str] = defaults.LAB_RELEASES,
    vms: int = 0,
    log: Log = print,
    topology: str = defaults.DEFAULT_TOPOLOGY,
) -> list[LabHost]:
    """Create (or complete) the lab in `topology` (the seed's by default: storage and registry
    VMs beside the containers), with `vms` extra VM hosts; hosts already running are kept as
    they are, and a lab made with another topology is refused (`down` first)."""
    wanted = plan(hosts, releases, topology)
    wanted_vms = vm.vm_plan(topology, vms)  # refuses a negative count before anything starts
    _refuse_other_topology(wanted)
    key = ensure_ssh_key(log)
    pubkey = key.with_suffix(".pub").read_text()
    if not docker_ok("network", "inspect", _network()):
        log(f"--> Creating lab network {_network()}")
        docker(
            "network", "create", "--label", f"{defaults.LAB_LABEL}={defaults.LAB_NAME}", _network()
        )
    images, vm_image = _ensure_images(
        list(dict.fromkeys(r for _, r, _ in wanted)), bool(wanted_vms), log
    )
    deadline = time.monotonic() + defaults.LAB_BOOT_TIMEOUT
    for name, release, groups in wanted:
        running = docker_ok("container", "inspect", name)
        if running and docker("inspect", "-f", "{{.State.Running}}", name).strip() != "true":
            docker("start", name)
        if not running:
            log(f"--> Starting lab host {name} ({release})")
            _start_host(name, release, groups, images[release])
    # The VMs boot (one to two minutes under emulation) while the containers do.
    vm_started = time.monotonic()
    vm_records = vm.start_vms(wanted_vms, pubkey, _network(), vm_image, log=log) if vm_image else []
    known = []
    for name, _, _ in wanted:
        _wait_for_boot(name, deadline)
        hostkey = _authorise(name, pubkey)
        address = _address(name)
        _wait_for_ssh(address, deadline)
        known.append(f"{address} {hostkey}\n")
        log(f"    [{name}] up at {address}")
    vm_deadline = vm_started + defaults.VM_BOOT_TIMEOUT
    for record in vm_records:
        vm.wait_for_ssh(record, vm_deadline)
        log(f"    [{record.name}] up at {record.address} ({time.monotonic() - vm_started:.0f} s)")
    known += [f"{record.address} {record.host_key}\n" for record in vm.records()]
    _, known_hosts = _key_paths()
    known_hosts.write_text("".join(known))
    return status()


def _refuse_other_topology(wanted: Sequence[tuple[str, str, tuple[str, ...]]]) -> None:
    """A lab host that exists with other groups than the plan gives it was made with another
    topology: completing the lab would give it two storage or registry hosts."""
    existing = {h.name: h for h in status() if h.kind == "container"}
    for name, _, groups in wanted:
        host = existing.get(name)
        if host is not None and tuple(host.groups) != tuple(groups):
            raise DockerError(
                f"lab host {name} exists with groups {','.join(host.groups)}, not "
                f"{','.join(groups)} (another topology): run `dockyard-lab down` first"
            )


def status() -> list[LabHost]:
    """Every lab host the engine knows, with address, release, groups and ssh settings."""
    if not docker_ok("info"):
        raise DockerError("the Docker engine is not running (run `make engine`)")
    out = docker(
        "ps",
        "-a",
        "--filter",
        f"label={defaults.LAB_LABEL}={defaults.LAB_NAME}",
        "--format",
        "{{.Names}}",
    )
    names = sorted(out.split())
    key, known_hosts = _key_paths()
    result = []
    for item in json.loads(docker("inspect", *names)) if names else []:
        labels = item["Config"]["Labels"] or {}
        networks = item["NetworkSettings"]["Networks"] or {}
        address = (networks.get(_network()) or {}).get("IPAddress", "")
        result.append(
            LabHost(
                name=item["Name"].lstrip("/"),
                address=address,
                release=labels.get(f"{defaults.LAB_LABEL}.release", ""),
                groups=[g for g in labels.get(f"{defaults.LAB_LABEL}.groups", "").split(",") if g],
                ssh_user="root",
                ssh_key=str(key),
                ssh_known_hosts=str(known_hosts),
                state=item["State"]["Status"],
                image=item["Config"]["Image"],
            )
        )
    for record in vm.records():
        result.append(
            LabHost(
                name=record.name,
                address=record.address,
                release=defaults.VM_SUITE,
                groups=list(record.groups),
                ssh_user="root",
                ssh_key=str(key),
                ssh_known_hosts=str(known_hosts),
                state="running" if vm.qemu_pid(record.directory) is not None else "exited",
                image=str(defaults.vm_image_dir() / record.image / "disk.img"),
                kind="vm",
            )
        )
    return result


def down(log: Log = print) -> None:
    """Remove the lab's VMs (qemu, tap devices, overlays), containers, their volumes and the
    network; images stay cached."""
    vm.stop_vms(log)
    for host in status():
        if host.kind != "container":
            continue
        log(f"--> Removing lab host {host.name}")
        docker("rm", "-f", "-v", host.name)
    out = docker(
        "volume", "ls", "-q", "--filter", f"label={defaults.LAB_LABEL}={defaults.LAB_NAME}"
    )
    for volume in out.split():
        docker("volume", "rm", "-f", volume)
    if docker_ok("network", "inspect", _network()):
        docker("network", "rm", _network())
