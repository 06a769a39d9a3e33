"""Layer apply is confined at the system-call level (issue 10, items 1, 9 and the first half of 10):
a symlink swapped in for a directory the layer made earlier (pointing at a host directory,
absolutely or relatively) gets none of that directory's deferred mode, owner, times or xattrs,
and files, hard links and directory headers written through it stay inside the root; a member
that replaces a directory does not inherit its mode; all of it on the vfs (full root) and overlay
(diff) forms, with the openat2 lookup and with the openat walk used where the kernel lacks it.
Overlay-private xattrs in layer content are stripped so both drivers see the same tree; GNU and
pax sparse members stay sparse (a 10 GiB file from a 20 KiB layer uses a few blocks and reads
right), a corrupt sparse map is refused, and the uncompressed size of a layer is bounded."""

from __future__ import annotations

import gzip
import inspect
import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from dockyard.layers import tarsafe
from dockyard.layers.drivers import OverlayDriver, VfsDriver
from dockyard.layers.tarsafe import LayerError, apply_layer

MTIME = 1_600_000_000
HOST_MTIME = 1_234_567_890
GIB = 1024**3
BIG = 10 * GIB
MODES = pytest.mark.parametrize("overlay", [False, True], ids=["vfs", "overlay"])


def member(
    name: str,
    kind: str = "file",
    data: bytes = b"",
    link: str = "",
    mode: int = 0o644,
    uid: int = 0,
    mtime: int = MTIME,
    xattrs: Optional[dict[str, str]] = None,
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "sym": tarfile.SYMTYPE,
        "hard": tarfile.LNKTYPE,
        "fifo": tarfile.FIFOTYPE,
    }[kind]
    info.mode, info.uid, info.gid, info.mtime, info.linkname = mode, uid, uid, mtime, link
    info.size = len(data)
    info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in (xattrs or {}).items()}
    return info, data


