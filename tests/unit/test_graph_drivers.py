"""One conformance suite that every graph driver passes (overlay and vfs): images from layers,
containers over them, changes (add, modify, chmod, delete, a directory replaced), commit into a
layer with whiteouts, the committed image reproducing the container's tree exactly, sharing of
base layers, and removal freeing only what nothing else uses."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest

from dockyard.layers.drivers import OverlayDriver
from dockyard.layers.store import ImageStore, LayerRef
from tests.unit.test_tarsafe import make_tar

DRIVERS = ["vfs"] + (["overlay"] if os.geteuid() == 0 and OverlayDriver.supported() else [])


def snapshot(root: Path) -> dict[str, Any]:
    """Everything commit must keep: type, mode, content or link target of every path."""
    out: dict[str, Any] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            full = Path(directory) / name
            rel = str(full.relative_to(root))
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), full.read_bytes())
    return out


def base_image(store: ImageStore) -> str:
    data = make_tar(
        [
            ("etc", "dir", None, 0o755),
            ("etc/motd", "file", "welcome\n"),
            ("bin", "dir", None, 0o755),
            ("bin/tool", "file", "#!/bin/sh\n", 0o755),
            ("bin/tool-link", "sym", "tool"),
            ("bin/tool-hard", "hard", "bin/tool"),
            ("lib", "dir", None, 0o755),
            ("lib/a", "file", "a"),
            ("lib/b", "file", "b"),
            ("data", "dir", None, 0o755),
            ("data/x", "dir", None, 0o755),
            ("data/x/y", "file", "deep"),
        ],
        gz=True,
    )
    digest = store.put_blob(data)
    chain, diff, size = store.apply_blob(None, digest, None, [])
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "base"}],
    }
    image = store.register(
        json.dumps(config).encode(),
        [LayerRef(digest, diff, chain, size, "application/vnd.oci.image.layer.v1.tar+gzip")],
        "application/vnd.oci.image.manifest.v1+json",
        "local/base:1",
    )
    return image.id


@pytest.fixture(params=DRIVERS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    s = ImageStore(str(tmp_path / "store"), request.param)
    yield s
    for c in s.containers():
        s.remove_container(c["name"])


def test_container_changes_commit_into_one_layer(store: ImageStore) -> None:
    base_id = base_image(store)
    store.create_container("local/base:1", "work")
    rootfs = Path(store.mount("work"))
    assert (rootfs / "etc/motd").read_text() == "welcome\n"
    (rootfs / "etc/motd").write_text("changed\n")
    (rootfs / "etc/new.conf").write_text("added\n")
    os.chmod(rootfs / "bin/tool", 0o700)
    os.unlink(rootfs / "lib/a")
    shutil.rmtree(rootfs / "data")
    (rootfs / "data").mkdir()
    (rootfs / "data/fresh").write_text("only this")
    expected = snapshot(rootfs)

    image = store.commit("work", "local/app:2", message="tune motd")
    base = store.load_image(base_id)
    assert base is not None
    assert len(image.layers) == 2
    assert image.layers[0] == base.layers[0]  # the base layer is shared, digest unchanged
    assert image.config["rootfs"]["diff_ids"][0] == base.config["rootfs"]["diff_ids"][0]
    history = store.history("local/app:2")
    assert history[0]["comment"] == "tune motd" and "commit work" in history[0]["created_by"]
    assert history[1]["created_by"] == "base"

    with open(store.blob_path(image.layers[1].digest), "rb") as f:
        names = tarfile.open(fileobj=io.BytesIO(f.read())).getnames()
    assert "lib/.wh.a" in names
    assert "etc/new.conf" in names and "etc/motd" in names
    # the replaced directory hides what was below: an opaque marker, or whiteouts (vfs)
    assert {"data/.wh..wh..opq", ".wh.data", "data/.wh.x"} & set(names)
    assert "lib/b" not in names and "bin/tool-link" not in names

    store.create_container("local/app:2", "check")
    assert snapshot(Path(store.mount("check"))) == expected


def test_container_rm_removes_its_writable_layer(store: ImageStore) -> None:
    base_image(store)
    store.create_container("local/base:1", "scratch")
    rootfs = Path(store.mount("scratch"))
    (rootfs / "junk").write_text("x")
    directory = Path(store.container_dir("scratch"))
    store.remove_container("scratch")
    assert not directory.exists()
    assert store.containers() == []
    store.create_container("local/base:1", "again")
    assert not (Path(store.mount("again")) / "junk").exists()


def test_image_rm_frees_only_unshared_layers(store: ImageStore) -> None:
    base_image(store)
    store.create_container("local/base:1", "c")
    (Path(store.mount("c")) / "extra").write_text("e")
    committed = store.commit("c", "local/extra:1")
    store.remove_container("c")
    top = committed.layers[-1]
    removed = store.remove_image("local/extra:1")
    assert f"layer {top.chain_id}" in removed and f"blob {top.digest}" in removed
    assert store.has_layer(committed.layers[0].chain_id)
    assert store.resolve("local/base:1").layers[0] == committed.layers[0]
    assert store.fsck() == []


def test_image_in_use_by_a_container_is_kept(store: ImageStore) -> None:
    base_image(store)
    store.create_container("local/base:1", "user")
    with pytest.raises(Exception, match="used by container"):
        store.remove_image("local/base:1")


def test_fsck_reports_a_damaged_blob(store: ImageStore) -> None:
    image_id = base_image(store)
    image = store.load_image(image_id)
    assert image is not None
    path = store.blob_path(image.layers[0].digest)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(20)
        f.write(b"corrupt")
    damage = store.fsck()
    assert any(image.layers[0].digest in line for line in damage)


def test_du_shows_shared_layers(store: ImageStore) -> None:
    base_image(store)
    store.create_container("local/base:1", "d")
    (Path(store.mount("d")) / "f").write_text("x" * 10000)
    store.commit("d", "local/d:1")
    usage = store.disk_usage()
    shared = [entry for entry in usage["layers"] if entry["images"] == 2]
    assert len(shared) == 1 and usage["shared_bytes"] == shared[0]["bytes"] > 0
