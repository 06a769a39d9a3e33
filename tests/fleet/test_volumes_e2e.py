"""Lab end to end for Docker volumes (`docker_volumes`, `docker_volume_dirs`): the seed's
WordPress-shaped stack on every Docker host after the first deploy (`db_data` local,
`wp_content` NFS-backed from the storage host), a test volume's whole life on one host — created
with the NFS shorthand's options, unchanged by a second deploy, its drift refused while a
container uses it and recreated once none does, kept when dropped from the list, removed only
when marked absent — host directories with their owner and mode, a local named volume's data
surviving `docker rm -f` of the container that wrote it, the NFS-backed `wp_content` written by
a container on one VM and read by a container on the other (the kernels' NFS client; the data
survives `docker rm -f` and the volume's re-creation); the storage tests' last check (a second
deploy reports no change on any host) covers the volumes too. The container hosts' kernel has
no NFS client: there NFS-backed volumes are created and inspected, never mounted."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.fleet.conftest import DeployRun, run_deploy

pytestmark = pytest.mark.lab

VOLUME = "dockyard-test-nfs"
TEST_DIR = "/srv/dockyard-test/volume-dir"
USER = "dockyard-test-user"
IMAGE = "dockyard-test/sh:1"
EXPORT = "/srv/exports/registry"


def _inspect(host: Any, name: str) -> dict[str, Any]:
    out = host.run(f"docker volume inspect {name}")
    assert out.rc == 0, (name, out.stderr)
    return dict(json.loads(out.stdout)[0])


def _exists(host: Any, name: str) -> bool:
    return bool(host.run(f"docker volume inspect {name}").rc == 0)


def _tiny_image(host: Any) -> str:
    """An image of the host's own sh and cat with their libraries (no registry in the lab)."""
    host.check_output(
        "set -e; d=$(mktemp -d); for f in /bin/sh /bin/cat; do "
        "for x in $f $(ldd $(readlink -f $f) | grep -o '/[^ ]*'); do "
        'mkdir -p "$d$(dirname $x)"; cp -L "$x" "$d$x"; done; done; '
        f"tar -C $d -c . | docker import - {IMAGE} >/dev/null; rm -rf $d"
    )
    return IMAGE


def _volumes(options: str = "", state: str = "present") -> str:
    nfs: dict[str, str] = {"path": EXPORT}
    if options:
        nfs["options"] = options
    entry = {"name": VOLUME, "nfs": nfs, "labels": {"test": "volumes"}, "state": state}
    return "docker_volumes=" + json.dumps([entry])


DIRS = "docker_volume_dirs=" + json.dumps(
    [{"path": TEST_DIR, "owner": "nobody", "group": "nogroup", "mode": "0770"}]
)


def _ok(run: DeployRun) -> None:
    assert run.returncode == 0, run.failures()
    assert run.results["failed_hosts"] == []


def test_the_stacks_volumes_on_every_docker_host(
    hosts: dict[str, Any], storage: dict[str, Any], first_deploy: DeployRun
) -> None:
    _ok(first_deploy)
    for name, host in hosts.items():
        wp = _inspect(host, "wp_content")
        assert wp["Driver"] == "local", name
        assert wp["Options"] == {
            "type": "nfs",
            "o": f"addr={storage['address']},nfsvers=4",
            "device": ":/srv/exports/wp-content",
        }, name
        assert wp["Labels"] == {"app": "wordpress", "tier": "web"}, name
        db = _inspect(host, "db_data")
        assert db["Driver"] == "local" and not db["Options"], name
        assert db["Labels"] == {"app": "wordpress", "tier": "db"}, name
        backup = host.file("/srv/wordpress/backup")
        assert backup.is_directory, name
        assert (backup.user, backup.group, backup.mode) == ("root", "root", 0o750), name


