"""Whole deploys, as `deploy.py` composes them, on the seed's topology — an NFS server, a registry
host that mounts its export, a Docker host: three different hosts — each holding only what a user
would set (no lab data), with facts from a table. What pyinfra would run is read from its own
State; nothing connects and nothing on this machine may change while a run is prepared."""

from __future__ import annotations

import json
import logging
import runpy
from pathlib import Path
from typing import Any

import pytest

from dockyard_deploys import dockyard_core
from tests.operations.fakes import FleetHost, PreparedFleet, failure, prepare_fleet

ROOT = Path(__file__).resolve().parents[2]
BOOKWORM = {
    "__value__": {
        "name": "Debian",
        "major": 12,
        "minor": None,
        "release_meta": {"ID": "debian", "VERSION_ID": "12", "VERSION_CODENAME": "bookworm"},
    }
}
# Facts every host answers: Debian 12 on ext4 with kernel NFS and AppArmor, nothing installed yet.
BASE: dict[str, Any] = {
    "LinuxDistribution": BOOKWORM,
    "KernelFilesystems": ["nodev\toverlay", "\text4", "\txfs", "\tbtrfs"],
    "PathFilesystem": ["/var/lib/docker", "ext4 /dev/sda1 /", "ftype="],
    "DockerEngine": [],
    "KernelNfs": ["server=yes client=yes"],
    "KernelAppArmor": ["Y", "securityfs"],
    "HostPython": {"__value__": {"version": "3.11", "machine": "x86_64"}},
    "Mounts": {"__value__": {"/": {"type": "ext4"}}},
}
EXPORT = "/srv/exports/registry"
# The registry host mounts the NFS server's export where the registry keeps its data.
REGISTRY_MOUNTED = {
    "nfs_client_mounts": [{"src": f"nfs-01.example.net:{EXPORT}", "path": "/srv/registry"}],
    "registry_data_dir": "/srv/registry",
}
NFS_MOUNTED = {
    "__value__": {"/": {"type": "ext4"}, "/srv/registry": {"type": "nfs4"}},
}


def seed(registry_data: dict[str, Any], registry_facts: dict[str, Any]) -> list[FleetHost]:
    return [
        FleetHost("nfs-01.example.net", ["storage"], {}, dict(BASE)),
        FleetHost(
            "registry-01.example.net", ["registry"], registry_data, {**BASE, **registry_facts}
        ),
        FleetHost("docker-01.example.net", ["docker_hosts"], {}, dict(BASE)),
    ]


def run_deploy_py(
    hosts: list[FleetHost], monkeypatch: pytest.MonkeyPatch, diff: bool = False
) -> PreparedFleet:
    """`deploy.py` for every host (the core's install, tested on its own, left out)."""
    monkeypatch.setattr(dockyard_core, "install_dockyard_core", lambda: None)
    return prepare_fleet(
        hosts, lambda host: runpy.run_path(str(ROOT / "deploy.py")), monkeypatch, diff=diff
    )


@pytest.fixture(autouse=True)
def control_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty home and working directory: whatever a prepared run writes shows up here."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return tmp_path


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_registry_host_outside_storage_is_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: on a registry host that is not in `storage`, the NFS server's defaults made the
    registry believe its default data dir was exported here — no guard, no RequiresMountsFor:
    it wrote to the local disk. Now the guard runs and refuses the unmounted path."""
    fleet = run_deploy_py(seed({}, {}), monkeypatch)
    host = "registry-01.example.net"
    guard = fleet.op(host, f"Run the TLS registry | Check that {EXPORT} is NFS-backed")
    (command,) = guard.commands()
    assert f"registry_data_dir {EXPORT} is not NFS-backed" in failure(command)
    unit = fleet.op(host, "Run the TLS registry | Write the dockyard-registry systemd unit")
    assert f"RequiresMountsFor={EXPORT}" in "\n".join(unit.commands())


def test_registry_on_the_mounted_export_passes_the_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = run_deploy_py(seed(REGISTRY_MOUNTED, {"Mounts": NFS_MOUNTED}), monkeypatch)
    host = "registry-01.example.net"
    guard = fleet.op(host, "Run the TLS registry | Check that /srv/registry is NFS-backed")
    assert guard.commands() == []
    unit = fleet.op(host, "Run the TLS registry | Write the dockyard-registry systemd unit")
    assert "RequiresMountsFor=/srv/registry" in "\n".join(unit.commands())
    fstab = fleet.op(host, "Mount NFS volumes | Mount nfs-01.example.net")
    assert any(
        f"nfs-01.example.net:{EXPORT} /srv/registry nfs4 rw,hard,noatime,_netdev 0 0" in c
        for c in fstab.commands()
    )


def test_registry_on_the_storage_host_uses_its_own_export(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One host in storage and registry (the lab's shape): the export is this host's."""
    hosts = [FleetHost("nfs-01.example.net", ["storage", "registry"], {}, dict(BASE))]
    fleet = run_deploy_py(hosts, monkeypatch)
    guard = fleet.op("nfs-01.example.net", "Run the TLS registry | Check that")
    assert guard.commands() == []
    unit = fleet.op("nfs-01.example.net", "Run the TLS registry | Write the dockyard-registry")
    assert "RequiresMountsFor" not in "\n".join(unit.commands())


