"""Docker named volumes and host volume directories (`docker_volumes`, `docker_volume_dirs`): the
facts parsed from recorded `docker volume inspect` / `docker ps` output, the settings (defaults,
the nfs shorthand, every refusal naming key, value and what is valid), and whole deploys of the
seed's WordPress-shaped stack — inventory/example.py with the project's group_data — through
pyinfra's own State, first run and second run. The operation's cases are JSON specs
(specs/operations/docker_volume.json)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import pytest

from dockyard_deploys.facts import DockerNamedVolumes, DockerVolumeUsers
from dockyard_deploys.settings import (
    NfsVolumeSource,
    SettingsError,
    VolumeDir,
    VolumeSettings,
    VolumeSpec,
)
from tests.operations.fakes import FleetHost, failure
from tests.operations.test_deploys import BASE, NFS_MOUNTED, run_deploy_py
from tests.operations.test_deploys import control_machine as control_machine  # autouse

ROOT = Path(__file__).resolve().parents[2]

# `docker volume inspect dockyard-rec-wp dockyard-rec-db` on Debian 12's docker.io 20.10.24.
RECORDED_INSPECT = """[
    {
        "CreatedAt": "2026-11-29T09:36:51Z",
        "Driver": "local",
        "Labels": {
            "app": "wordpress"
        },
        "Mountpoint": "/var/lib/docker/volumes/dockyard-rec-wp/_data",
        "Name": "dockyard-rec-wp",
        "Options": {
            "device": ":/srv/exports/wp-content",
            "o": "addr=10.0.0.5,nfsvers=4",
            "type": "nfs"
        },
        "Scope": "local"
    },
    {
        "CreatedAt": "2026-11-29T09:36:51Z",
        "Driver": "local",
        "Labels": null,
        "Mountpoint": "/var/lib/docker/volumes/dockyard-rec-db/_data",
        "Name": "dockyard-rec-db",
        "Options": null,
        "Scope": "local"
    }
]"""


# --- facts --------------------------------------------------------------------------------------


def test_named_volumes_from_recorded_inspect() -> None:
    fact = DockerNamedVolumes().process(RECORDED_INSPECT.splitlines())
    assert fact == {
        "dockyard-rec-wp": {
            "name": "dockyard-rec-wp",
            "driver": "local",
            "options": {
                "device": ":/srv/exports/wp-content",
                "o": "addr=10.0.0.5,nfsvers=4",
                "type": "nfs",
            },
            "labels": {"app": "wordpress"},
        },
        "dockyard-rec-db": {
            "name": "dockyard-rec-db",
            "driver": "local",
            "options": {},
            "labels": {},
        },
    }


def test_named_volumes_none() -> None:
    assert DockerNamedVolumes().process([]) == {}
    assert DockerNamedVolumes().default() == {}
    # No volume: inspect is not run at all (xargs -r), so no error for an empty list.
    assert "xargs -r docker volume inspect" in DockerNamedVolumes().command()


def test_volume_users_from_recorded_ps() -> None:
    assert DockerVolumeUsers().process(["dockyard-rec-user", ""]) == ["dockyard-rec-user"]
    assert DockerVolumeUsers().process([]) == []
    command = DockerVolumeUsers().command("db_data")
    assert command == "docker ps -a --filter volume=db_data --format '{{.Names}}'"


# --- settings -----------------------------------------------------------------------------------


def test_defaults_and_the_nfs_shorthand() -> None:
    assert VolumeSettings.from_data({}) == VolumeSettings()
    built = VolumeSettings.from_data(
        {
            "docker_volumes": [
                {"name": "db_data"},
                {"name": "wp_content", "nfs": {"path": "/srv/exports/wp/", "options": "soft"}},
                {"name": "x.y-z_1", "driver_opts": {"type": "tmpfs", "device": "tmpfs"}},
                {"name": "old", "state": "absent"},
            ],
            "docker_volume_dirs": [
                {"path": "/srv/wp//backup/"},
                {"path": "/srv/t", "mode": "1777", "world_writable": True},
            ],
        }
    )
    db, wp, tmp, old = built.volumes
    assert db == VolumeSpec("db_data") and db.driver_options("nfs-01") == {}
    assert wp.nfs == NfsVolumeSource(None, "/srv/exports/wp", "soft")
    assert wp.driver_options("nfs-01") == {
        "type": "nfs",
        "o": "addr=nfs-01,nfsvers=4,soft",
        "device": ":/srv/exports/wp",
    }
    assert tmp.driver_options(None) == {"type": "tmpfs", "device": "tmpfs"}
    assert old.state == "absent"
    assert built.volume_dirs == (
        VolumeDir("/srv/wp/backup", "root", "root", "0750", "present"),
        VolumeDir("/srv/t", "root", "root", "1777", "present"),
    )
    named = VolumeSettings.from_data(
        {"docker_volumes": [{"name": "wp", "nfs": {"server": "10.0.0.5", "path": "/e"}}]}
    )
    assert named.volumes[0].driver_options("nfs-01")["o"] == "addr=10.0.0.5,nfsvers=4"


def test_an_nfs_volume_without_server_or_storage_host_is_refused() -> None:
    spec = VolumeSettings.from_data({"docker_volumes": [{"name": "wp", "nfs": {"path": "/e"}}]})
    with pytest.raises(SettingsError, match="nfs.server is not set and the inventory has no"):
        spec.volumes[0].driver_options(None)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"docker_volumes": {"name": "x"}},
            "docker_volumes={'name': 'x'} is not valid; valid: a list",
        ),
        (
            {"docker_volumes": [{"name": "-x"}]},
            "docker_volumes[0].name='-x' is not valid; valid: a Docker volume name matching "
            "^[a-zA-Z0-9][a-zA-Z0-9_.-]+$",
        ),
        ({"docker_volumes": [{"name": "a"}]}, "docker_volumes[0].name='a' is not valid"),
        ({"docker_volumes": [{"name": "a b"}]}, "docker_volumes[0].name='a b' is not valid"),
        ({"docker_volumes": ["db_data"]}, "docker_volumes[0]='db_data' is not valid; valid: a"),
        ({"docker_volumes": [{"name": "db", "size": 1}]}, "docker_volumes[0].size=1 is not valid"),
        (
            {"docker_volumes": [{"name": "db", "state": "gone"}]},
            "docker_volumes[0].state='gone' is not valid; valid: present, absent",
        ),
        (
            {"docker_volumes": [{"name": "db", "labels": ["a=b"]}]},
            "docker_volumes[0].labels=['a=b'] is not valid; valid: a mapping",
        ),
        (
            {"docker_volumes": [{"name": "db", "driver_opts": {"o": True}}]},
            "docker_volumes[0].driver_opts={'o': True} is not valid",
        ),
        (
            {"docker_volumes": [{"name": "db", "driver": "x y"}]},
            "docker_volumes[0].driver='x y' is not valid; valid: local, or a volume plugin",
        ),
        (
            {"docker_volumes": [{"name": "wp", "nfs": {"path": "e"}}]},
            "docker_volumes[0].nfs.path='e' is not valid; valid: the exported absolute path",
        ),
        (
            {"docker_volumes": [{"name": "wp", "nfs": {"path": "/e", "server": "a b"}}]},
            "docker_volumes[0].nfs.server='a b' is not valid; valid: a host name or IP address",
        ),
        (
            {"docker_volumes": [{"name": "wp", "nfs": {"path": "/e", "options": "addr=x"}}]},
            "docker_volumes[0].nfs.options='addr=x' is not valid; valid: comma-separated NFS "
            "mount options other than addr, nfsvers, vers (set by the shorthand)",
        ),
        (
            {"docker_volumes": [{"name": "wp", "nfs": {"path": "/e", "options": "soft;rm"}}]},
            "docker_volumes[0].nfs.options='soft;rm' is not valid",
        ),
        (
            {"docker_volumes": [{"name": "wp", "nfs": {"path": "/e"}, "driver_opts": {"a": "b"}}]},
            "valid: the local driver's NFS shorthand, without driver_opts",
        ),
        (
            {"docker_volumes": [{"name": "db"}, {"name": "db"}]},
            "docker_volumes='db' is not valid; valid: each name or path listed once",
        ),
        (
            {"docker_volume_dirs": [{"path": "srv/x"}]},
            "docker_volume_dirs[0].path='srv/x' is not valid; valid: an absolute path",
        ),
        (
            {"docker_volume_dirs": [{"path": "/etc/"}]},
            "docker_volume_dirs[0].path='/etc' is not valid; valid: a dedicated directory",
        ),
        (
            {"docker_volume_dirs": [{"path": "/srv/x", "mode": "rwx"}]},
            "docker_volume_dirs[0].mode='rwx' is not valid; valid: an octal mode string",
        ),
        (
            {"docker_volume_dirs": [{"path": "/srv/x", "mode": 750}]},
            "docker_volume_dirs[0].mode=750 is not valid",
        ),
        (
            {"docker_volume_dirs": [{"path": "/srv/x", "mode": "0777"}]},
            "docker_volume_dirs[0].mode='0777' is not valid; valid: a mode other users cannot "
            "write (0750, 0770, 0755); a world-writable one only with world_writable: true",
        ),
        (
            {"docker_volume_dirs": [{"path": "/srv/x", "owner": "bad user"}]},
            "docker_volume_dirs[0].owner='bad user' is not valid; valid: a user or group name",
        ),
        (
            {"docker_volume_dirs": [{"path": "/srv/x", "world_writable": "yes"}]},
            "docker_volume_dirs[0].world_writable='yes' is not valid; valid: true or false",
        ),
        (
            {"docker_volume_dirs": [{"path": "/srv/x", "state": "deleted"}]},
            "docker_volume_dirs[0].state='deleted' is not valid",
        ),
    ],
)
def test_invalid_volume_settings_name_key_value_and_what_is_valid(
    data: dict[str, Any], message: str
) -> None:
    with pytest.raises(SettingsError) as info:
        VolumeSettings.from_data(data)
    assert message in str(info.value)


# --- whole deploys: the seed's WordPress-shaped stack -------------------------------------------


def group_data() -> dict[str, dict[str, Any]]:
    """The project's group_data/*.py as pyinfra reads them (public module-level names)."""
    out = {}
    for path in sorted((ROOT / "group_data").glob("*.py")):
        names = runpy.run_path(str(path))
        out[path.stem] = {k: v for k, v in names.items() if not k.startswith("_")}
    return out