def test_a_volume_from_creation_to_removal(
    hosts: dict[str, Any], overlay_host: str, storage: dict[str, Any]
) -> None:
    host = hosts[overlay_host]
    limit = ("--limit", overlay_host)
    try:
        # Created with the NFS shorthand's options; the host directory with owner and mode.
        _ok(run_deploy(*limit, "--data", _volumes(), "--data", DIRS))
        created = _inspect(host, VOLUME)
        assert created["Options"] == {
            "type": "nfs",
            "o": f"addr={storage['address']},nfsvers=4",
            "device": f":{EXPORT}",
        }
        assert created["Labels"] == {"test": "volumes"}
        folder = host.file(TEST_DIR)
        assert (folder.user, folder.group, folder.mode) == ("nobody", "nogroup", 0o770)

        # A second deploy changes nothing.
        again = run_deploy(*limit, "--data", _volumes(), "--data", DIRS)
        _ok(again)
        assert again.totals["success"] == 0, again.changed_ops()

        # Drift while a container (created, never started: the lab cannot mount NFS) uses it:
        # the host fails naming the volume, the drift and the container; nothing changes.
        host.check_output(
            f"docker create --name {USER} -v {VOLUME}:/data {_tiny_image(host)} /bin/sh"
        )
        refused = run_deploy(*limit, "--data", _volumes("soft"), "--data", DIRS)
        assert refused.returncode != 0
        assert f"volume {VOLUME} drifted (option o 'addr={storage['address']},nfsvers=4' → " in (
            refused.log
        )
        assert f"containers use it: {USER}" in refused.log
        assert _inspect(host, VOLUME)["Options"] == created["Options"]

        # With no container using it, the volume is recreated with the new options.
        host.check_output(f"docker rm {USER}")
        recreated = run_deploy(*limit, "--data", _volumes("soft"), "--data", DIRS)
        _ok(recreated)
        assert any(VOLUME in op for op in recreated.changed_ops()), recreated.changed_ops()
        assert _inspect(host, VOLUME)["Options"]["o"] == f"addr={storage['address']},nfsvers=4,soft"

        # Dropped from the list, it stays; marked absent, it is removed.
        _ok(run_deploy(*limit, "--data", "docker_volumes=[]"))
        assert _exists(host, VOLUME)
        _ok(run_deploy(*limit, "--data", _volumes("soft", "absent")))
        assert not _exists(host, VOLUME)
    finally:
        host.run(f"docker rm -f {USER}; docker volume rm {VOLUME}; docker rmi {IMAGE}")
        host.run(f"rm -rf {TEST_DIR}; rmdir {TEST_DIR.rsplit('/', 1)[0]}")


def test_a_local_volume_keeps_its_data_past_docker_rm_f(
    hosts: dict[str, Any], overlay_host: str
) -> None:
    host = hosts[overlay_host]
    image = _tiny_image(host)
    marker = "/data/dockyard-test-marker"
    try:
        host.check_output(
            f"docker run --name {USER} -v db_data:/data {image} /bin/sh -c 'echo kept > {marker}'"
        )
        host.check_output(f"docker rm -f {USER}")
        read = host.check_output(f"docker run --rm -v db_data:/data {image} /bin/cat {marker}")
        assert read == "kept"
        # A deploy leaves the volume (and so its data) alone.
        again = run_deploy("--limit", overlay_host)
        _ok(again)
        assert again.totals["success"] == 0, again.changed_ops()
        read = host.check_output(f"docker run --rm -v db_data:/data {image} /bin/cat {marker}")
        assert read == "kept"
    finally:
        mountpoint = host.check_output("docker volume inspect -f '{{.Mountpoint}}' db_data")
        host.run(
            f"docker rm -f {USER}; rm -f {mountpoint}/dockyard-test-marker; docker rmi {image}"
        )


def test_an_nfs_backed_volume_is_shared_across_hosts(
    hosts: dict[str, Any], lab: list[dict[str, Any]], storage: dict[str, Any]
) -> None:
    """The seed's wp-content: a container on the registry VM writes into `wp_content`, a
    container on the storage VM reads it; the file lands in the export as the anonymous uid,
    and survives `docker rm -f` and the volume's re-creation by the deploy."""
    writer_name = next(h["name"] for h in lab if "registry" in h["groups"])
    writer, reader = hosts[writer_name], hosts[storage["name"]]
    marker = "dockyard-test-shared.txt"
    try:
        image = _tiny_image(writer)
        writer.check_output(
            f"docker run --name {USER} -v wp_content:/data {image} "
            f"/bin/sh -c 'echo written-on-{writer_name} > /data/{marker}'"
        )
        writer.check_output(f"docker rm -f {USER}")
        read_image = _tiny_image(reader)
        read = f"docker run --rm -v wp_content:/data {read_image} /bin/cat /data/{marker}"
        assert reader.check_output(read) == f"written-on-{writer_name}"
        landed = reader.file(f"/srv/exports/wp-content/{marker}")
        assert (landed.uid, landed.gid) == (65534, 65534)
        # The volume removed on the writer and recreated by the deploy: the data is the export's.
        writer.check_output("docker volume rm wp_content")
        again = run_deploy("--limit", writer_name)
        _ok(again)
        assert any("wp_content" in op for op in again.changed_ops()), again.changed_ops()
        reread = f"docker run --rm -v wp_content:/data {image} /bin/cat /data/{marker}"
        assert writer.check_output(reread) == f"written-on-{writer_name}"
    finally:
        writer.run(f"docker rm -f {USER}; docker rmi {IMAGE}")
        reader.run(f"docker rmi {IMAGE}; rm -f /srv/exports/wp-content/{marker}")