def layer(*members: tuple[tarfile.TarInfo, bytes], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return gzip.compress(buf.getvalue(), mtime=0) if gz else buf.getvalue()


def apply(root: Path, data: bytes, overlay: bool, **kwargs: Any) -> Any:
    """The ApplyResult, or None when the layer was refused with LayerError (also fine)."""
    root.mkdir(exist_ok=True)
    try:
        return apply_layer(io.BytesIO(data), str(root), overlay=overlay, **kwargs)
    except LayerError:
        return None


def xattrs_of(path: Path) -> dict[str, bytes]:
    return {
        name: os.getxattr(path, name, follow_symlinks=False)
        for name in os.listxattr(path, follow_symlinks=False)
    }


def fingerprint(top: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a confined layer must leave alone: names, types, modes, owners, mtimes,
    xattrs and contents of `top` and all below it."""
    out: dict[str, tuple[Any, ...]] = {}
    for path in [top, *sorted(top.rglob("*"))]:
        st = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
        out[str(path.relative_to(top))] = (
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
            xattrs_of(path),
            content,
        )
    return out


class Host:
    """A host directory outside the layer root, like /etc: a `shadow` file and a `sub` dir."""

    def __init__(self, top: Path) -> None:
        top.mkdir()
        (top / "shadow").write_text("root:*:19000:0:99999:7:::\n")
        os.chmod(top / "shadow", 0o640)
        os.setxattr(top / "shadow", "user.host", b"original")
        (top / "sub").mkdir()
        os.chmod(top / "sub", 0o755)
        for path in (top / "shadow", top / "sub", top):
            os.utime(path, (HOST_MTIME, HOST_MTIME))
        self.path = top
        self.before = fingerprint(top)

    def assert_unchanged(self) -> None:
        assert fingerprint(self.path) == self.before, "the layer changed a host directory"


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path / "host-etc")


@pytest.fixture(params=["openat2", "openat-walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both lookups: openat2 (where the kernel has it) and the openat walk used without it."""
    openat2 = getattr(tarsafe, "OPENAT2", None)
    if request.param == "openat-walk" and openat2 is not None:
        monkeypatch.setattr(openat2, "usable", False)
    return str(request.param)


def symlink_to(host: Host, root: Path, relative: bool) -> str:
    return os.path.relpath(host.path, root) if relative else str(host.path)


# ---- item 1: nothing outside the root is written or changed --------------------------------


@MODES
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_item1_exact_attack_is_confined(
    tmp_path: Path, host: Host, resolver: str, overlay: bool, relative: bool
) -> None:
    root = tmp_path / "layer"
    data = layer(
        member("x/", "dir", mode=0o755),
        member(
            "x/shadow/",
            "dir",
            mode=0o4777,
            uid=4242,
            mtime=1,
            xattrs={"user.pwned": "1", "trusted.pwned": "1"},
        ),
        member("x", "sym", link=symlink_to(host, root, relative)),
    )
    result = apply(root, data, overlay)
    host.assert_unchanged()
    if result is not None:
        assert os.readlink(root / "x") == symlink_to(host, root, relative)
        assert [p for p in root.rglob("*") if p.lstat().st_uid == 4242] == []


@MODES
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_symlink_swapped_for_a_parent_then_written_chmodded_hardlinked_through(
    tmp_path: Path, host: Host, resolver: str, overlay: bool, relative: bool
) -> None:
    root = tmp_path / "layer"
    data = layer(
        member("f", data=b"first"),
        member("x/", "dir", mode=0o755),
        member("x/sub/", "dir", mode=0o4777, uid=4242, xattrs={"user.pwned": "1"}),
        member("x", "sym", link=symlink_to(host, root, relative)),
        member("x/sub/new", data=b"written", mode=0o4755, uid=4242),
        member("x/sub/linked", "hard", link="f"),
        member("x/sub/", "dir", mode=0o700, uid=4242, xattrs={"user.chmodded": "1"}),
        member("x/shadow", data=b"replaced", mode=0o777),
    )
    result = apply(root, data, overlay)
    host.assert_unchanged()
    if result is None:
        return
    # resolved as in a chroot: whatever went through `x` landed inside the root
    (new,) = [p for p in root.rglob("new") if p.is_file()]
    assert new.read_bytes() == b"written" and root in new.parents
    (linked,) = [p for p in root.rglob("linked")]
    assert linked.stat().st_ino == (root / "f").stat().st_ino
    assert stat.S_IMODE(new.parent.stat().st_mode) == 0o700
    assert xattrs_of(new.parent) == {"user.chmodded": b"1"}


@MODES
def test_directory_metadata_never_lands_on_a_symlink_in_its_place(
    tmp_path: Path, host: Host, resolver: str, overlay: bool
) -> None:
    root = tmp_path / "layer"
    data = layer(
        member("d/", "dir", mode=0o777, uid=4242, mtime=1, xattrs={"user.pwned": "1"}),
        member("d", "sym", link=str(host.path)),
        member("s/", "dir", mode=0o4777, uid=4242, mtime=1, xattrs={"user.pwned": "1"}),
        member("s", "sym", link=str(host.path / "shadow")),
    )
    result = apply(root, data, overlay)
    host.assert_unchanged()
    if result is not None:
        assert os.readlink(root / "d") == str(host.path)
        assert os.readlink(root / "s") == str(host.path / "shadow")


@MODES
@pytest.mark.parametrize("kind", ["file", "fifo", "sym"])
def test_member_replacing_a_0700_directory_does_not_inherit_its_mode(
    tmp_path: Path, resolver: str, overlay: bool, kind: str
) -> None:
    root = tmp_path / "layer"
    data = layer(
        member("target", data=b"t", mode=0o644),
        member("d/", "dir", mode=0o700, uid=4242, mtime=1, xattrs={"user.dir": "1"}),
        member("d/inner", data=b"i"),
        member("d", kind, data=b"text" if kind == "file" else b"", link="target", mode=0o644),
    )
    result = apply(root, data, overlay)
    assert result is not None
    st = (root / "d").lstat()
    assert st.st_uid == 0 and int(st.st_mtime) == MTIME
    assert "user.dir" not in xattrs_of(root / "d")
    if kind == "sym":
        assert os.readlink(root / "d") == "target"
        assert stat.S_IMODE((root / "target").stat().st_mode) == 0o644
        assert (root / "target").stat().st_uid == 0
    else:
        assert stat.S_IMODE(st.st_mode) == 0o644
        assert (stat.S_ISREG if kind == "file" else stat.S_ISFIFO)(st.st_mode)


# ---- item 9: overlay-private xattrs in layer content -----------------------------------------

PRIVATE = {
    "trusted.overlay.opaque": "y",
    "trusted.overlay.redirect": "/elsewhere",
    "user.overlay.opaque": "y",
    "user.overlay.origin": "x",
}


@MODES
def test_overlay_private_xattrs_in_content_are_stripped(tmp_path: Path, overlay: bool) -> None:
    root = tmp_path / "layer"
    data = layer(
        member("d/", "dir", mode=0o755, xattrs={**PRIVATE, "user.keep": "dir"}),
        member("d/f", data=b"f", xattrs={**PRIVATE, "user.keep": "file"}),
        member("e/", "dir", mode=0o755),
        member("e/.wh..wh..opq"),
    )
    root.mkdir()
    result = apply_layer(io.BytesIO(data), str(root), overlay=overlay)
    assert xattrs_of(root / "d") == {"user.keep": b"dir"}
    assert xattrs_of(root / "d/f") == {"user.keep": b"file"}
    # the driver's own opaque marker is still set, in overlay form only
    assert xattrs_of(root / "e") == ({"trusted.overlay.opaque": b"y"} if overlay else {})
    assert sorted(result.stripped_xattrs) == sorted(
        f"{path}: {name}" for path in ("d", "d/f") for name in PRIVATE
    )


def listing(top: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in sorted(top.rglob("*")):
        st = path.lstat()
        data = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
        out[str(path.relative_to(top))] = (stat.S_IFMT(st.st_mode), data)
    return out


@pytest.mark.skipif(
    os.geteuid() != 0 or not OverlayDriver.supported(), reason="overlay mounts need root"
)
def test_overlay_and_vfs_trees_agree_when_content_carries_an_opaque_xattr(tmp_path: Path) -> None:
    base = layer(member("d/", "dir", mode=0o755), member("d/old", data=b"old"))
    top = layer(
        member("d/", "dir", mode=0o755, xattrs={"trusted.overlay.opaque": "y"}),
        member("d/new", data=b"new"),
    )
    vfs = VfsDriver()
    vfs.apply(str(tmp_path / "v1"), [], io.BytesIO(base))
    vfs.apply(str(tmp_path / "v2"), [str(tmp_path / "v1")], io.BytesIO(top))
    expected = listing(tmp_path / "v2/root")
    assert set(expected) == {"d", "d/old", "d/new"}

    overlay = OverlayDriver()
    lowers = [str(tmp_path / "o1"), str(tmp_path / "o2")]
    overlay.apply(lowers[0], [], io.BytesIO(base))
    overlay.apply(lowers[1], lowers[:1], io.BytesIO(top))
    container = str(tmp_path / "c")
    overlay.create_container(container, lowers)
    merged = overlay.mount(container, lowers)
    try:
        assert listing(Path(merged)) == expected
    finally:
        overlay.umount(container)


# ---- item 10: sparse members stay sparse; the uncompressed size is bounded -----------------

SPARSE_FORMATS = {
    "gnu": ["--format=gnu"],
    "pax-0.1": ["--format=pax", "--sparse-version=0.1"],
    "pax-1.0": ["--format=pax", "--sparse-version=1.0"],
}


def sparse_tar(directory: Path, size: int, pieces: dict[int, bytes], args: list[str]) -> bytes:
    """A layer holding `big`, a sparse file of `size` bytes with `pieces` at their offsets,
    archived by GNU tar --sparse."""
    src = directory / "src"
    src.mkdir(parents=True)
    with open(src / "big", "wb") as f:
        f.truncate(size)
        for offset, piece in pieces.items():
            os.pwrite(f.fileno(), piece, offset)
    out = directory / "layer.tar"
    subprocess.run(["tar", "-C", str(src), "--sparse", *args, "-cf", str(out), "big"], check=True)
    return out.read_bytes()


BIG_PIECES = {0: b"head", 5 * GIB: b"middle", BIG - 4: b"tail"}


@pytest.fixture(scope="module")
def big_sparse(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """One 10 GiB sparse file (a few KiB on disk) archived in each sparse format."""
    return {
        name: sparse_tar(tmp_path_factory.mktemp(f"sparse-{name}"), BIG, BIG_PIECES, args)
        for name, args in SPARSE_FORMATS.items()
    }


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A layer root removed at once after the test (a dense 10 GiB file must not linger)."""
    root = tmp_path / "layer"
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(
    ("fmt", "overlay"),
    [("gnu", False), ("gnu", True), ("pax-0.1", False), ("pax-1.0", False)],
    ids=["gnu-vfs", "gnu-overlay", "pax0.1-vfs", "pax1.0-vfs"],
)
def test_sparse_member_stays_sparse(
    scratch: Path, big_sparse: dict[str, bytes], fmt: str, overlay: bool
) -> None:
    data = big_sparse[fmt]
    assert len(data) < 64 * 1024
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getmembers()[0].sparse  # GNU tar really wrote a sparse member
    scratch.mkdir()
    result = apply_layer(io.BytesIO(data), str(scratch), overlay=overlay)
    st = (scratch / "big").stat()
    assert st.st_size == BIG
    assert st.st_blocks * 512 < 1024 * 1024, "the holes were written"
    with open(scratch / "big", "rb") as f:
        for offset, piece in BIG_PIECES.items():
            assert os.pread(f.fileno(), len(piece), offset) == piece
        assert os.pread(f.fileno(), 4096, 3 * GIB) == bytes(4096)
        assert os.pread(f.fileno(), 4096, BIG - 4096 - 8192) == bytes(4096)
    assert result.size == len(data)  # the stream size: holes are not part of it


def corrupt_sparse_map(data: bytes, index: int, offset: int) -> bytes:
    """The GNU sparse tar `data` with entry `index` of its header's sparse map moved to
    `offset`, the header checksum fixed."""
    header = bytearray(data[:512])
    assert header[156:157] == b"S"
    pos = 386 + 24 * index
    header[pos : pos + 12] = b"%011o\0" % offset
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data[512:]


@pytest.mark.parametrize(("index", "offset"), [(1, 2 * 1024 * 1024), (1, 2048)])
def test_corrupt_sparse_map_is_refused(tmp_path: Path, index: int, offset: int) -> None:
    """A region past the file's end, or overlapping the region before it."""
    data = sparse_tar(
        tmp_path / "src", 1024 * 1024, {0: b"A" * 4096, 512 * 1024: b"B" * 4096}, ["--format=gnu"]
    )
    bad = corrupt_sparse_map(data, index, offset)
    with tarfile.open(fileobj=io.BytesIO(bad)) as tar:
        sparse: Any = tar.getmembers()[0].sparse
    assert sparse[index][0] == offset
    (tmp_path / "layer").mkdir()
    with pytest.raises(LayerError, match="sparse map"):
        apply_layer(io.BytesIO(bad), str(tmp_path / "layer"))


def test_uncompressed_size_is_bounded_by_the_stream_read(tmp_path: Path) -> None:
    """A gzip bomb (64 MiB of zeros in ~64 KiB) is stopped at the bound, with a clear error;
    the bound counts the bytes of the uncompressed tar stream, exactly."""
    plain = layer(member("zeros", data=bytes(64 * 1024 * 1024)))
    bomb = gzip.compress(plain, mtime=0)
    assert len(bomb) < 256 * 1024
    (tmp_path / "a").mkdir()
    with pytest.raises(LayerError, match="larger than 8388608 bytes uncompressed"):
        apply_layer(io.BytesIO(bomb), str(tmp_path / "a"), max_uncompressed=8 * 1024 * 1024)
    assert (tmp_path / "a/zeros").stat().st_size <= 8 * 1024 * 1024
    (tmp_path / "b").mkdir()
    result = apply_layer(io.BytesIO(bomb), str(tmp_path / "b"), max_uncompressed=len(plain))
    assert result.size == len(plain)
    (tmp_path / "c").mkdir()
    with pytest.raises(LayerError, match="uncompressed"):
        apply_layer(io.BytesIO(bomb), str(tmp_path / "c"), max_uncompressed=len(plain) - 1)


def test_sparse_holes_do_not_count_against_the_bound(
    scratch: Path, big_sparse: dict[str, bytes]
) -> None:
    scratch.mkdir()
    apply_layer(io.BytesIO(big_sparse["gnu"]), str(scratch), max_uncompressed=1024 * 1024)
    assert (scratch / "big").stat().st_size == BIG


def test_the_default_bound_is_64_gib() -> None:
    default = inspect.signature(apply_layer).parameters["max_uncompressed"].default
    assert default == tarsafe.MAX_UNCOMPRESSED == 64 * GIB
