"""Lab end to end for the seed's topology on real kernels (the lab's default): the storage VM
exports with the kernel NFS server (`exportfs -ra` only when the exports change), the registry VM
mounts the export from /etc/fstab with the kernel's NFS client and serves the registry from the
mount; a blob pushed from a Docker host lands in the export on the storage host, owned by the
anonymous uid; after a reboot of the registry VM the mount and the registry come back by
themselves; while the NFS server is stopped the registry's /debug/health says 503 and it recovers
afterwards with nothing lost; with the mount gone a redeploy refuses to start the registry on the
bare directory. The VMs run their own kernels, host keys and overlays; nfs-ganesha serves where
the kernel has no NFS server (a container) and a VM's kernel mounts it. Every test leaves the lab
as the deploy made it."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from dockyard_lab import defaults
from tests.fleet.conftest import LAB_NAME, STATE, DeployRun, lab_inventory, run_deploy

pytestmark = pytest.mark.lab

EXPORT = "/srv/exports/registry"
MOUNT = "/mnt/registry"
PORT = 5443
# Bounds of the waits below (emulated VMs: a reboot takes one to two and a half minutes).
REBOOT_SECONDS = 420
HEALTH_SECONDS = 180


@pytest.fixture(scope="module")
def ca_file() -> Path:
    return STATE / f"{LAB_NAME}-pki" / "ca.crt"


def _ok(run: DeployRun) -> None:
    assert run.returncode == 0, run.failures()


def _https(endpoint: str, ca_file: Path, path: str) -> tuple[int, str]:
    """GET `path` over TLS verified with the fleet CA: status and body."""
    address, port = endpoint.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection((address, int(port)), timeout=10) as raw:
        raw.settimeout(20)
        with context.wrap_socket(raw, server_hostname=address) as tls:
            tls.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {endpoint}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    return int(head.split()[1]), body


def _health(endpoint: str, ca_file: Path) -> tuple[int, str]:
    try:
        return _https(endpoint, ca_file, "/debug/health")
    except (OSError, ValueError, IndexError) as exc:
        return 0, f"{type(exc).__name__}: {exc}"


def _wait_for(what: str, seconds: float, check: Any) -> Any:
    """Poll `check` (a callable returning a truthy value when done) until `seconds` pass."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(2)
    raise AssertionError(f"{what}: not within {seconds:.0f} s (last: {last!r})")


def _tiny_image(host: Any, tag: str) -> str:
    """An image of the host's own sh and cat with their libraries, and 200 kB of random data
    (a layer of its own digest on every run)."""
    host.check_output(
        "set -e; d=$(mktemp -d); for f in /bin/sh /bin/cat; do "
        "for x in $f $(ldd $(readlink -f $f) | grep -o '/[^ ]*'); do "
        'mkdir -p "$d$(dirname $x)"; cp -L "$x" "$d$x"; done; done; '
        "head -c 200000 /dev/urandom > $d/random.bin; "
        f"tar -C $d -c . | docker import - {tag} >/dev/null; rm -rf $d"
    )
    return tag


@pytest.fixture(scope="module")
def pushed(hosts: dict[str, Any], overlay_host: str, endpoint: str, password: str) -> str:
    """An image pushed with `docker push` from a container Docker host through certs.d."""
    host = hosts[overlay_host]
    ref = _tiny_image(host, f"{endpoint}/topology/probe:1")
    login = host.run(f"echo {password} | docker login -u fleet --password-stdin {endpoint}")
    assert login.rc == 0, login.stderr
    try:
        pushed = host.run(f"docker push {ref}")
        assert pushed.rc == 0, pushed.stderr
    finally:
        host.run(f"docker logout {endpoint}; docker rmi -f {ref}")
    return ref


