"""molecule's verify step: read-only checks of a converged lab over ssh (testinfra, the lab key,
strict host-key checking): the engine with the driver the inventory gives each host, daemon.json,
the fleet CA in certs.d, the registry answering over TLS, the NFS export on the storage host and
its mount on the registry host where that host's kernel has an NFS client. The lab is the one
DOCKYARD_LAB_NAME names; the full end-to-end suite is tests/fleet."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import testinfra

from dockyard_lab import defaults
from dockyard_lab.inventory import LAB_EXPORT, LAB_MOUNT, LAB_REGISTRY_USER, lab_groups
from dockyard_lab.molecule import lab_hosts, ssh_control_path, ssh_options

REGISTRY_PORT = 5443
STATE = defaults.lab_state_dir()


@pytest.fixture(scope="session")
def lab() -> list[dict[str, Any]]:
    hosts = lab_hosts()
    assert hosts, "no running lab host: run `molecule create` first"
    return hosts


def _host(item: dict[str, Any], known_hosts: str | None = None) -> Any:
    known = known_hosts or item["ssh_known_hosts"]
    return testinfra.get_host(
        f"ssh://{item['ssh_user']}@{item['address']}",
        ssh_identity_file=item["ssh_key"],
        ssh_extra_args=" ".join(ssh_options(known)),
        controlpath=ssh_control_path(item["ssh_user"], item["address"], known),
    )


@pytest.fixture(scope="session")
def hosts(lab: list[dict[str, Any]]) -> dict[str, Any]:
    return {item["name"]: _host(item) for item in lab}


@pytest.fixture(scope="session")
def data() -> dict[str, dict[str, Any]]:
    """Each host's inventory data (inventory/lab.py's), by name."""
    return {name: d for members in lab_groups().values() for name, d in members}


def _in(lab: list[dict[str, Any]], group: str) -> list[dict[str, Any]]:
    return [h for h in lab if group in h["groups"]]


def _expected_driver(data: dict[str, Any]) -> str:
    return "btrfs" if data.get("docker_storage_device_fs") == "btrfs" else "overlay2"


def _endpoint(lab: list[dict[str, Any]]) -> str:
    return f"{_in(lab, 'registry')[0]['address']}:{REGISTRY_PORT}"


def test_the_engine_runs_with_the_expected_driver(
    lab: list[dict[str, Any]], hosts: dict[str, Any], data: dict[str, dict[str, Any]]
) -> None:
    for item in _in(lab, "docker_hosts"):
        host = hosts[item["name"]]
        assert host.service("docker").is_running and host.service("docker").is_enabled
        driver = host.check_output("docker info --format '{{.Driver}}'")
        assert driver == _expected_driver(data[item["name"]]), item["name"]


def test_daemon_json(
    lab: list[dict[str, Any]], hosts: dict[str, Any], data: dict[str, dict[str, Any]]
) -> None:
    for item in _in(lab, "docker_hosts"):
        config = hosts[item["name"]].file("/etc/docker/daemon.json")
        assert config.user == "root" and config.mode == 0o644, item["name"]
        content = json.loads(config.content_string)
        assert content["storage-driver"] == _expected_driver(data[item["name"]]), item["name"]
        assert content["live-restore"] is True, item["name"]
        assert "insecure-registries" not in content, item["name"]


def test_every_docker_host_trusts_the_fleet_ca(
    lab: list[dict[str, Any]], hosts: dict[str, Any]
) -> None:
    ca = (STATE / f"{defaults.LAB_NAME}-pki" / "ca.crt").read_text()
    for item in _in(lab, "docker_hosts"):
        file = hosts[item["name"]].file(f"/etc/docker/certs.d/{_endpoint(lab)}/ca.crt")
        assert file.exists and file.mode == 0o444, item["name"]
        assert file.content_string == ca, item["name"]


def test_the_registry_answers_over_tls_with_the_fleet_ca(lab: list[dict[str, Any]]) -> None:
    context = ssl.create_default_context(cafile=str(STATE / f"{defaults.LAB_NAME}-pki/ca.crt"))
    password = (STATE / f"{defaults.LAB_NAME}.registry-password").read_text().strip()
    token = base64.b64encode(f"{LAB_REGISTRY_USER}:{password}".encode()).decode()
    request = urllib.request.Request(
        f"https://{_endpoint(lab)}/v2/", headers={"Authorization": f"Basic {token}"}
    )
    with urllib.request.urlopen(request, context=context, timeout=20) as response:
        assert response.status == 200


def test_the_storage_host_exports_the_registry_data(
    lab: list[dict[str, Any]], hosts: dict[str, Any]
) -> None:
    server = hosts[_in(lab, "storage")[0]["name"]]
    if server.service("nfs-kernel-server").is_running:
        assert LAB_EXPORT in server.check_output("exportfs -v")
    else:  # no nfsd in the kernel: nfs-ganesha
        assert server.service("nfs-ganesha").is_running
        assert LAB_EXPORT in server.file("/etc/ganesha/ganesha.conf").content_string
    assert server.file(LAB_EXPORT).uid == 65534


def test_the_registry_host_mounts_the_export(
    lab: list[dict[str, Any]], hosts: dict[str, Any]
) -> None:
    storage, registry = _in(lab, "storage")[0], _in(lab, "registry")[0]
    if registry["name"] == storage["name"]:
        pytest.skip("the registry runs on the storage host, in the export's directory")
    source = hosts[registry["name"]].check_output(f"findmnt -n -o SOURCE {LAB_MOUNT}")
    assert source == f"{storage['address']}:{LAB_EXPORT}"


def test_a_host_key_not_in_the_lab_known_hosts_is_refused(
    lab: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The same ssh options against a known_hosts holding another key for the address."""
    item = lab[0]
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text(f"{item['address']} {other.with_suffix('.pub').read_text()}")
    proc = subprocess.run(
        ["ssh", "-i", item["ssh_key"], *" ".join(ssh_options(str(known))).split()]
        + [f"{item['ssh_user']}@{item['address']}", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 255 and "Host key verification failed" in proc.stderr, proc.stderr
    assert _host(item).run("true").rc == 0  # and the lab's own known_hosts lets it in
