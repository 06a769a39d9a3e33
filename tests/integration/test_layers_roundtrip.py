"""The layer core with real tools: an image pushed by skopeo to Debian's `docker-registry` is
pulled by `dockyard image pull`, changed in a container, committed and pushed back, then pulled
by skopeo and `docker pull` with the same file tree and the base layers' digests unchanged; an
export is accepted by `docker load`; skopeo reads the OCI layout; pulls go through TLS with a
private CA, basic auth and bearer tokens, and an interrupted download resumes with Range."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dockyard import pki as fleet_pki
from tests.helpers import docker_import
from tests.integration.conftest import free_port, make_server
from tests.integration.test_clients import run
from tests.unit.test_graph_drivers import snapshot

BIN = Path(sys.executable).parent


def dockyard(root: Path, *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        [str(BIN / "dockyard"), *args, "--root", str(root)],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"dockyard {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def source_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local docker image with dirs, a symlink, a hard link, modes and some bulk."""
    src = tmp_path_factory.mktemp("rt-src")
    (src / "etc").mkdir()
    (src / "etc/motd").write_text("base motd\n")
    (src / "etc/remove-me").write_text("bye\n")
    (src / "bin").mkdir()
    (src / "bin/tool").write_text("#!/bin/sh\necho tool\n")
    os.chmod(src / "bin/tool", 0o755)
    os.symlink("tool", src / "bin/tool-link")
    os.link(src / "bin/tool", src / "bin/tool-hard")
    (src / "var/cache").mkdir(parents=True)
    (src / "var/cache/blob").write_bytes(os.urandom(1_500_000))
    ref = "dockyard-test/roundtrip:1"
    docker_import(src, ref)
    yield ref
    run("docker", "rmi", "-f", ref, check=False)


def _exported_tree(image: str, dest: Path) -> dict[str, Any]:
    """The image's file tree as docker sees it (docker create + docker export)."""
    cid = run("docker", "create", image, "/bin/true").stdout.strip()
    try:
        data = subprocess.run(["docker", "export", cid], capture_output=True, check=True).stdout
    finally:
        run("docker", "rm", cid, check=False)
    dest.mkdir()
    # GNU tar, as root: keeps owners and modes the same way on every Python version
    subprocess.run(["tar", "-C", str(dest), "-xf", "-"], input=data, check=True)
    # docker adds its own mount points to every exported container
    for name in (
        ".dockerenv",
        "dev",
        "proc",
        "sys",
        "etc/hosts",
        "etc/hostname",
        "etc/resolv.conf",
        "etc/mtab",
    ):
        path = dest / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir() and name in ("dev", "proc", "sys"):
            shutil.rmtree(path)
    return snapshot(dest)


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_pull_change_commit_push_round_trip(driver: str, source_image: str, tmp_path: Path) -> None:
    if driver == "overlay" and os.geteuid() != 0:
        pytest.skip("overlay mounts need root")
    dist = make_server("distribution", tmp_path / "dist")
    root = tmp_path / "store"
    try:
        base_ref = f"{dist.address}/rt/app:1"
        run(
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            f"docker-daemon:{source_image}",
            f"docker://{base_ref}",
        )
        base_layers = json.loads(
            run("skopeo", "inspect", "--tls-verify=false", f"docker://{base_ref}").stdout
        )["Layers"]
        out = dockyard(root, "image", "pull", base_ref, "--driver", driver)
        assert "Image sha256:" in out
        dockyard(root, "container", "create", base_ref, "edit")
        rootfs = Path(dockyard(root, "container", "mount", "edit").strip().splitlines()[-1])
        (rootfs / "etc/motd").write_text("changed motd\n")
        (rootfs / "etc/remove-me").unlink()
        (rootfs / "srv").mkdir()
        (rootfs / "srv/new.txt").write_text("new\n")
        expected = snapshot(rootfs)
        new_ref = f"{dist.address}/rt/app:2"
        dockyard(root, "container", "commit", "edit", new_ref, "-m", "round trip")
        history = dockyard(root, "image", "history", new_ref)
        assert "round trip" in history.splitlines()[1]
        dockyard(root, "image", "push", new_ref)

        pushed = json.loads(
            run("skopeo", "inspect", "--tls-verify=false", f"docker://{new_ref}").stdout
        )["Layers"]
        assert pushed[: len(base_layers)] == base_layers and len(pushed) == len(base_layers) + 1
        run(
            "skopeo",
            "copy",
            "--src-tls-verify=false",
            f"docker://{new_ref}",
            f"dir:{tmp_path / 'skopeo-dir'}",
        )
        run("docker", "pull", new_ref)
        try:
            assert _exported_tree(new_ref, tmp_path / "docker-tree") == expected
        finally:
            run("docker", "rmi", "-f", new_ref, check=False)
    finally:
        dist.stop()
        # unmounts the overlay even when an assertion failed, so no mount outlives the test
        subprocess.run(
            [str(BIN / "dockyard"), "container", "rm", "edit", "--root", str(root)],
            capture_output=True,
            check=False,
        )