def test_seed_topology_runs_each_tier_on_its_own_host(monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = run_deploy_py(seed(REGISTRY_MOUNTED, {"Mounts": NFS_MOUNTED}), monkeypatch)
    nfs, registry, docker = (
        " ".join(fleet.names(h))
        for h in ("nfs-01.example.net", "registry-01.example.net", "docker-01.example.net")
    )
    assert "Export NFS volumes" in nfs and "Run the TLS registry" not in nfs
    assert "Run the TLS registry" in registry and "Export NFS volumes" not in registry
    assert "Configure the Docker daemon" in docker and "Run the TLS registry" not in docker
    # The NFS server exports to every host of the inventory by default.
    table = fleet.op("nfs-01.example.net", "Export NFS volumes | Write /etc/exports.d")
    text = "\n".join(table.commands())
    assert f"{EXPORT} docker-01.example.net(" in text and "registry-01.example.net(" in text
    # The Docker host trusts the registry host's endpoint (its port default applies there).
    assert "certs.d/registry-01.example.net:5443" in docker


def test_every_export_comes_before_any_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug (seen in the lab): pyinfra merges the hosts' operation lists, and the registry host
    mounted the export before the storage host had exported it ('access denied by server').
    Now every storage operation comes before every mount, on whatever host."""
    fleet = run_deploy_py(seed(REGISTRY_MOUNTED, {}), monkeypatch)
    order = fleet.state.get_op_order()
    exports = [o.op_hash for o in fleet.ops("nfs-01.example.net") if "Export NFS" in o.name]
    mounts = [o.op_hash for o in fleet.ops("registry-01.example.net") if "Mount NFS" in o.name]
    assert exports and mounts
    assert max(order.index(h) for h in exports) < min(order.index(h) for h in mounts)


def test_apparmor_comes_with_the_engine_where_the_kernel_enforces_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bug (seen on the lab's VMs): docker.io without apparmor (recommends not installed) on an
    AppArmor kernel refuses to start any container. A container host (no securityfs) gets none."""
    hosts = [
        FleetHost("docker-01.example.net", ["docker_hosts"], {}, dict(BASE)),
        FleetHost("docker-02.example.net", ["docker_hosts"], {}, {**BASE, "KernelAppArmor": ["Y"]}),
    ]
    fleet = run_deploy_py(hosts, monkeypatch)
    assert any("Install apparmor" in n for n in fleet.names("docker-01.example.net"))
    assert not any("Install apparmor" in n for n in fleet.names("docker-02.example.net"))


def test_registry_image_without_pki_dir_uses_the_default_pki_dir(
    monkeypatch: pytest.MonkeyPatch, control_machine: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bug: with registry_image set and registry_pki_dir unset, the container path issued the
    certificate from a CA in a directory literally named `None` on the control machine."""
    data = {**REGISTRY_MOUNTED, "registry_image": "registry:2"}
    with caplog.at_level(logging.INFO):
        fleet = run_deploy_py(seed(data, {"Mounts": NFS_MOUNTED}), monkeypatch)
    assert not (control_machine / "cwd" / "None").exists()
    assert _files(control_machine / "cwd") == []
    run = fleet.op("registry-01.example.net", "Run the TLS registry | Run the registry container")
    assert run.commands()[-1].startswith("docker run -d --name dockyard-registry")
    assert "would issue registry-registry-01.example.net.crt" in caplog.text
    assert "in ~/.local/share/dockyard/pki on this machine" in caplog.text


def test_preparing_a_run_creates_nothing_on_the_control_machine(
    monkeypatch: pytest.MonkeyPatch, control_machine: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`pyinfra … --dry` prepares and stops: no CA, no certificate, nothing written; the run
    says what it would issue instead."""
    data = {**REGISTRY_MOUNTED, "registry_client_certs": True}
    with caplog.at_level(logging.INFO):
        run_deploy_py(seed(data, {"Mounts": NFS_MOUNTED}), monkeypatch)
    assert _files(control_machine) == ["cwd", "home"]
    assert "would create the fleet CA in ~/.local/share/dockyard/pki" in caplog.text
    assert "would issue client-docker-01.example.net.crt" in caplog.text


def test_client_certificate_and_key_go_to_their_own_files(
    monkeypatch: pytest.MonkeyPatch, control_machine: Path
) -> None:
    """Bug (found by the lab's mutual-TLS test): the client key step pushed the certificate as
    client.key, so every pull through certs.d failed with `PEM lib`."""
    data = {**REGISTRY_MOUNTED, "registry_client_certs": True}
    fleet = run_deploy_py(seed(data, {"Mounts": NFS_MOUNTED}), monkeypatch)
    host = "docker-01.example.net"
    for part, local, remote in (("cert", ".crt", "client.cert"), ("key", ".key", "client.key")):
        op = fleet.op(host, f"Trust the fleet registry | Install this host's client {part}")
        (upload,) = op.commands()
        assert upload.startswith("upload ") and upload.endswith(f"/{remote}"), upload
        source = upload.split(" ")[1]
        assert source.endswith(f"/client-{host}{local}"), upload


def test_refused_storage_does_not_drop_registry_trust_silently(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A storage plan that is refused used to leave daemon.json as it was with a noop, dropping
    the registry-trust keys without a word. Now the host fails saying what was not written."""
    hosts = seed({}, {})
    hosts[2].data.update(docker_storage_driver="btrfs", registry_trust_mode="insecure")
    fleet = run_deploy_py(hosts, monkeypatch)
    daemon = fleet.op("docker-01.example.net", "Configure the Docker daemon")
    (command,) = daemon.commands()
    message = failure(command)
    assert "needs the data root /var/lib/docker on btrfs" in message
    assert "these keys were not written either: insecure-registries" in message


def test_docker_daemon_options_are_merged_beside_the_concerns_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hosts = seed({}, {})
    hosts[2].data.update(
        docker_daemon_options={"log-driver": "journald", "insecure-registries": ["old:5000"]},
        registry_trust_mode="insecure",
    )
    fleet = run_deploy_py(hosts, monkeypatch)
    commands = fleet.op("docker-01.example.net", "Configure the Docker daemon").commands()
    upload = next(c for c in commands if c.startswith("upload /etc/docker/daemon.json"))
    assert json.loads(upload.split("\n", 1)[1]) == {
        "insecure-registries": ["old:5000", "registry-01.example.net:5443"],
        "live-restore": True,
        "log-driver": "journald",
        "storage-driver": "overlay2",
    }


def test_live_restore_is_on_by_default_and_a_data_key_turns_it_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hosts = seed({}, {})
    hosts.append(
        FleetHost(
            "docker-02.example.net",
            ["docker_hosts"],
            {"docker_daemon_live_restore": False},
            dict(BASE),
        )
    )
    fleet = run_deploy_py(hosts, monkeypatch)
    contents = {}
    for name in ("docker-01.example.net", "docker-02.example.net"):
        commands = fleet.op(name, "Configure the Docker daemon").commands()
        upload = next(c for c in commands if c.startswith("upload /etc/docker/daemon.json"))
        contents[name] = json.loads(upload.split("\n", 1)[1])
    assert contents["docker-01.example.net"]["live-restore"] is True
    assert contents["docker-02.example.net"]["live-restore"] is False


def test_the_engine_is_restarted_on_one_host_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon.json write/validate/restart/verify operation runs host by host (pyinfra's
    `_serial`), so the fleet's engines never restart all at once; the other operations do not.
    It runs only where the staging step before it (every host at once) changed something: a
    run that changes nothing does not read the hosts one after another."""
    hosts = seed({}, {})
    hosts.append(FleetHost("docker-02.example.net", ["docker_hosts"], {}, dict(BASE)))
    fleet = run_deploy_py(hosts, monkeypatch)
    for name in ("docker-01.example.net", "docker-02.example.net"):
        stage = fleet.op(name, "Configure the Docker daemon | Stage daemon.json")
        assert stage.execution_arguments["_serial"] is False, stage.execution_arguments
        daemon = fleet.op(name, "Configure the Docker daemon | Write daemon.json")
        assert daemon.execution_arguments["_serial"] is True, daemon.execution_arguments
        gate = fleet.state.get_op_data_for_host(fleet.hosts[name], daemon.op_hash)
        assert gate.global_arguments["_if"] is not None
    others = [o for o in fleet.ops("docker-01.example.net") if o.name != daemon.name]
    assert others and not any(o.execution_arguments["_serial"] for o in others)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"storage-driver": "vfs"},
            "docker_daemon_options['storage-driver']='vfs' conflicts with docker_storage, which "
            "manages storage-driver ('overlay2' on this host): remove it from "
            "docker_daemon_options and set docker_storage_driver instead",
        ),
        ({"data-root": "/data"}, "set docker_storage_data_root instead"),
        (
            {"insecure-registries": ["registry-01.example.net:5443"]},
            "conflicts with registry_trust",
        ),
        (
            {"live-restore": False},
            "docker_daemon_options['live-restore']=False conflicts with docker_daemon, which "
            "manages live-restore (True on this host): remove it from docker_daemon_options and "
            "set docker_daemon_live_restore instead",
        ),
    ],
)
def test_docker_daemon_options_may_not_contradict_a_concern(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any], message: str
) -> None:
    hosts = seed({}, {})
    hosts[2].data["docker_daemon_options"] = options
    fleet = run_deploy_py(hosts, monkeypatch)
    (command,) = fleet.op("docker-01.example.net", "Configure the Docker daemon").commands()
    assert message in failure(command)


