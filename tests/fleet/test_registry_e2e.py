"""Lab end to end for tiers 2 and 3: the TLS registry on the registry VM (data on its NFS mount
of the storage VM's export), trusted by every host through certs.d, pulled from every host with
docker and with the bundled core, the export squashed to the anonymous uid (written from a
container host with the userspace client), fstab lines valid where the kernel has no NFS client,
insecure mode on one host only when asked, and the registry's data surviving a kill. Every test
leaves the lab as the deploy made it (the last storage test checks no change)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.fleet.conftest import LAB_NAME, STATE, run_deploy
from tests.helpers import docker_import

pytestmark = pytest.mark.lab
EXPORT = "/srv/exports/registry"
MOUNT = "/mnt/registry"


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the CA certificate (skopeo reads every *.key in a cert dir as a client key)."""
    target = tmp_path_factory.mktemp("fleet-ca")
    (target / "ca.crt").write_bytes((STATE / f"{LAB_NAME}-pki" / "ca.crt").read_bytes())
    return target


def _push(endpoint: str, password: str, ca_dir: Path, src: Path, repo: str) -> str:
    """A small image of random bytes pushed from the control machine with skopeo, over TLS
    with auth; returns its reference."""
    src.mkdir(parents=True, exist_ok=True)
    (src / "hello.txt").write_text("hello from the fleet registry\n")
    (src / "data.bin").write_bytes(os.urandom(300_000))
    local = f"dockyard-test/{repo.replace('/', '-')}:1"
    docker_import(src, local)
    ref = f"{endpoint}/{repo}:1"
    proc = subprocess.run(
        [
            "skopeo",
            "copy",
            "--dest-cert-dir",
            str(ca_dir),
            "--dest-creds",
            f"fleet:{password}",
            f"docker-daemon:{local}",
            f"docker://{ref}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    subprocess.run(["docker", "rmi", "-f", local], capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return ref


@pytest.fixture(scope="module")
def pushed(
    endpoint: str, password: str, ca_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A small image pushed from the control machine with skopeo, over TLS with auth."""
    return _push(endpoint, password, ca_dir, tmp_path_factory.mktemp("fleet-image"), "fleet/app")


def _inspect(
    ca_dir: Path, password: str, ref: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    """skopeo inspect through the fleet CA with the registry's credentials."""
    return subprocess.run(
        [
            "skopeo",
            "inspect",
            *extra,
            "--cert-dir",
            str(ca_dir),
            "--creds",
            f"fleet:{password}",
            f"docker://{ref}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _get(endpoint: str, ca: Path, auth: str | None = None) -> tuple[int, str]:
    host, port = endpoint.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca / "ca.crt"))
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            headers = f"Authorization: Basic {auth}\r\n" if auth else ""
            tls.sendall(
                f"GET /v2/ HTTP/1.1\r\nHost: {endpoint}\r\n{headers}"
                "Connection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := tls.recv(4096):
                data += chunk
    head = data.decode(errors="replace")
    return int(head.split()[1]), head


def test_registry_serves_tls_with_the_fleet_ca_and_requires_auth(
    endpoint: str, ca_dir: Path, password: str
) -> None:
    import base64

    status, head = _get(endpoint, ca_dir)
    assert status == 401 and 'WWW-Authenticate: Basic realm="dockyard"' in head
    token = base64.b64encode(f"fleet:{password}".encode()).decode()
    assert _get(endpoint, ca_dir, token)[0] == 200
    old = subprocess.run(
        [
            "openssl",
            "s_client",
            "-tls1_1",
            "-cipher",
            "DEFAULT@SECLEVEL=0",
            "-connect",
            endpoint,
            "-CAfile",
            str(ca_dir / "ca.crt"),
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert old.returncode != 0 and "Cipher is (NONE)" in old.stdout


def test_every_host_pulls_through_certs_d(
    hosts: dict[str, Any], endpoint: str, password: str, pushed: str
) -> None:
    """Every host at once (each over its own ssh): the emulated VMs take most of the time."""

    def pull(name: str, host: Any) -> None:
        ca = host.file(f"/etc/docker/certs.d/{endpoint}/ca.crt")
        assert ca.exists and ca.user == "root" and ca.mode == 0o444, name
        config = json.loads(host.file("/etc/docker/daemon.json").content_string)
        assert "insecure-registries" not in config, name
        login = host.run(f"echo {password} | docker login -u fleet --password-stdin {endpoint}")
        assert login.rc == 0, (name, login.stderr)
        pulled = host.run(f"docker pull {pushed}")
        assert pulled.rc == 0, (name, pulled.stderr)
        core = host.run(
            f"echo {password} | dockyard image pull {pushed} --root /tmp/dy-e2e "
            "--username fleet --password-stdin"
        )
        assert core.rc == 0 and "Image sha256:" in core.stdout, (name, core.stderr)
        # the venv was made without pip: the wheelhouse's pip wheel installed the core
        assert not host.file("/opt/dockyard/venv/bin/pip").exists, name
        host.run(f"docker rmi -f {pushed}; docker logout {endpoint}; rm -rf /tmp/dy-e2e")

    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        futures = [pool.submit(pull, name, host) for name, host in hosts.items()]
    for future in futures:
        future.result()  # the first host's failure, with its name


def test_ca_key_never_leaves_the_control_machine(hosts: dict[str, Any]) -> None:
    for name, host in hosts.items():
        keys = host.run("grep -rl 'PRIVATE KEY' /etc/dockyard /etc/docker 2>/dev/null").stdout
        found = [k for k in keys.split() if k]
        assert all(k.endswith("/registry.key") for k in found), (name, found)


def test_registry_runs_unprivileged_with_a_0600_key(
    hosts: dict[str, Any], registry: dict[str, Any]
) -> None:
    host = hosts[registry["name"]]
    assert host.service("dockyard-registry").is_running
    assert host.service("dockyard-registry").is_enabled
    key = host.file("/etc/dockyard/registry/certs/registry.key")
    assert key.mode == 0o600 and key.user == "nobody"
    assert host.check_output("ps -o user= -C dockyard").split()[0] == "nobody"


def test_export_is_served_and_squashed_to_the_anonymous_uid(
    hosts: dict[str, Any], storage: dict[str, Any], overlay_host: str
) -> None:
    server = hosts[storage["name"]]
    client = hosts[overlay_host]  # a container: libnfs-utils, the userspace client
    url = f"nfs://{storage['address']}{EXPORT}"
    probe = f"nfs-probe-{os.getpid()}-{time.monotonic_ns()}.txt"  # never one a run left
    client.check_output(f"echo written-over-nfs > /tmp/{probe}")
    copied = client.run(f"nfs-cp /tmp/{probe} '{url}/{probe}?version=4'")
    assert copied.rc == 0, copied.stderr
    try:
        assert probe in client.check_output(f"nfs-ls '{url}?version=4'")
        landed = server.file(f"{EXPORT}/{probe}")
        assert landed.uid == 65534 and landed.gid == 65534
        assert landed.content_string == "written-over-nfs\n"
        export_dir = server.file(EXPORT)
        assert export_dir.user == "nobody" and not export_dir.mode & 0o002
    finally:
        server.run(f"rm -f {EXPORT}/{probe}")
        client.run(f"rm -f /tmp/{probe}")


def test_clients_have_valid_fstab_lines_only_written(
    hosts: dict[str, Any], storage: dict[str, Any], lab: list[dict[str, Any]]
) -> None:
    """The container Docker hosts: no NFS client in the machine's kernel (the registry VM's
    mount is real: tests/fleet/test_topology_e2e.py)."""
    for name in (h["name"] for h in lab if h["kind"] == "container"):
        host = hosts[name]
        line = f"{storage['address']}:{EXPORT} /mnt/registry nfs4 rw,hard,noatime,_netdev 0 0"
        fstab = host.file("/etc/fstab").content_string
        assert fstab.count("/mnt/registry") == 1 and line in fstab, name
        assert host.run("findmnt --verify --tab-file /etc/fstab").rc == 0, name
        assert host.file("/mnt/registry").is_directory
        assert not host.mount_point("/mnt/registry").exists  # no NFS client in this kernel


def test_insecure_mode_on_one_host_only_when_asked(
    hosts: dict[str, Any], endpoint: str, overlay_host: str
) -> None:
    host = hosts[overlay_host]
    before = json.loads(host.file("/etc/docker/daemon.json").content_string)
    run = run_deploy("--limit", overlay_host, "--data", "registry_trust_mode=insecure")
    assert run.returncode == 0, run.failures()
    assert "registry_trust_mode=insecure" in run.log and "without verifying" in run.log
    config = json.loads(host.file("/etc/docker/daemon.json").content_string)
    assert config["insecure-registries"] == [endpoint]
    assert config["storage-driver"] == before["storage-driver"]
    assert host.check_output("docker info --format '{{.Driver}}'") == before["storage-driver"]
    assert endpoint in host.check_output("docker info --format '{{json .RegistryConfig}}'")
    back = run_deploy("--limit", overlay_host)
    assert back.returncode == 0, back.failures()
    assert json.loads(host.file("/etc/docker/daemon.json").content_string) == before


def test_registry_refuses_a_data_dir_that_is_not_nfs_backed(
    hosts: dict[str, Any], registry: dict[str, Any]
) -> None:
    run = run_deploy(
        "--limit", registry["name"], "--data", "registry_data_dir=/var/tmp/local-registry"
    )
    assert run.returncode != 0
    assert "registry_data_dir /var/tmp/local-registry is not NFS-backed" in run.log
    host = hosts[registry["name"]]
    assert host.service("dockyard-registry").is_running
    assert (
        f"rootdirectory: {MOUNT}" in host.file("/etc/dockyard/registry/config.yml").content_string
    )
    assert not host.file("/var/tmp/local-registry").exists


def test_registry_data_survives_a_kill(
    hosts: dict[str, Any],
    registry: dict[str, Any],
    endpoint: str,
    ca_dir: Path,
    password: str,
    pushed: str,
) -> None:
    host = hosts[registry["name"]]
    host.run("systemctl kill -s KILL dockyard-registry")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if host.run("systemctl is-active dockyard-registry").stdout.strip() == "active":
            try:
                if _get(endpoint, ca_dir)[0] == 401:
                    break
            except OSError:
                pass
        time.sleep(0.5)
    proc = _inspect(ca_dir, password, pushed)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["Layers"]) == 1


def test_upstream_registry_image_from_an_archive(
    hosts: dict[str, Any],
    registry: dict[str, Any],
    storage: dict[str, Any],
    endpoint: str,
    ca_dir: Path,
    password: str,
    pushed: str,
    tmp_path: Path,
) -> None:
    """registry_image + registry_image_archive: the CNCF registry (built from Debian's
    docker-registry, no Docker Hub) as a container over the same NFS-backed data; recreated
    after docker rm -f with the data intact; then back to the bundled core."""
    archive = tmp_path / "registry.tar"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dockyard-lab"), "registry-archive", str(archive)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    image = [
        "--data",
        "registry_image=dockyard-lab/registry:2",
        "--data",
        f"registry_image_archive={archive}",
    ]
    limit = ["--limit", registry["name"]]
    host = hosts[registry["name"]]

    def inspect() -> subprocess.CompletedProcess[str]:
        return _inspect(ca_dir, password, pushed)

    try:
        run = run_deploy(*limit, *image)
        assert run.returncode == 0, run.failures()
        assert (
            host.check_output("docker ps --format '{{.Names}} {{.Image}}'")
            == "dockyard-registry dockyard-lab/registry:2"
        )
        assert not host.service("dockyard-registry").is_running
        assert _get(endpoint, ca_dir)[0] == 401
        assert inspect().returncode == 0
        again = run_deploy(*limit, *image)
        assert again.totals["success"] == 0, again.changed_ops()
        host.check_output("docker rm -f dockyard-registry")
        recreated = run_deploy(*limit, *image)
        assert recreated.returncode == 0
        assert any("Run the registry container" in op for op in recreated.changed_ops())
        assert inspect().returncode == 0  # the data survived the container
        # What the container writes lands in the storage host's export, squashed.
        via = _push(endpoint, password, ca_dir, tmp_path / "src", "fleet/via-container")
        raw = _inspect(ca_dir, password, via, "--raw")
        assert raw.returncode == 0, raw.stderr
        layer = json.loads(raw.stdout)["layers"][0]["digest"].split(":", 1)[1]
        blob = hosts[storage["name"]].file(
            f"{EXPORT}/docker/registry/v2/blobs/sha256/{layer[:2]}/{layer}/data"
        )
        assert blob.exists and (blob.uid, blob.gid) == (65534, 65534)
    finally:
        back = run_deploy(*limit)
    assert back.returncode == 0, back.failures()
    assert host.service("dockyard-registry").is_running
    assert host.check_output("docker ps -a --format '{{.Names}}'") == ""
    assert inspect().returncode == 0


def test_first_deploy_says_only_fstab_was_written(first_deploy: Any) -> None:
    assert (
        "the kernel has no NFS client: only /etc/fstab was written for /mnt/registry"
        in first_deploy.log
    )


def test_os_trust_store_when_asked(hosts: dict[str, Any], endpoint: str, overlay_host: str) -> None:
    run = run_deploy("--limit", overlay_host, "--data", "registry_trust_os_store=true")
    assert run.returncode == 0, run.failures()
    host = hosts[overlay_host]
    anchor = host.file("/usr/local/share/ca-certificates/dockyard-fleet-ca.crt")
    assert anchor.exists
    # Python's default context reads the system bundle: the TLS handshake now verifies.
    probe = host.run(
        'python3 -c "import urllib.request, urllib.error\n'
        f"try: urllib.request.urlopen('https://{endpoint}/v2/', timeout=10)\n"
        'except urllib.error.HTTPError as e: print(e.code)"'
    )
    assert probe.rc == 0 and probe.stdout.strip() == "401", probe.stderr


def test_mutual_tls_when_asked(
    hosts: dict[str, Any],
    endpoint: str,
    ca_dir: Path,
    password: str,
    pushed: str,
    registry: dict[str, Any],
    overlay_host: str,
) -> None:
    """registry_client_certs on the registry host and one Docker host (the others would only
    repeat it, each in emulated minutes on the VMs): the registry then refuses a handshake
    without a client certificate, and the Docker host pulls with the certs.d client pair."""
    limit = ("--limit", registry["name"], "--limit", overlay_host)  # one flag per host
    run = run_deploy(*limit, "--data", "registry_client_certs=true")
    try:
        assert run.returncode == 0, run.failures()
        with pytest.raises((ssl.SSLError, ConnectionError, OSError, IndexError, ValueError)):
            _get(endpoint, ca_dir)  # no client certificate: the handshake or request fails
        host = hosts[overlay_host]
        certs = f"/etc/docker/certs.d/{endpoint}"
        assert host.file(f"{certs}/client.cert").mode == 0o444
        assert host.file(f"{certs}/client.key").mode == 0o600
        pulled = host.run(
            f"echo {password} | dockyard image pull {pushed} --root "
            "/tmp/dy-mtls --username fleet --password-stdin"
        )
        assert pulled.rc == 0, pulled.stderr
        login = host.run(f"echo {password} | docker login -u fleet --password-stdin {endpoint}")
        assert login.rc == 0, login.stderr
        assert host.run(f"docker pull {pushed}").rc == 0
        host.run(f"docker rmi -f {pushed}; docker logout {endpoint}; rm -rf /tmp/dy-mtls")
    finally:
        back = run_deploy(*limit)
    assert back.returncode == 0, back.failures()
    assert _get(endpoint, ca_dir)[0] == 401