def test_export_docker_archive_is_loaded_by_docker(source_image: str, tmp_path: Path) -> None:
    server = make_server("dockyard", tmp_path / "reg")
    try:
        ref = f"{server.address}/rt/load:1"
        run(
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            f"docker-daemon:{source_image}",
            f"docker://{ref}",
        )
        root = tmp_path / "store"
        out = dockyard(root, "image", "pull", ref, "--driver", "vfs")
        image_id = out.split("Image ")[1].split()[0]
        dockyard(
            root, "image", "export", ref, str(tmp_path / "img.tar"), "--format", "docker-archive"
        )
        loaded = run("docker", "load", "-i", str(tmp_path / "img.tar")).stdout
        assert ref in loaded
        try:
            assert (
                run("docker", "image", "inspect", "-f", "{{.Id}}", ref).stdout.strip() == image_id
            )
        finally:
            run("docker", "rmi", "-f", ref, check=False)
        dockyard(root, "image", "export", ref, str(tmp_path / "oci"), "--format", "oci")
        info = json.loads(run("skopeo", "inspect", f"oci:{tmp_path / 'oci'}:1").stdout)
        assert (
            info["Layers"]
            == json.loads(run("skopeo", "inspect", "--tls-verify=false", f"docker://{ref}").stdout)[
                "Layers"
            ]
        )
        # and back in: a second store imports both formats to the same image
        other = tmp_path / "store2"
        assert image_id in dockyard(
            other,
            "image",
            "import",
            str(tmp_path / "oci"),
            "--tag",
            "local/oci:1",
            "--driver",
            "vfs",
        )
        assert image_id in dockyard(
            other, "image", "import", str(tmp_path / "img.tar"), "--tag", "local/docker:1"
        )
        assert "every digest verified" in dockyard(other, "store", "fsck")
    finally:
        server.stop()


def _make_pki(base: Path) -> Path:
    fleet_pki.ensure_server_cert(base, "server", [], ["127.0.0.1"])
    return base


