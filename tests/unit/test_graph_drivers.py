"""One conformance suite that every graph driver passes (vfs, and overlay mounted both ways: with
the new mount API, and with the legacy mount(2) over short links that kernels before 6.8 get):
images from layers, containers over them, changes (add, modify, chmod, chown, delete, a directory
replaced, xattr-only changes, a rewrite of the same size and mtime, hard links to unchanged
files), commit into a layer with whiteouts, the committed image reproducing the container's tree
exactly, images of hundreds of layers and the honest refusal past overlay's limit, sharing of base
layers, and removal freeing only what nothing else uses."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dockyard.layers import drivers
from dockyard.layers.drivers import OverlayDriver
from dockyard.layers.store import ImageStore, LayerRef
from dockyard.layers.tarsafe import LayerError, apply_layer
from tests.unit.test_tarsafe import make_tar

OVERLAY = os.geteuid() == 0 and OverlayDriver.supported()
DRIVERS = ["vfs"] + (["overlay"] if OVERLAY else [])
# every store the suite runs on: each driver, and overlay once more with the link fallback
STORES = DRIVERS + (["overlay-links"] if OVERLAY else [])
OVERLAY_STORES = [name for name in STORES if name.startswith("overlay")]
# xattrs overlay keeps about its own storage (hidden in a merged view), not image content
STORAGE_XATTRS = ("trusted.overlay.", "user.overlay.")
# a file of more than one compare chunk, changed only in its last byte
BIG = bytes(range(256)) * (3 * 4096 + 7)


def _xattrs(path: Path) -> dict[str, bytes]:
    names = os.listxattr(path, follow_symlinks=False)
    return {
        name: os.getxattr(path, name, follow_symlinks=False)
        for name in sorted(names)
        if not name.startswith(STORAGE_XATTRS)
    }


def snapshot(root: Path) -> dict[str, Any]:
    """Everything commit must keep of every path: type, mode, owner, xattrs, content, link target
    or device, and which paths are hard links of one file."""
    out: dict[str, Any] = {}
    links: dict[tuple[int, ...], list[str]] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            full = Path(directory) / name
            rel = str(full.relative_to(root))
            st = full.lstat()
            xattrs = _xattrs(full)
            common = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, xattrs)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full), st.st_uid, st.st_gid, xattrs)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", *common)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", *common, full.read_bytes())
                if st.st_nlink > 1:
                    # overlay shows a file copied up with its lower origin's inode number, so a
                    # hard link broken by a copy-up is two files with one st_ino: those differ
                    # in link count and ctime, the names of one file never do
                    key = (st.st_dev, st.st_ino, st.st_nlink, st.st_ctime_ns)
                    links.setdefault(key, []).append(rel)
            else:
                out[rel] = ("node", stat.S_IFMT(st.st_mode), st.st_rdev, *common)
    for names in links.values():
        for rel in names:
            out[rel] = (*out[rel], ("hard links", tuple(sorted(names))))
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
            ("lib/b", "file", "b", 0o644, {"SCHILY.xattr.user.origin": "base"}),
            ("lib/big", "file", BIG),
            ("lib/pair", "file", "pair"),
            ("lib/pair-hard", "hard", "lib/pair"),
            ("data", "dir", None, 0o755),
            ("data/x", "dir", None, 0o755),
            ("data/x/y", "file", "deep", 0o644, {"SCHILY.xattr.user.gone": "soon"}),
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


def _unmount_below(path: Path) -> None:
    """The safety net of a failed test: unmount whatever is still mounted under `path`."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(f"{path}/")), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _open_store(variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    # "overlay-links" is overlay with the legacy mount(2) over short links (kernels before 6.8)
    monkeypatch.setattr(OverlayDriver, "use_mount_api", variant != "overlay-links", raising=False)
    s = ImageStore(str(tmp_path / "store"), "vfs" if variant == "vfs" else "overlay")
    try:
        yield s
    finally:
        try:
            for c in s.containers():
                s.remove_container(c["name"])
        finally:
            _unmount_below(tmp_path)


@pytest.fixture(params=STORES)
def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    yield from _open_store(request.param, tmp_path, monkeypatch)


def commit_and_check(store: ImageStore, container: str, ref: str) -> dict[str, Any]:
    """Commit `container` as `ref`; assert a container of the new image has the same tree."""
    expected = snapshot(Path(store.mount(container)))
    store.commit(container, ref)
    store.create_container(ref, f"{container}-check")
    assert snapshot(Path(store.mount(f"{container}-check"))) == expected
    return expected


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


# ---- item 8: changes only a full comparison sees -------------------------------------------