def _skopeo_inspect(
    ca_file: Path, password: str, ref: str, tmp_path: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """skopeo inspect from the control machine, through the fleet CA, with the credentials."""
    certs = tmp_path / "certs"
    certs.mkdir(exist_ok=True)
    (certs / "ca.crt").write_bytes(ca_file.read_bytes())
    return subprocess.run(
        ["skopeo", "inspect", *extra, "--cert-dir", str(certs), "--creds", f"fleet:{password}"]
        + [f"docker://{ref}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_lab_is_the_seed_topology(lab: list[dict[str, Any]]) -> None:
    storage = [h for h in lab if "storage" in h["groups"]]
    registry = [h for h in lab if "registry" in h["groups"]]
    assert [h["kind"] for h in storage] == ["vm"] and [h["kind"] for h in registry] == ["vm"]
    assert storage[0]["name"] != registry[0]["name"]
    containers = [h for h in lab if h["kind"] == "container"]
    assert sorted(h["release"] for h in containers) == ["bookworm", "bullseye", "trixie"]
    assert all(h["groups"] == ["docker_hosts"] for h in containers)


def test_the_kernel_server_exports_to_the_fleet(
    hosts: dict[str, Any], storage: dict[str, Any], lab: list[dict[str, Any]]
) -> None:
    server = hosts[storage["name"]]
    assert server.service("nfs-kernel-server").is_running
    assert server.service("nfs-kernel-server").is_enabled
    assert not server.package("nfs-ganesha").is_installed
    exports = server.check_output("exportfs -v")
    for path in (EXPORT, "/srv/exports/wp-content"):
        assert path in exports, exports
        directory = server.file(path)
        assert directory.uid == 65534 and not directory.mode & 0o002
    table = server.file("/etc/exports.d/dockyard.exports").content_string
    for lab_host in lab:  # each fleet address, and nobody else
        assert lab_host["address"] in table
    assert "*" not in table and "all_squash" in table and "anonuid=65534" in table


def test_the_vms_run_real_kernels_from_overlays_with_their_own_host_keys(
    hosts: dict[str, Any], lab: list[dict[str, Any]]
) -> None:
    """Each VM: a Debian kernel of its own (not the machine's), its own hostname and ssh host
    key (the one the lab's known_hosts pins, no container's), booted from a qcow2 overlay whose
    backing file is the cached image."""
    known = [
        " ".join(k.split()[:3]) for k in Path(lab[0]["ssh_known_hosts"]).read_text().splitlines()
    ]
    for item in (h for h in lab if h["kind"] == "vm"):
        host = hosts[item["name"]]
        release = host.check_output("uname -r")
        assert release != os.uname().release and release.endswith("-amd64"), item["name"]
        assert host.check_output("hostname") == item["name"]
        key = " ".join(host.file("/etc/ssh/ssh_host_ed25519_key.pub").content_string.split()[:2])
        assert f"{item['address']} {key}" in known, item["name"]
        assert [k for k in known if k.endswith(key)] == [f"{item['address']} {key}"]
        overlay = defaults.lab_state_dir() / f"{LAB_NAME}-vms" / item["name"] / "overlay.qcow2"
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", str(overlay)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert info["format"] == "qcow2" and info["backing-filename-format"] == "raw"
        assert info["backing-filename"] == item["image"]


def test_ganesha_serves_where_the_kernel_has_no_nfsd_and_a_vm_kernel_mounts_it(
    hosts: dict[str, Any], lab: list[dict[str, Any]], registry: dict[str, Any], tmp_path: Path
) -> None:
    """nfs-ganesha stays covered where the kernel has no NFS server: the bookworm container
    joins `storage` in an inventory of the test's own, the deploy picks ganesha there from its
    facts, and the registry VM's kernel mounts that export, a root write landing as the
    anonymous uid. Afterwards ganesha is stopped and disabled, the export removed (the
    packages stay) and the lab's own deploy of the host puts back what the role changed."""
    item = next(h for h in lab if h["kind"] == "container" and h["release"] == "bookworm")
    container, client = hosts[item["name"]], hosts[registry["name"]]
    inventory = lab_inventory(tmp_path, join={"storage": [item["name"]]})
    mounted = "/mnt/dockyard-ganesha"
    export = "/srv/exports/wp-content"
    try:
        run = run_deploy("--limit", item["name"], inventory=inventory)
        _ok(run)
        assert "Install the NFS server (ganesha: nfs-ganesha, nfs-ganesha-vfs)" in run.log
        assert container.service("nfs-ganesha").is_running
        assert not container.mount_point(MOUNT).exists  # still only fstab: no NFS client here
        client.check_output(f"mkdir -p {mounted}")
        client.check_output(f"mount -t nfs4 {item['address']}:{export} {mounted}")
        try:
            client.check_output(f"echo from-the-vm > {mounted}/vm-probe.txt")
            probe = container.file(f"{export}/vm-probe.txt")
            assert probe.content_string == "from-the-vm\n"
            assert (probe.uid, probe.gid) == (65534, 65534)  # root on the VM, squashed
        finally:
            client.run(f"umount {mounted}; rmdir {mounted}")
    finally:
        container.run("systemctl disable --now nfs-ganesha; rm -rf /srv/exports")
        # As a second storage host it may have been pyinfra's first of the group, the server
        # of its NFS-backed volumes: the lab's own inventory puts them back.
        back = run_deploy("--limit", item["name"])
    _ok(back)
    assert _inspect_volume(container, "wp_content")["Options"]["o"].startswith(
        f"addr={next(h for h in lab if 'storage' in h['groups'])['address']},"
    )


def _inspect_volume(host: Any, name: str) -> dict[str, Any]:
    return json.loads(host.check_output(f"docker volume inspect {name}"))[0]


def test_exportfs_runs_when_the_exports_change(
    hosts: dict[str, Any], storage: dict[str, Any]
) -> None:
    server = hosts[storage["name"]]
    extra = "/srv/exports/dockyard-test"
    exports = [{"path": EXPORT}, {"path": "/srv/exports/wp-content"}, {"path": extra}]
    limit = ("--limit", storage["name"])
    try:
        added = run_deploy(*limit, "--data", f"nfs_server_exports={json.dumps(exports)}")
        _ok(added)
        assert any("exportfs -ra" in op for op in added.changed_ops()), added.changed_ops()
        assert extra in server.check_output("exportfs -v")
    finally:
        back = run_deploy(*limit)
        server.run(f"rmdir {extra}")
    _ok(back)
    assert any("exportfs -ra" in op for op in back.changed_ops()), back.changed_ops()
    assert extra not in server.check_output("exportfs -v")
    # With the exports unchanged no exportfs runs: the storage tests' last check (a second
    # deploy reports no change on any host) covers it.


def test_the_registry_host_mounts_the_export_from_fstab(
    hosts: dict[str, Any], storage: dict[str, Any], registry: dict[str, Any]
) -> None:
    host = hosts[registry["name"]]
    source, fstype = host.check_output(f"findmnt -n -o SOURCE,FSTYPE {MOUNT}").split()
    assert (source, fstype) == (f"{storage['address']}:{EXPORT}", "nfs4")
    line = f"{storage['address']}:{EXPORT} {MOUNT} nfs4 rw,hard,noatime,_netdev 0 0"
    assert host.file("/etc/fstab").content_string.count(line) == 1
    config = host.file("/etc/dockyard/registry/config.yml").content_string
    assert f"rootdirectory: {MOUNT}" in config
    unit = host.file("/etc/systemd/system/dockyard-registry.service").content_string
    assert f"RequiresMountsFor={MOUNT}" in unit
    assert host.service("dockyard-registry").is_running


def test_a_blob_pushed_from_a_docker_host_lands_in_the_export_as_the_anonymous_uid(
    hosts: dict[str, Any],
    storage: dict[str, Any],
    ca_file: Path,
    password: str,
    pushed: str,
    tmp_path: Path,
) -> None:
    server = hosts[storage["name"]]
    raw = _skopeo_inspect(ca_file, password, pushed, tmp_path, "--raw")
    assert raw.returncode == 0, raw.stderr
    manifest = json.loads(raw.stdout)
    digests = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
    for digest in digests:
        hexa = digest.split(":", 1)[1]
        data = server.file(f"{EXPORT}/docker/registry/v2/blobs/sha256/{hexa[:2]}/{hexa}/data")
        assert data.exists, digest
        assert (data.uid, data.gid) == (65534, 65534), digest
    strays = server.check_output(f"find {EXPORT}/docker -not -uid 65534 | head -5")
    assert strays == ""  # everything the registry wrote, squashed to the anonymous user


def test_an_nfs_outage_shows_in_health_and_nothing_is_lost(
    hosts: dict[str, Any],
    storage: dict[str, Any],
    endpoint: str,
    ca_file: Path,
    password: str,
    pushed: str,
    tmp_path: Path,
) -> None:
    server = hosts[storage["name"]]
    assert _health(endpoint, ca_file)[0] == 200
    # A restarted nfsd refuses new opens for its grace period (90 s by default): 15 s here, so
    # the reads after the outage need not wait that long. Read when nfsd starts.
    server.check_output(
        "mkdir -p /etc/nfs.conf.d && printf '[nfsd]\\ngrace-time=15\\nlease-time=15\\n' "
        "> /etc/nfs.conf.d/dockyard-test.conf"
    )
    server.check_output("systemctl stop nfs-kernel-server")
    try:
        status, body = _wait_for(
            "/debug/health to report the storage failure",
            HEALTH_SECONDS,
            lambda: (lambda r: r if r[0] == 503 else None)(_health(endpoint, ca_file)),
        )
        assert "storagedriver_filesystem" in json.loads(body)
    finally:
        server.check_output("systemctl start nfs-kernel-server")
        server.run("rm -f /etc/nfs.conf.d/dockyard-test.conf")
    _wait_for(
        "/debug/health to recover", HEALTH_SECONDS, lambda: _health(endpoint, ca_file)[0] == 200
    )
    ref = pushed
    inspected = _skopeo_inspect(ca_file, password, ref, tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    assert len(json.loads(inspected.stdout)["Layers"]) == 1


def test_a_redeploy_refuses_to_start_the_registry_on_the_bare_directory(
    hosts: dict[str, Any],
    registry: dict[str, Any],
    endpoint: str,
    ca_file: Path,
    password: str,
    pushed: str,
    tmp_path: Path,
) -> None:
    """The mount gone (unmounted, and the deploy's data no longer naming it): the host fails at
    the check, the registry stays stopped, nothing is written to the bare directory and its
    configuration stays. A plain redeploy then mounts the export again and starts it."""
    host = hosts[registry["name"]]
    config = host.file("/etc/dockyard/registry/config.yml").content_string
    host.check_output(f"systemctl stop dockyard-registry && umount {MOUNT}")
    try:
        refused = run_deploy("--limit", registry["name"], "--data", "nfs_client_mounts=[]")
        assert refused.returncode != 0
        assert f"registry_data_dir {MOUNT} is not NFS-backed" in refused.log
        assert not host.service("dockyard-registry").is_running
        assert host.check_output(f"ls -A {MOUNT}") == ""  # nothing written to the local disk
        assert host.file("/etc/dockyard/registry/config.yml").content_string == config
    finally:
        back = run_deploy("--limit", registry["name"])
    _ok(back)
    assert host.check_output(f"findmnt -n -o FSTYPE {MOUNT}") == "nfs4"
    assert host.service("dockyard-registry").is_running
    ref = pushed
    assert _skopeo_inspect(ca_file, password, ref, tmp_path).returncode == 0


def test_the_mount_and_the_registry_come_back_after_a_reboot(
    hosts: dict[str, Any],
    registry: dict[str, Any],
    endpoint: str,
    ca_file: Path,
    password: str,
    pushed: str,
    tmp_path: Path,
) -> None:
    host = hosts[registry["name"]]
    boot_id = host.check_output("cat /proc/sys/kernel/random/boot_id")
    host.run("systemd-run --on-active=2 --timer-property=AccuracySec=100ms systemctl reboot")

    def rebooted() -> bool:
        try:
            probe = host.run("cat /proc/sys/kernel/random/boot_id")
        except RuntimeError:  # testinfra's ssh backend raises when ssh itself fails (exit 255)
            return False
        return probe.rc == 0 and probe.stdout.strip() not in ("", boot_id)

    _wait_for("the registry VM to reboot", REBOOT_SECONDS, rebooted)
    _wait_for(
        "the registry to answer /v2/ after the reboot",
        REBOOT_SECONDS,
        lambda: _health(endpoint, ca_file)[0] == 200,
    )
    assert host.check_output(f"findmnt -n -o FSTYPE {MOUNT}") == "nfs4"
    assert host.service("dockyard-registry").is_running
    ref = pushed
    inspected = _skopeo_inspect(ca_file, password, ref, tmp_path)
    assert inspected.returncode == 0, inspected.stderr