def test_pull_over_tls_with_private_ca_and_basic_auth(source_image: str, tmp_path: Path) -> None:
    pki = _make_pki(tmp_path)
    htpasswd = tmp_path / "htpasswd"
    subprocess.run(
        ["htpasswd", "-Bbc", str(htpasswd), "puller", "pw"], check=True, capture_output=True
    )
    server = make_server(
        "dockyard",
        tmp_path / "tls",
        extra={
            "http.tls": {"certificate": str(pki / "server.crt"), "key": str(pki / "server.key")},
            "auth.htpasswd": {"realm": "rt", "path": str(htpasswd)},
        },
    )
    try:
        ref = f"{server.address}/rt/secure:1"
        certs = tmp_path / "skopeo-certs"
        certs.mkdir()
        shutil.copy(pki / "ca.crt", certs / "ca.crt")
        run(
            "skopeo",
            "copy",
            "--dest-creds",
            "puller:pw",
            "--dest-cert-dir",
            str(certs),
            f"docker-daemon:{source_image}",
            f"docker://{ref}",
        )
        root = tmp_path / "store"
        proc = subprocess.run(
            [str(BIN / "dockyard"), "image", "pull", ref, "--root", str(root), "--driver", "vfs"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 1
        assert "is not trusted" in proc.stderr and "--ca-file" in proc.stderr
        out = dockyard(
            root,
            "image",
            "pull",
            ref,
            "--driver",
            "vfs",
            "--ca-file",
            str(pki / "ca.crt"),
            "--username",
            "puller",
            "--password-stdin",
            stdin="pw\n",
        )
        assert "Image sha256:" in out
    finally:
        server.stop()


def test_bearer_token_flow_and_resumed_download(source_image: str, tmp_path: Path) -> None:
    """A small token-protected registry front (aiohttp) serving an OCI layout, recording
    the Range headers it is sent."""
    from aiohttp import web

    src = tmp_path / "store-src"
    reg = make_server("dockyard", tmp_path / "reg")
    try:
        ref = f"{reg.address}/rt/token:1"
        run(
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            f"docker-daemon:{source_image}",
            f"docker://{ref}",
        )
        dockyard(src, "image", "pull", ref, "--driver", "vfs")
        dockyard(src, "image", "export", ref, str(tmp_path / "layout"), "--format", "oci")
    finally:
        reg.stop()
    layout = tmp_path / "layout"
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    ranges: list[str] = []
    port = free_port()

    async def token(request: web.Request) -> web.Response:
        assert request.query["service"] == "rt-service"
        assert request.query["scope"].startswith("repository:rt/token:pull")
        return web.json_response({"token": "t0k3n"})

    async def v2(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != "Bearer t0k3n":
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "token needed"}]},
                status=401,
                headers={
                    "WWW-Authenticate": f'Bearer realm="http://127.0.0.1:{port}/token",service="rt-service",'
                    'scope="repository:rt/token:pull"'
                },
            )
        tail = request.match_info["tail"]
        if tail.startswith("rt/token/manifests/"):
            body = (layout / "blobs/sha256" / manifest_digest[7:]).read_bytes()
            return web.Response(
                body=body, content_type="application/vnd.oci.image.manifest.v1+json"
            )
        digest = tail.rsplit("/", 1)[-1]
        blob = layout / "blobs/sha256" / digest[7:]
        if "Range" in request.headers:
            ranges.append(request.headers["Range"])
            start = int(request.headers["Range"].split("=")[1].split("-")[0])
            data = blob.read_bytes()[start:]
            return web.Response(body=data, status=206)
        return web.Response(body=blob.read_bytes())

    app = web.Application()
    app.router.add_get("/token", token)
    app.router.add_get("/v2/{tail:.*}", v2)
    runner = web.AppRunner(app)
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        manifest = json.loads((layout / "blobs/sha256" / manifest_digest[7:]).read_bytes())
        big = max(manifest["layers"], key=lambda layer: layer["size"])
        data = (layout / "blobs/sha256" / big["digest"][7:]).read_bytes()
        root = tmp_path / "store-dst"
        (root / "tmp").mkdir(parents=True)
        # an interrupted earlier download: half of the biggest layer is already here
        (root / "tmp" / f"download-{big['digest'][7:]}.partial").write_bytes(data[: len(data) // 2])
        out = dockyard(root, "image", "pull", f"127.0.0.1:{port}/rt/token:1", "--driver", "vfs")
        assert "Image sha256:" in out
        assert ranges == [f"bytes={len(data) // 2}-"]
        assert "every digest verified" in dockyard(root, "store", "fsck")
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_plain_http_off_loopback_is_refused_without_traffic() -> None:
    from dockyard.client.registry import ClientError, RegistryClient, _is_loopback

    assert _is_loopback("127.0.0.1:5000") and _is_loopback("localhost:5000")
    assert _is_loopback("[::1]:5000")
    assert not _is_loopback("registry.example:5000")
    # Off loopback the client starts on HTTPS without probing (so nothing is sent here) and
    # refuses to open a plain connection unless --insecure was given.
    client = RegistryClient("registry.example:5000")
    assert client.scheme == "https" and not client.plain_allowed
    with pytest.raises(ClientError, match="plain HTTP needs --insecure"):
        client._connection("http")


def test_reference_needs_a_registry_host() -> None:
    from dockyard.client.registry import ClientError, parse_reference

    with pytest.raises(ClientError, match="the registry host must be named"):
        parse_reference("library/debian:12")
    ref = parse_reference("127.0.0.1:5000/lib/app:2")
    assert (ref.host, ref.repository, ref.tag) == ("127.0.0.1:5000", "lib/app", "2")


def test_push_to_another_repository_mounts_known_layers(source_image: str, tmp_path: Path) -> None:
    server = make_server("dockyard", tmp_path / "reg")
    try:
        ref = f"{server.address}/rt/origin:1"
        run(
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            f"docker-daemon:{source_image}",
            f"docker://{ref}",
        )
        root = tmp_path / "store"
        dockyard(root, "image", "pull", ref, "--driver", "vfs")
        proc = subprocess.run(
            [
                str(BIN / "dockyard"),
                "image",
                "push",
                f"{server.address}/rt/copy:1",
                "--from",
                ref,
                "--root",
                str(root),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert "Mounted from rt/origin" in proc.stderr
        copy = server.request("GET", "/v2/rt/copy/manifests/1")
        assert copy.status == 200
        for layer in copy.json()["layers"]:
            assert server.request("HEAD", f"/v2/rt/copy/blobs/{layer['digest']}").status == 200
    finally:
        server.stop()
