"""Real clients against dockyard's registry — the docker CLI through the local engine (push,
pull) and skopeo (copy in and out, inspect) — and storage compatibility with CNCF distribution
both ways: a root directory written by one binary is served by the other."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import docker_import
from tests.integration.conftest import RegistryServer, make_server


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc


@pytest.fixture(scope="module")
def local_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A small two-file image in the local engine, made without any registry."""
    src = tmp_path_factory.mktemp("image-src")
    (src / "payload.bin").write_bytes(os.urandom(2_000_000))
    (src / "etc").mkdir()
    (src / "etc" / "motd").write_text("dockyard test image\n")
    ref = "dockyard-test/clients:1"
    docker_import(src, ref)
    yield ref
    run("docker", "rmi", "-f", ref, check=False)


def _image_id(ref: str) -> str:
    return run("docker", "image", "inspect", "-f", "{{.Id}}", ref).stdout.strip()


def test_docker_push_and_pull(dockyard_server: RegistryServer, local_image: str) -> None:
    remote = f"{dockyard_server.address}/clients/docker:1"
    run("docker", "tag", local_image, remote)
    try:
        pushed = run("docker", "push", remote).stdout
        assert "digest: sha256:" in pushed
        before = _image_id(remote)
        run("docker", "rmi", remote)
        run("docker", "pull", remote)
        assert _image_id(remote) == before
    finally:
        run("docker", "rmi", "-f", remote, check=False)


def _skopeo_inspect(ref: str) -> dict:
    return json.loads(run("skopeo", "inspect", "--tls-verify=false", ref).stdout)


def test_skopeo_copy_in_out_and_inspect(
    dockyard_server: RegistryServer, local_image: str, tmp_path: Path
) -> None:
    remote = f"docker://{dockyard_server.address}/clients/skopeo:1"
    run("skopeo", "copy", "--dest-tls-verify=false", f"docker-daemon:{local_image}", remote)
    info = _skopeo_inspect(remote)
    assert info["RepoTags"] == ["1"] and len(info["Layers"]) == 1
    run("skopeo", "copy", "--src-tls-verify=false", remote, f"oci:{tmp_path / 'oci'}:1")
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((tmp_path / "oci" / "blobs" / "sha256" / manifest_digest).read_text())
    assert [layer["digest"] for layer in manifest["layers"]] == info["Layers"]
    again = f"docker://{dockyard_server.address}/clients/skopeo-oci:1"
    run("skopeo", "copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'oci'}:1", again)
    assert _skopeo_inspect(again)["Layers"] == info["Layers"]


@pytest.mark.parametrize(
    ("writer", "reader"), [("distribution", "dockyard"), ("dockyard", "distribution")]
)
def test_storage_is_compatible_both_ways(
    writer: str, reader: str, local_image: str, tmp_path: Path
) -> None:
    first = make_server(writer, tmp_path / "first")
    ref = f"compat/{writer}:1"
    try:
        run(
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            f"docker-daemon:{local_image}",
            f"docker://{first.address}/{ref}",
        )
        written = _skopeo_inspect(f"docker://{first.address}/{ref}")
    finally:
        first.stop()
    # The second registry serves the same root directory the first one wrote.
    second = make_server(
        reader,
        tmp_path / "second",
        extra={"storage.filesystem.rootdirectory": str(tmp_path / "first" / "data")},
    )
    try:
        served = _skopeo_inspect(f"docker://{second.address}/{ref}")
        assert served["Digest"] == written["Digest"]
        assert served["Layers"] == written["Layers"]
        catalog = second.request("GET", "/v2/_catalog").json()["repositories"]
        assert f"compat/{writer}" in catalog
        run(
            "skopeo",
            "copy",
            "--src-tls-verify=false",
            f"docker://{second.address}/{ref}",
            f"dir:{tmp_path / 'out'}",
        )
        remote = f"{second.address}/{ref}"
        run("docker", "pull", remote)
        run("docker", "rmi", "-f", remote, check=False)
        # and the reader can add to it: a second tag through the other binary
        run(
            "skopeo",
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            f"docker://{second.address}/{ref}",
            f"docker://{second.address}/compat/{reader}:2",
        )
    finally:
        second.stop()
    third = make_server(
        writer,
        tmp_path / "third",
        extra={"storage.filesystem.rootdirectory": str(tmp_path / "first" / "data")},
    )
    try:
        again = _skopeo_inspect(f"docker://{third.address}/compat/{reader}:2")
        assert again["Layers"] == written["Layers"]
    finally:
        third.stop()
