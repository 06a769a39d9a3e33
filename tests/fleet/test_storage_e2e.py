"""Lab end to end for tier 1 (engine and storage driver) on bullseye, bookworm and trixie, and on
the storage and registry VMs (Docker hosts too): what a first deploy leaves, the btrfs data
root, every refusal and the rollback leave the engine running on its old configuration, and a
second deploy reports no change on any host."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.fleet.conftest import REUSE, DeployRun, run_deploy

pytestmark = pytest.mark.lab


def _driver(host: Any) -> str:
    return str(host.check_output("docker info --format '{{.Driver}}'"))


def _daemon_json(host: Any) -> dict[str, Any]:
    return dict(json.loads(host.file("/etc/docker/daemon.json").content_string))


def test_lab_status_lists_every_host(lab: list[dict[str, Any]]) -> None:
    containers = [h for h in lab if h["kind"] == "container"]
    assert sorted(h["release"] for h in containers) == ["bookworm", "bullseye", "trixie"]
    for h in lab:
        assert set(h) >= {"name", "address", "release", "groups", "ssh_user", "ssh_key", "kind"}
        assert h["state"] == "running" and "docker_hosts" in h["groups"]
    assert sum("storage" in h["groups"] for h in lab) == 1
    assert sum("registry" in h["groups"] for h in lab) == 1


def test_first_deploy_succeeds_everywhere(first_deploy: DeployRun) -> None:
    assert first_deploy.returncode == 0, first_deploy.failures()
    assert first_deploy.results["failed_hosts"] == []
    assert first_deploy.totals["error"] == 0
    # On a fresh lab the first deploy installs the engine and writes daemon.json everywhere.
    assert REUSE or first_deploy.totals["success"] >= 3 * 3


def test_engine_active_and_enabled(hosts: dict[str, Any]) -> None:
    for name, host in hosts.items():
        service = host.service("docker")
        assert service.is_running, name
        assert service.is_enabled, name
        assert host.package("docker.io").is_installed, name


def test_daemon_json_and_driver_match(hosts: dict[str, Any], btrfs_host: str) -> None:
    for name, host in hosts.items():
        want = "btrfs" if name == btrfs_host else "overlay2"
        assert _daemon_json(host) == {"live-restore": True, "storage-driver": want}, name
        assert _driver(host) == want, name
        config = host.file("/etc/docker/daemon.json")
        assert config.user == "root" and config.mode == 0o644


def test_btrfs_data_root_on_a_loop_file(hosts: dict[str, Any], btrfs_host: str) -> None:
    host = hosts[btrfs_host]
    # The top of the mount stack (the lab volume lies below it).
    assert host.check_output("stat -f -c %T /var/lib/docker") == "btrfs"
    assert "/dev/loop" in host.check_output("findmnt -n -o SOURCE /var/lib/docker | tail -n 1")
    assert host.file("/etc/fstab").contains(
        "^/srv/dockyard/docker-data.img /var/lib/docker btrfs defaults,loop 0 0$"
    )
    assert host.run("findmnt --verify --tab-file /etc/fstab").rc == 0
    assert host.check_output("docker info --format '{{.DockerRootDir}}'") == "/var/lib/docker"


def _unchanged(host: Any, before: dict[str, Any], driver: str) -> None:
    assert _daemon_json(host) == before
    assert host.service("docker").is_running
    assert _driver(host) == driver


def test_unrunnable_driver_fails_clearly_and_touches_nothing(
    hosts: dict[str, Any], overlay_host: str
) -> None:
    host = hosts[overlay_host]
    before = _daemon_json(host)
    run = run_deploy("--limit", overlay_host, "--data", "docker_storage_driver=btrfs")
    assert run.returncode != 0
    assert "docker_storage_driver='btrfs' needs the data root /var/lib/docker on btrfs" in run.log
    _unchanged(host, before, "overlay2")


def test_unknown_driver_names_the_valid_ones(hosts: dict[str, Any], overlay_host: str) -> None:
    run = run_deploy("--limit", overlay_host, "--data", "docker_storage_driver=overlay")
    assert run.returncode != 0
    assert "docker_storage_driver='overlay' is never configured" in run.log
    assert "valid: overlay2, btrfs, zfs, devicemapper, vfs" in run.log
    _unchanged(
        hosts[overlay_host], {"live-restore": True, "storage-driver": "overlay2"}, "overlay2"
    )


def test_engine_that_will_not_start_is_rolled_back(
    hosts: dict[str, Any], overlay_host: str
) -> None:
    host = hosts[overlay_host]
    before = _daemon_json(host)
    # overlay2.size needs xfs with pquota: dockerd accepts the file but cannot start on ext4.
    run = run_deploy("--limit", overlay_host, "--data", 'docker_storage_opts=["overlay2.size=1G"]')
    assert run.returncode != 0
    assert "did not come up with storage driver overlay2" in run.log
    assert "Restored the previous /etc/docker/daemon.json" in run.log
    assert "overlay2.size only supported for backingFS XFS" in run.log
    _unchanged(host, before, "overlay2")
    assert not host.file("/etc/docker/daemon.json.dockyard-new").exists


def test_switch_that_would_hide_images_is_refused(hosts: dict[str, Any], overlay_host: str) -> None:
    host = hosts[overlay_host]
    host.check_output("tar -C /etc -c hostname | docker import - dockyard-test/tiny:1")
    try:
        run = run_deploy("--limit", overlay_host, "--data", "docker_storage_driver=vfs")
        assert run.returncode != 0
        assert "switching the storage driver from overlay2 to vfs would hide 1 image(s)" in run.log
        assert "docker_storage_allow_switch=true" in run.log
        _unchanged(host, {"live-restore": True, "storage-driver": "overlay2"}, "overlay2")
        assert host.check_output("docker images -q dockyard-test/tiny:1")
    finally:
        host.run("docker rmi dockyard-test/tiny:1")


def test_second_deploy_reports_no_change_on_any_host(
    lab: list[dict[str, Any]], first_deploy: DeployRun
) -> None:
    run = run_deploy()
    assert run.returncode == 0, run.failures()
    assert run.results["failed_hosts"] == []
    assert run.totals["success"] == 0, run.changed_ops()
    assert run.totals["error"] == 0
    assert run.totals["no_change"] == run.totals["hosts"] > 0
