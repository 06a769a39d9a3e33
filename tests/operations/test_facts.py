"""Custom facts parsed from recorded output of real hosts (lab and production shapes)."""

from __future__ import annotations

from dockyard_deploys.facts import (
    BlockDevice,
    DockerEngine,
    DockerImagePresent,
    FileDigests,
    JsonFile,
    KernelAppArmor,
    KernelFilesystems,
    PathFilesystem,
    RegistryContainer,
)


def test_kernel_filesystems_from_proc() -> None:
    out = ["nodev\tsysfs", "nodev\toverlay", "\text4", "\tbtrfs", "nodev\tfuse", ""]
    assert KernelFilesystems().process(out) == ["sysfs", "overlay", "ext4", "btrfs", "fuse"]


def test_path_filesystem_ext4_docker_volume() -> None:
    out = [
        "/var/lib/docker",
        "ext4   /dev/vda[/var/lib/docker/volumes/lab-docker/_data] /var/lib/docker",
        "ftype=",
    ]
    fact = PathFilesystem().process(out)
    assert fact is not None
    assert fact["fstype"] == "ext4"
    assert fact["target"] == "/var/lib/docker"
    assert fact["xfs_ftype"] is None


def test_path_filesystem_xfs_ftype_zero() -> None:
    fact = PathFilesystem().process(["/var/lib", "xfs /dev/mapper/centos-root /", "ftype=0"])
    assert fact is not None
    assert fact["xfs_ftype"] is False
    assert fact["path"] == "/var/lib"


def test_path_filesystem_command_walks_up_to_an_existing_parent() -> None:
    command = PathFilesystem().command("/var/lib/docker")
    assert 'while [ ! -e "$p" ]' in command
    assert "xfs_info" in command


def test_docker_engine_running() -> None:
    fact = DockerEngine().process(
        ["Docker version 26.1.5+dfsg1, build a72d7cd", "btrfs|/var/lib/docker|2|1"]
    )
    assert fact == {
        "version": "26.1.5",
        "major": 26,
        "running": True,
        "driver": "btrfs",
        "root_dir": "/var/lib/docker",
        "images": 2,
        "containers": 1,
    }


def test_docker_engine_running_from_docker_info_alone() -> None:
    """What the command prints while the engine runs: `docker info` with the server's version
    (one Go binary; `dockerd --version` only when the engine is down)."""
    fact = DockerEngine().process(["running|20.10.24+dfsg1|overlay2|/var/lib/docker|3|1"])
    assert fact == {
        "version": "20.10.24",
        "major": 20,
        "running": True,
        "driver": "overlay2",
        "root_dir": "/var/lib/docker",
        "images": 3,
        "containers": 1,
    }
    command = DockerEngine().command()
    assert command.startswith("docker info --format 'running|{{.ServerVersion}}|")
    assert command.endswith("|| dockerd --version")


def test_docker_engine_whose_daemon_does_not_answer() -> None:
    """Bug (a fresh lab's first deploy crashed pyinfra): while the daemon restarts, `docker info`
    prints the template with empty server fields and fails, then `dockerd --version` speaks."""
    fact = DockerEngine().process(["running|||||", "Docker version 20.10.24+dfsg1, build 5d6db84"])
    assert fact is not None
    assert fact["running"] is False and fact["version"] == "20.10.24"
    assert DockerEngine().process(["running|||||"]) is None
    assert DockerEngine().process(["Docker version"]) is None
    # recorded on a lab host with the engine stopped (docker info fails after `running|`)
    stopped = DockerEngine().process(["running|", "Docker version 20.10.24+dfsg1, build 5d6db84"])
    assert stopped is not None and stopped["running"] is False and stopped["major"] == 20


def test_docker_engine_installed_but_stopped() -> None:
    fact = DockerEngine().process(["Docker version 20.10.24+dfsg1, build 297e128"])
    assert fact is not None
    assert fact["running"] is False and fact["major"] == 20 and fact["images"] is None


def test_docker_engine_absent() -> None:
    assert DockerEngine().process([]) is None


def test_json_file_states() -> None:
    assert JsonFile().process([]) == {"exists": False, "content": None, "error": None}
    ok = JsonFile().process(["__exists__", '{"storage-driver": "overlay2",', '"debug": true}'])
    assert ok["content"] == {"storage-driver": "overlay2", "debug": True}
    empty = JsonFile().process(["__exists__"])
    assert empty == {"exists": True, "content": {}, "error": None}
    bad = JsonFile().process(["__exists__", '{"storage-driver": '])
    assert bad["exists"] and bad["content"] is None and bad["error"]
    not_object = JsonFile().process(["__exists__", "[1, 2]"])
    assert not_object["error"] == "top level is not a JSON object"


def test_block_device_states() -> None:
    assert BlockDevice().process([]) == {"exists": False, "fstype": "", "mountpoints": []}
    fresh = BlockDevice().process(["__exists__", "TYPE="])
    assert fresh == {"exists": True, "fstype": "", "mountpoints": []}
    mounted = BlockDevice().process(
        ["__exists__", "TYPE=btrfs", "/var/lib/docker", "/var/lib/docker/btrfs"]
    )
    assert mounted["fstype"] == "btrfs"
    assert mounted["mountpoints"] == ["/var/lib/docker", "/var/lib/docker/btrfs"]


def test_block_device_command_refuses_without_blkid() -> None:
    assert "blkid (util-linux) is missing" in BlockDevice().command("/dev/vdb")


def test_registry_container_states() -> None:
    assert RegistryContainer().process([]) is None
    assert RegistryContainer().process(["true|3f2a"]) == {"running": True, "hash": "3f2a"}
    assert RegistryContainer().process(["false|"]) == {"running": False, "hash": ""}
    assert "dockyard-registry" in RegistryContainer().command()


def test_docker_image_present() -> None:
    assert DockerImagePresent().process(["yes"]) is True
    assert DockerImagePresent().process(["no"]) is False
    assert "docker image inspect 'registry:2'" not in DockerImagePresent().command("registry:2")
    assert "docker image inspect registry:2 " in DockerImagePresent().command("registry:2")


def test_file_digests_of_a_wheelhouse(tmp_path) -> None:
    """Recorded output, then the command itself on a real directory (sh, find, sha256sum)."""
    import subprocess

    digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    out = [f"{digest}  ./a-1.0-py3-none-any.whl", f"{digest}  ./b c.whl", "garbage", ""]
    assert FileDigests().process(out) == {"a-1.0-py3-none-any.whl": digest, "b c.whl": digest}
    (tmp_path / "test.whl").write_text("test")
    (tmp_path / ".complete").write_text("")
    (tmp_path / "sub").mkdir()
    for path, want in ((tmp_path, {"test.whl": digest}), (tmp_path / "missing", {})):
        proc = subprocess.run(
            ["sh", "-c", FileDigests().command(str(path))], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert FileDigests().process(proc.stdout.splitlines()) == want


def test_kernel_apparmor_as_dockerd_sees_it() -> None:
    assert KernelAppArmor().process(["Y", "securityfs"]) is True  # a VM or a real host
    assert KernelAppArmor().process(["Y"]) is False  # a container: no securityfs
    assert KernelAppArmor().process(["N", "securityfs"]) is False
    assert KernelAppArmor().process([]) is False