def example_fleet() -> dict[str, FleetHost]:
    """inventory/example.py (ssh settings aside) with group_data: `all`, then each group's,
    then the host's own data, as pyinfra layers them."""
    groups = runpy.run_path(str(ROOT / "inventory" / "example.py"))
    data = group_data()
    hosts: dict[str, FleetHost] = {}
    for group in ("docker_hosts", "storage", "registry"):
        for name, host_data in groups[group]:
            own = {k: v for k, v in host_data.items() if not k.startswith(("ssh_", "_"))}
            host = hosts.setdefault(name, FleetHost(name, [], {}, dict(BASE)))
            host.groups.append(group)
            host.data = {**data.get("all", {}), **host.data, **data.get(group, {}), **own}
    hosts["registry-01.example.net"].facts["Mounts"] = NFS_MOUNTED
    return hosts


WP_OPTIONS = {
    "type": "nfs",
    "o": "addr=nfs-01.example.net,nfsvers=4",
    "device": ":/srv/exports/wp-content",
}


def _inspect(volumes: dict[str, tuple[dict[str, str], dict[str, str]]]) -> str:
    """`docker volume inspect` output of volumes {name: (options, labels)}."""
    return json.dumps(
        [
            {"Name": n, "Driver": "local", "Options": o or None, "Labels": la or None}
            for n, (o, la) in volumes.items()
        ]
    )


