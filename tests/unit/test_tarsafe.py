"""Untrusted layer tars, crafted: nothing is ever written outside the layer directory, links
that point outside are contained or refused, corrupt or truncated layers are rejected with a
clear error and leave no half-extracted layer; whiteouts, opaque directories, hard links,
symlinks, permissions, owners, mtimes and xattrs are kept."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path
from typing import Optional

import pytest

from dockyard.layers.store import ImageStore
from dockyard.layers.tarsafe import LayerError, apply_layer


def make_tar(entries: list[tuple], gz: bool = False) -> bytes:
    """entries: (name, type, data_or_linkname[, mode[, pax headers]])."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            name, kind, payload = entry[:3]
            mode = entry[3] if len(entry) > 3 else 0o644
            info = tarfile.TarInfo(name)
            info.mode = mode
            info.mtime = 1_600_000_000
            if len(entry) > 4:
                info.pax_headers = entry[4]
            if kind == "file":
                data = payload.encode() if isinstance(payload, str) else payload
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "sym": tarfile.SYMTYPE,
                "hard": tarfile.LNKTYPE,
                "chr": tarfile.CHRTYPE,
            }[kind]
            if kind in ("sym", "hard"):
                info.linkname = payload
            if kind == "chr":
                info.devmajor, info.devminor = 1, 3
            tar.addfile(info)
    data = buf.getvalue()
    return gzip.compress(data, mtime=0) if gz else data


def apply(tmp: Path, data: bytes, overlay: bool = False, into: Optional[Path] = None) -> Path:
    root = into or tmp / "layer"
    root.mkdir(exist_ok=True)
    apply_layer(io.BytesIO(data), str(root), overlay=overlay)
    return root


def test_absolute_paths_are_contained(tmp_path: Path) -> None:
    root = apply(tmp_path, make_tar([("/etc/passwd-dockyard-test", "file", "x")]))
    assert (root / "etc/passwd-dockyard-test").read_text() == "x"
    assert not Path("/etc/passwd-dockyard-test").exists()


def test_dotdot_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LayerError, match="'..' is not allowed"):
        apply(tmp_path, make_tar([("a/../../escape", "file", "x")]))
    assert not (tmp_path / "escape").exists()


def test_writes_through_a_symlink_stay_inside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    data = make_tar(
        [
            ("evil", "sym", str(outside)),
            ("evil/pwned", "file", "x"),
            ("rel", "sym", "../../../../outside"),
            ("rel/pwned2", "file", "y"),
        ]
    )
    root = apply(tmp_path, data)
    assert list(outside.iterdir()) == []
    # resolved as in a chroot: the link targets are read relative to the layer root
    assert (root / str(outside).lstrip("/") / "pwned").read_text() == "x"
    assert (root / "outside" / "pwned2").read_text() == "y"


def test_hard_link_outside_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s")
    with pytest.raises(LayerError, match="hard link"):
        apply(tmp_path, make_tar([("stolen", "hard", str(secret))]))
    with pytest.raises(LayerError, match="'..' is not allowed"):
        apply(tmp_path, make_tar([("stolen", "hard", "../secret")]))


def test_hard_links_symlinks_modes_owners_times_xattrs(tmp_path: Path) -> None:
    data = make_tar(
        [
            ("bin", "dir", None, 0o755),
            ("bin/tool", "file", "#!/bin/sh\n", 0o4755),
            ("bin/alias", "hard", "bin/tool"),
            ("bin/sym", "sym", "tool"),
            ("data", "file", "v", 0o600, {"SCHILY.xattr.user.dockyard": "kept"}),
        ],
        gz=True,
    )
    root = apply(tmp_path, data)
    tool = (root / "bin/tool").stat()
    assert stat.S_IMODE(tool.st_mode) == 0o4755
    assert (root / "bin/alias").stat().st_ino == tool.st_ino
    assert os.readlink(root / "bin/sym") == "tool"
    assert int(tool.st_mtime) == 1_600_000_000
    assert int((root / "bin").stat().st_mtime) == 1_600_000_000
    assert stat.S_IMODE((root / "data").stat().st_mode) == 0o600
    assert os.getxattr(root / "data", "user.dockyard") == b"kept"


@pytest.mark.skipif(os.geteuid() != 0, reason="device nodes need root")
def test_device_nodes_when_privileged(tmp_path: Path) -> None:
    root = apply(tmp_path, make_tar([("dev", "dir", None, 0o755), ("dev/null", "chr", None)]))
    st = (root / "dev/null").lstat()
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3


def test_whiteouts_applied_on_a_full_root(tmp_path: Path) -> None:
    root = apply(
        tmp_path,
        make_tar(
            [
                ("keep", "file", "k"),
                ("gone", "file", "g"),
                ("dir", "dir", None, 0o755),
                ("dir/old", "file", "o"),
            ]
        ),
    )
    apply(
        tmp_path,
        make_tar(
            [
                (".wh.gone", "file", ""),
                ("dir", "dir", None, 0o755),
                ("dir/.wh..wh..opq", "file", ""),
                ("dir/new", "file", "n"),
            ]
        ),
        into=root,
    )
    assert (root / "keep").exists() and not (root / "gone").exists()
    assert sorted(os.listdir(root / "dir")) == ["new"]


@pytest.mark.skipif(os.geteuid() != 0, reason="overlay whiteouts are device nodes (root)")
def test_whiteouts_kept_in_overlay_form(tmp_path: Path) -> None:
    root = apply(
        tmp_path,
        make_tar(
            [
                (".wh.gone", "file", ""),
                ("dir", "dir", None, 0o755),
                ("dir/.wh..wh..opq", "file", ""),
            ]
        ),
        overlay=True,
    )
    st = (root / "gone").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(root / "dir", "trusted.overlay.opaque") == b"y"


@pytest.mark.parametrize("cut", [100, 700, 1500])
def test_truncated_layer_is_rejected_and_leaves_nothing(tmp_path: Path, cut: int) -> None:
    store = ImageStore(str(tmp_path / "store"), "vfs")
    data = make_tar([("a", "file", os.urandom(3000)), ("b", "file", "b")], gz=True)
    digest = store.put_blob(data[:cut])
    with pytest.raises(LayerError, match="corrupt or truncated layer"):
        store.apply_blob(None, digest, None, [])
    assert os.listdir(tmp_path / "store" / "layers") == []
    assert os.listdir(tmp_path / "store" / "tmp") == []


def test_garbage_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(LayerError):
        apply(tmp_path, b"\x1f\x8b" + os.urandom(500))


def test_digests_of_both_streams(tmp_path: Path) -> None:
    import hashlib

    plain = make_tar([("f", "file", "content")])
    packed = gzip.compress(plain, mtime=0)
    (tmp_path / "l").mkdir()
    result = apply_layer(io.BytesIO(packed), str(tmp_path / "l"))
    assert result.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert result.compressed_digest == "sha256:" + hashlib.sha256(packed).hexdigest()
    assert result.compression == "gzip"


def test_zstd_layers_when_the_extra_is_installed(tmp_path: Path) -> None:
    import hashlib

    import zstandard  # the zstd extra, part of the test extras

    plain = make_tar([("etc", "dir", None, 0o755), ("etc/z", "file", "zstd content")])
    packed = zstandard.ZstdCompressor().compress(plain)
    (tmp_path / "l").mkdir()
    result = apply_layer(io.BytesIO(packed), str(tmp_path / "l"))
    assert result.compression == "zstd"
    assert result.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert (tmp_path / "l/etc/z").read_text() == "zstd content"