def test_commit_keeps_xattr_and_owner_only_changes(store: ImageStore) -> None:
    base_image(store)
    store.create_container("local/base:1", "meta")
    rootfs = Path(store.mount("meta"))
    os.setxattr(rootfs / "lib/a", "user.added", b"on an unchanged file")
    os.setxattr(rootfs / "lib/b", "user.origin", b"edit")  # same length as "base"
    os.removexattr(rootfs / "data/x/y", "user.gone")
    os.setxattr(rootfs / "etc", "user.dir", b"on a directory")
    os.chown(rootfs / "etc/motd", 1234, 5678)
    expected = commit_and_check(store, "meta", "local/meta:1")
    assert expected["lib/a"][4] == {"user.added": b"on an unchanged file"}
    assert expected["lib/b"][4] == {"user.origin": b"edit"}
    assert expected["data/x/y"][4] == {}
    assert expected["etc"][4] == {"user.dir": b"on a directory"}
    assert expected["etc/motd"][2:4] == (1234, 5678)


def test_commit_keeps_a_rewrite_of_the_same_size_and_mtime(store: ImageStore) -> None:
    base_image(store)
    store.create_container("local/base:1", "same")
    rootfs = Path(store.mount("same"))
    for rel, content in (("etc/motd", b"WELCOME\n"), ("lib/big", BIG[:-1] + b"!")):
        before = (rootfs / rel).stat()
        (rootfs / rel).write_bytes(content)
        os.utime(rootfs / rel, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = (rootfs / rel).stat()
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    expected = commit_and_check(store, "same", "local/same:1")
    assert expected["etc/motd"][5] == b"WELCOME\n"
    assert expected["lib/big"][5].endswith(b"!")


def test_commit_keeps_hard_links_to_unchanged_files(store: ImageStore) -> None:
    base_image(store)
    store.create_container("local/base:1", "links")
    rootfs = Path(store.mount("links"))
    os.link(rootfs / "lib/b", rootfs / "lib/b-hard")  # a new name for an unchanged file
    os.link(rootfs / "lib/pair", rootfs / "etc/pair-third")  # a third name for a linked pair
    # a linked pair split in two: a copy of the same content, mode and mtime replaces one name
    os.unlink(rootfs / "bin/tool-hard")
    shutil.copy2(rootfs / "bin/tool", rootfs / "bin/tool-hard")
    expected = commit_and_check(store, "links", "local/links:1")
    assert expected["lib/b"][-1] == ("hard links", ("lib/b", "lib/b-hard"))
    assert "etc/pair-third" in expected["lib/pair"][-1][1]
    assert expected["bin/tool"][-1] != ("hard links", ("bin/tool", "bin/tool-hard"))


def test_vfs_commit_reads_only_files_touched_since_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cheap test: a path at the inode and ctime recorded after the copy is untouched; only
    others of the same size and mtime are read — the rewritten one, and one rewritten with
    the same bytes (read and found the same)."""
    store = ImageStore(str(tmp_path / "store"), "vfs")
    image = store.load_image(base_image(store))
    assert image is not None
    store.create_container("local/base:1", "hints")
    rootfs = Path(store.mount("hints"))
    for rel, content in (("etc/motd", b"WELCOME\n"), ("lib/a", b"a")):
        before = (rootfs / rel).stat()
        (rootfs / rel).write_bytes(content)
        os.utime(rootfs / rel, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.chmod(rootfs / "lib/b", 0o600)  # differs by mode: no need to read it
    read: list[str] = []
    compare = drivers._same_content

    def counting(old: str, new: str) -> bool:
        read.append(os.path.relpath(new, rootfs))
        return compare(old, new)

    monkeypatch.setattr(drivers, "_same_content", counting, raising=False)
    container_dir = store.container_dir("hints")
    changes = list(store.driver.changes(container_dir, store.layer_dirs(image)))
    assert sorted(read) == ["etc/motd", "lib/a"]
    assert [c.path for c in changes] == ["etc/motd", "lib/b"]

    # a container made before the record was kept (or with a damaged one) compares in full
    os.unlink(os.path.join(container_dir, drivers.VFS_COPY_RECORD))
    read.clear()
    changes = list(store.driver.changes(container_dir, store.layer_dirs(image)))
    assert [c.path for c in changes] == ["etc/motd", "lib/b"]
    assert {"etc/motd", "lib/a", "lib/big", "bin/tool", "data/x/y"} <= set(read)
    commit_and_check(store, "hints", "local/hints:1")


# ---- item 7: images of hundreds of layers ---------------------------------------------------


def layer_tars(count: int) -> list[bytes]:
    """`count` tiny layers, each over the last: each adds `each/<i>`, rewrites `top`, adds
    `gone/<i>` and whites out `gone/<i-1>`."""
    tars = []
    for i in range(count):
        entries: list[tuple[Any, ...]] = [
            ("each", "dir", None, 0o755),
            ("gone", "dir", None, 0o755),
            ("top", "file", f"{i}\n"),
            (f"each/{i}", "file", str(i)),
            (f"gone/{i}", "file", "x"),
        ]
        if i:
            entries.append((f"gone/.wh.{i - 1}", "file", ""))
        tars.append(make_tar(entries))
    return tars


def reference_tree(tars: list[bytes], dest: Path) -> dict[str, Any]:
    """The tree applying `tars` in order gives, worked out without any graph driver."""
    dest.mkdir()
    for data in tars:
        apply_layer(io.BytesIO(data), str(dest))
    return snapshot(dest)


def import_layers(store: ImageStore, tars: list[bytes]) -> list[LayerRef]:
    refs: list[LayerRef] = []
    for data in tars:
        digest = store.put_blob(data)
        parent = refs[-1].chain_id if refs else None
        dirs = [store.layer_dir(ref.chain_id) for ref in refs]
        chain, diff, size = store.apply_blob(parent, digest, None, dirs)
        refs.append(LayerRef(digest, diff, chain, size, "application/vnd.oci.image.layer.v1.tar"))
    return refs


def register(store: ImageStore, layers: list[LayerRef], ref: str) -> None:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }
    store.register(
        json.dumps(config).encode(), layers, "application/vnd.oci.image.manifest.v1+json", ref
    )


def _mount_options(path: str) -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if line.split()[4] == path:
                return line.rsplit(" ", 1)[-1]
    raise AssertionError(f"{path} is not mounted")


class DeepStores:
    """A store per driver holding one chain of tiny layers (501 for overlay, to pass its limit;
    128 for vfs, which has no limit and copies every layer), imported once per module: importing
    hundreds of layers is the slow part, and images of their first N are then cheap."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[str, tuple[ImageStore, list[bytes], list[LayerRef]]] = {}

    def get(self, driver: str) -> tuple[ImageStore, list[bytes], list[LayerRef]]:
        if driver not in self.built:
            store = ImageStore(str(self.root / driver), driver)
            tars = layer_tars(501 if driver == "overlay" else 128)
            self.built[driver] = (store, tars, import_layers(store, tars))
        return self.built[driver]

    def close(self) -> None:
        try:
            for store, _, _ in self.built.values():
                for c in store.containers():
                    store.remove_container(c["name"])
        finally:
            _unmount_below(self.root)


@pytest.fixture(scope="module")
def deep_stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeepStores]:
    stores = DeepStores(tmp_path_factory.mktemp("deep"))
    try:
        yield stores
    finally:
        stores.close()