def test_example_stack_first_deploy(monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = run_deploy_py(list(example_fleet().values()), monkeypatch)
    # A Docker host with only the group's data: both volumes, wp_content from the storage host.
    names = fleet.names("docker-03.example.net")
    assert (
        "Docker volumes and host volume directories | Docker volume db_data (driver local)" in names
    )
    wp = fleet.op(
        "docker-03.example.net",
        "Docker volumes and host volume directories | Docker volume wp_content "
        "(NFS nfs-01.example.net:/srv/exports/wp-content)",
    )
    assert wp.commands() == [
        "docker volume create wp_content -d local --label app=wordpress --label tier=web "
        "--opt device=:/srv/exports/wp-content --opt o=addr=nfs-01.example.net,nfsvers=4 "
        "--opt type=nfs"
    ]
    backup = fleet.op(
        "docker-03.example.net",
        "Docker volumes and host volume directories | Host volume directory "
        "/srv/wordpress/backup (root:root 0750)",
    )
    text = "\n".join(backup.commands())
    assert "mkdir -p /srv/wordpress/backup" in text and "chmod 750 /srv/wordpress/backup" in text
    # The volumes come after the daemon is configured and after the NFS client tier.
    order = " ".join(names)
    assert order.index("Configure the Docker daemon") < order.index("Docker volume db_data")
    # docker-01's own data: an old volume removed only because it says absent (none there now).
    removal = fleet.op(
        "docker-01.example.net",
        "Docker volumes and host volume directories | Remove the Docker volume legacy_uploads",
    )
    assert removal.commands() == []
    dumps = fleet.op(
        "docker-01.example.net",
        "Docker volumes and host volume directories | Host volume directory "
        "/srv/wordpress/dumps (999:999 0700)",
    )
    assert "chown 999:999 /srv/wordpress/dumps" in "\n".join(dumps.commands())
    # The storage host exports the stack's wp-content beside the registry's data.
    exports = fleet.op("nfs-01.example.net", "Export NFS volumes | Write /etc/exports.d")
    text = "\n".join(exports.commands())
    assert "/srv/exports/wp-content docker-01.example.net(" in text
    assert "/srv/exports/registry docker-01.example.net(" in text
    # Hosts outside docker_hosts get no volumes.
    assert not any("Docker volume" in n for n in fleet.names("registry-01.example.net"))


def test_example_stack_second_deploy_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = example_fleet()
    host = hosts["docker-03.example.net"]
    host.facts["DockerNamedVolumes"] = _inspect(
        {
            "db_data": ({}, {"app": "wordpress", "tier": "db"}),
            "wp_content": (WP_OPTIONS, {"app": "wordpress", "tier": "web"}),
        }
    )
    fleet = run_deploy_py(list(hosts.values()), monkeypatch)
    for volume in ("db_data", "wp_content"):
        op = fleet.op(
            "docker-03.example.net",
            f"Docker volumes and host volume directories | Docker volume {volume}",
        )
        assert op.commands() == [], volume


def test_example_stack_drift_in_use_fails_naming_the_containers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """wp_content was created against another server: used by the web container, the host
    fails naming it; once that container is gone, the volume is recreated (its data is on NFS)."""
    hosts = example_fleet()
    host = hosts["docker-03.example.net"]
    old = {**WP_OPTIONS, "o": "addr=10.0.0.9,nfsvers=4"}
    host.facts["DockerNamedVolumes"] = _inspect(
        {"wp_content": (old, {"app": "wordpress", "tier": "web"})}
    )
    host.facts["DockerVolumeUsers"] = ["web"]
    fleet = run_deploy_py(list(hosts.values()), monkeypatch)
    name = "Docker volumes and host volume directories | Docker volume wp_content"
    (command,) = fleet.op("docker-03.example.net", name).commands()
    message = failure(command)
    assert "volume wp_content drifted (option o 'addr=10.0.0.9,nfsvers=4' → " in message
    assert "containers use it: web" in message
    host.facts["DockerVolumeUsers"] = []
    fleet = run_deploy_py(list(hosts.values()), monkeypatch)
    commands = fleet.op("docker-03.example.net", name).commands()
    assert commands[0] == "docker volume rm wp_content"
    assert commands[1].startswith("docker volume create wp_content -d local")


def test_lab_shaped_single_host_uses_its_own_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """One host in storage and docker_hosts (the lab's shape): the NFS server is its address."""
    data = group_data()["docker_hosts"]
    hosts = [
        FleetHost(
            "lab-1", ["storage", "docker_hosts"], {**data, "ssh_hostname": "172.30.0.2"}, dict(BASE)
        )
    ]
    fleet = run_deploy_py(hosts, monkeypatch)
    op = fleet.op("lab-1", "Docker volumes and host volume directories | Docker volume wp_content")
    assert "--opt o=addr=172.30.0.2,nfsvers=4" in op.commands()[0]
