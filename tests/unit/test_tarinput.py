"""How a layer is read: from a regular file (uncompressed: copied file to file, hashed beside),
from any stream (read, hashed and decompressed by a second thread), gzip with several members,
truncated and oversized input, a header too long to hold, the umask, the copy fallback, and no
thread left behind whatever happens."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import stat
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable

import pytest

from dockyard.layers import tarinput
from dockyard.layers.tarsafe import LayerError, LayerTooLarge, apply_layer


def layer(files: dict[str, bytes], mode: int = 0o644, pax: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 1_600_000_000
            if pax:
                info.pax_headers = pax
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@contextmanager
def from_bytes(tmp: Path, data: bytes) -> Iterator[IO[bytes]]:
    yield io.BytesIO(data)


@contextmanager
def from_file(tmp: Path, data: bytes) -> Iterator[IO[bytes]]:
    path = tmp / "layer.blob"
    path.write_bytes(data)
    with open(path, "rb") as f:
        yield f


@contextmanager
def from_pipe(tmp: Path, data: bytes) -> Iterator[IO[bytes]]:
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with os.fdopen(write_fd, "wb") as w:
            for at in range(0, len(data), 7000):  # short writes: reads come back short
                try:
                    w.write(data[at : at + 7000])
                    w.flush()
                except BrokenPipeError:
                    return

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        with os.fdopen(read_fd, "rb", buffering=0) as r:
            yield r  # type: ignore[misc]
    finally:
        writer.join()


SOURCES: dict[str, Callable[[Path, bytes], object]] = {
    "bytes": from_bytes,
    "file": from_file,
    "pipe": from_pipe,
}


def layer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("layer-")]


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    yield
    assert layer_threads() == []


@pytest.mark.parametrize("compress", ["none", "gzip"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_every_source_gives_the_same_tree_and_digests(
    tmp_path: Path, source: str, compress: str
) -> None:
    big = os.urandom(3 * tarinput.CHUNK + 12345)  # spans chunks, not a multiple of 512
    tar = layer({"a/big": big, "a/small": b"x" * 512, "empty": b"", "b/c/d": b"deep"})
    blob = gzip.compress(tar, compresslevel=1) if compress == "gzip" else tar
    root = tmp_path / "root"
    root.mkdir()
    with SOURCES[source](tmp_path, blob) as f:  # type: ignore[attr-defined]
        result = apply_layer(f, str(root))
    assert result.diff_id == sha(tar)
    assert result.compressed_digest == sha(blob)
    assert result.compression == compress
    assert result.size == len(tar)
    assert (root / "a/big").read_bytes() == big
    assert (root / "a/small").read_bytes() == b"x" * 512
    assert (root / "empty").read_bytes() == b""
    assert (root / "b/c/d").read_bytes() == b"deep"


@pytest.mark.parametrize("source", list(SOURCES))
def test_multi_member_gzip_with_zero_padding(tmp_path: Path, source: str) -> None:
    tar = layer({"f": os.urandom(200_000), "g": b"tail"})
    cut = 70_001
    blob = gzip.compress(tar[:cut]) + b"\0" * 1024 + gzip.compress(tar[cut:]) + b"\0" * 100
    root = tmp_path / "root"
    root.mkdir()
    with SOURCES[source](tmp_path, blob) as f:  # type: ignore[attr-defined]
        result = apply_layer(f, str(root))
    assert result.diff_id == sha(tar)
    assert result.compressed_digest == sha(blob)
    assert (root / "g").read_bytes() == b"tail"


@pytest.mark.parametrize("compress", ["none", "gzip"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_truncated_inside_a_member_is_refused(tmp_path: Path, source: str, compress: str) -> None:
    tar = layer({"big": os.urandom(2 * tarinput.CHUNK)})
    cut = tar[: 512 * 3 + tarinput.CHUNK]  # ends in the middle of big's data
    blob = gzip.compress(cut) if compress == "gzip" else cut
    root = tmp_path / "root"
    root.mkdir()
    with SOURCES[source](tmp_path, blob) as f, pytest.raises(LayerError, match="truncated"):  # type: ignore[attr-defined]
        apply_layer(f, str(root))


@pytest.mark.parametrize("source", list(SOURCES))
def test_gzip_cut_inside_a_member_is_refused(tmp_path: Path, source: str) -> None:
    blob = gzip.compress(layer({"f": os.urandom(100_000)}))
    root = tmp_path / "root"
    root.mkdir()
    with SOURCES[source](tmp_path, blob[:-20]) as f, pytest.raises(LayerError):  # type: ignore[attr-defined]
        apply_layer(f, str(root))


@pytest.mark.parametrize("source", list(SOURCES))
def test_a_gzip_bomb_stops_at_the_bound(tmp_path: Path, source: str) -> None:
    # 256 MiB of zeros in one file: about 250 KiB of gzip
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as gz:
        with tarfile.open(fileobj=gz, mode="w|") as tar:
            info = tarfile.TarInfo("zeros")
            info.size = 256 * 1024 * 1024

            class Zeros:
                left = info.size

                def read(self, size: int = -1) -> bytes:
                    n = min(size, self.left)
                    self.left -= n
                    return bytes(n)

            tar.addfile(info, Zeros())  # type: ignore[arg-type]
    root = tmp_path / "root"
    root.mkdir()
    with SOURCES[source](tmp_path, raw.getvalue()) as f:  # type: ignore[attr-defined]
        with pytest.raises(LayerTooLarge, match="larger than 8388608 bytes"):
            apply_layer(f, str(root), max_uncompressed=8 * 1024 * 1024)


def test_an_oversized_plain_file_is_refused_before_any_write(tmp_path: Path) -> None:
    path = tmp_path / "layer.tar"
    path.write_bytes(layer({"f": os.urandom(100_000)}))
    root = tmp_path / "root"
    root.mkdir()
    with open(path, "rb") as f, pytest.raises(LayerTooLarge):
        apply_layer(f, str(root), max_uncompressed=50_000)
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("source", list(SOURCES))
def test_a_header_longer_than_1_mib_is_refused(tmp_path: Path, source: str) -> None:
    # Go's archive/tar (containerd, Docker) refuses pax headers over 1 MiB; reading one whole
    # would let a layer make us hold any amount of memory.
    tar = layer({"f": b"data"}, pax={"comment": "x" * (2 * 1024 * 1024)})
    root = tmp_path / "root"
    root.mkdir()
    with SOURCES[source](tmp_path, tar) as f:  # type: ignore[attr-defined]
        with pytest.raises(LayerError, match="tar header of .* bytes"):
            apply_layer(f, str(root))


def test_modes_are_exact_under_any_umask(tmp_path: Path) -> None:
    tar = layer({"rw": b"1"}, mode=0o664) + b""
    old = os.umask(0o077)
    try:
        root = tmp_path / "root"
        root.mkdir()
        with open(tmp_path / "l.tar", "wb") as f:
            f.write(tar)
        with open(tmp_path / "l.tar", "rb") as f:
            apply_layer(f, str(root))
    finally:
        os.umask(old)
    assert stat.S_IMODE((root / "rw").stat().st_mode) == 0o664


@pytest.mark.skipif(os.geteuid() != 0, reason="set-id bits on files owned by others need root")
def test_setuid_bits_survive_the_owner_change(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("suid")
        info.size, info.mode, info.uid, info.gid = 1, 0o4755, 4242, 4243
        tar.addfile(info, io.BytesIO(b"x"))
    root = tmp_path / "root"
    root.mkdir()
    apply_layer(io.BytesIO(buf.getvalue()), str(root))
    st = (root / "suid").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4755, 4242, 4243)


def test_the_copy_falls_back_when_the_kernel_cannot_copy_between_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(tarinput.os, "copy_file_range", refuse)
    data = os.urandom(tarinput.CHUNK + 777)
    path = tmp_path / "l.tar"
    path.write_bytes(layer({"f": data}))
    root = tmp_path / "root"
    root.mkdir()
    with open(path, "rb") as f:
        result = apply_layer(f, str(root))
    assert (root / "f").read_bytes() == data
    assert result.diff_id == sha(path.read_bytes())


def test_a_file_source_is_read_from_its_position(tmp_path: Path) -> None:
    tar = layer({"f": b"at an offset"})
    path = tmp_path / "l.bin"
    path.write_bytes(b"JUNK" * 100 + tar)
    root = tmp_path / "root"
    root.mkdir()
    with open(path, "rb") as f:
        f.seek(400)
        result = apply_layer(f, str(root))
    assert result.diff_id == sha(tar)
    assert (root / "f").read_bytes() == b"at an offset"


@pytest.mark.parametrize("source", list(SOURCES))
def test_a_failed_member_stops_the_reader_thread(tmp_path: Path, source: str) -> None:
    # a big gzip layer whose first member is refused: the reader thread, blocked on its full
    # queue, must end (the autouse fixture checks no layer- thread is left)
    tar = layer({"../escape": b"x", **{f"f{i}": os.urandom(tarinput.CHUNK) for i in range(12)}})
    blob = gzip.compress(tar, compresslevel=1)
    root = tmp_path / "root"
    root.mkdir()
    with SOURCES[source](tmp_path, blob) as f:  # type: ignore[attr-defined]
        with pytest.raises(LayerError, match=r"'\.\.'"):
            apply_layer(f, str(root))