@pytest.fixture(params=STORES)
def deep(
    request: pytest.FixtureRequest, deep_stores: DeepStores, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ImageStore, list[bytes], list[LayerRef]]]:
    """The deep store of a driver; its containers go at the end of each test."""
    variant = request.param
    monkeypatch.setattr(OverlayDriver, "use_mount_api", variant != "overlay-links", raising=False)
    store, tars, layers = deep_stores.get("vfs" if variant == "vfs" else "overlay")
    try:
        yield store, tars, layers
    finally:
        for c in store.containers():
            store.remove_container(c["name"])


@pytest.mark.parametrize("count", [128, 200])
def test_an_image_of_many_layers_mounts_with_its_tree_right(
    deep: tuple[ImageStore, list[bytes], list[LayerRef]], count: int, tmp_path: Path
) -> None:
    store, tars, layers = deep
    if len(layers) < count:
        pytest.skip("vfs has no layer limit to approach, and copies every layer: 128 show it")
    register(store, layers[:count], f"local/deep:{count}")
    store.create_container(f"local/deep:{count}", "deep")
    merged = store.mount("deep")
    tree = snapshot(Path(merged))
    assert tree == reference_tree(tars[:count], tmp_path / "reference")
    assert tree["top"][5] == f"{count - 1}\n".encode()
    assert len(os.listdir(f"{merged}/each")) == count
    if store.driver.name == "overlay":  # the mount path meant was taken
        if not OverlayDriver.use_mount_api:
            assert "lowerdir=0:1:2:" in _mount_options(merged)
        elif drivers._kernel_at_least(drivers.LOWERDIR_ADD_KERNEL):
            assert "lowerdir+=" in _mount_options(merged)
    # and a change over them commits like any other
    (Path(merged) / "each/0").write_text("changed")
    os.unlink(Path(merged) / f"each/{count - 1}")
    commit_and_check(store, "deep", f"local/deeper:{count}")


@pytest.mark.parametrize("deep", OVERLAY_STORES, indirect=True)
def test_overlay_mounts_500_layers_and_refuses_501_saying_so(
    deep: tuple[ImageStore, list[bytes], list[LayerRef]], tmp_path: Path
) -> None:
    store, tars, layers = deep
    assert len(layers) == 501
    register(store, layers[:500], "local/deep:500")
    register(store, layers, "local/deep:501")
    store.create_container("local/deep:500", "at-limit")
    merged = store.mount("at-limit")
    assert snapshot(Path(merged)) == reference_tree(tars[:500], tmp_path / "reference")

    honest = "image has 501 layers; overlay mounts at most 500"
    with pytest.raises(LayerError, match=honest):
        store.create_container("local/deep:501", "too-deep")
    assert [c["name"] for c in store.containers()] == ["at-limit"]
    # a container made before the check (or by hand) meets it at mount time
    container = tmp_path / "by-hand"
    driver = OverlayDriver()
    with pytest.raises(LayerError, match=honest):
        driver.mount(str(container), [store.layer_dir(layer.chain_id) for layer in layers])
    assert not driver.is_mounted(str(container))