def test_diff_shows_daemon_json_and_fstab_content(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`--diff` shows the content diff of daemon.json (uploaded by dockyard's own operation)
    and of fstab, as files.put and files.template do for the other files."""
    hosts = seed(REGISTRY_MOUNTED, {"Mounts": NFS_MOUNTED})
    hosts[1].facts["FileContents"] = {"__value__": ["/dev/sda1 / ext4 defaults 0 1"]}
    hosts[2].facts["JsonFile"] = ["__exists__", '{"debug": true}']
    hosts[2].facts["FileContents"] = {"__value__": ["{", '  "debug": true', "}"]}
    with caplog.at_level(logging.INFO):
        fleet = run_deploy_py(hosts, monkeypatch, diff=True)
        fleet.op("docker-01.example.net", "Configure the Docker daemon").commands()
        fleet.op("registry-01.example.net", "Mount NFS volumes | Mount nfs-01").commands()
    assert "Will modify" in caplog.text and "/etc/docker/daemon.json" in caplog.text
    assert '"storage-driver": "overlay2"' in caplog.text
    assert "/etc/fstab" in caplog.text
    assert f"nfs-01.example.net:{EXPORT} /srv/registry nfs4" in caplog.text


def test_example_inventory_is_the_seed_topology(monkeypatch: pytest.MonkeyPatch) -> None:
    """inventory/example.py's own data (ssh settings aside): the registry host mounts the
    export it keeps its data on, passes the guard and orders its unit after the mount."""
    groups = runpy.run_path(str(ROOT / "inventory" / "example.py"))
    hosts: dict[str, FleetHost] = {}
    for group in ("docker_hosts", "storage", "registry"):
        for name, data in groups[group]:
            user_data = {k: v for k, v in data.items() if not k.startswith(("ssh_", "_"))}
            host = hosts.setdefault(name, FleetHost(name, [], user_data, dict(BASE)))
            host.groups.append(group)
    hosts["registry-01.example.net"].facts["Mounts"] = NFS_MOUNTED
    assert [h.groups for h in hosts.values()] == [["docker_hosts"]] * 3 + [
        ["storage"],
        ["registry"],
    ]
    fleet = run_deploy_py(list(hosts.values()), monkeypatch)
    registry = "registry-01.example.net"
    assert fleet.op(registry, "Run the TLS registry | Check that /srv/registry").commands() == []
    unit = fleet.op(registry, "Run the TLS registry | Write the dockyard-registry systemd unit")
    assert "RequiresMountsFor=/srv/registry" in "\n".join(unit.commands())
    assert "Export NFS volumes" in " ".join(fleet.names("nfs-01.example.net"))
