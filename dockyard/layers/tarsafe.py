"""Apply an untrusted OCI/Docker layer tar to a directory, safely: absolute paths are contained,
`..` is refused, every path is resolved inside the root (symlinks included) so nothing is ever
written outside it, hard links must point inside, and whiteouts (`.wh.<name>`, `.wh..wh..opq`)
are either applied (a full root, as vfs keeps) or kept in overlayfs form (a diff, as overlay
keeps). The digests of the compressed and the uncompressed stream are taken on the way."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import IO, Any, Optional

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
# Bytes copied per step from a tar member to its file.
COPY_CHUNK = 1024 * 1024
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"


class LayerError(Exception):
    """A layer that cannot be applied: corrupt, truncated or unsafe; the message says which."""


class HashingReader(io.RawIOBase):
    """Reads through to `source`, hashing and counting every byte that passes."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source
        self.hasher = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.source.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.hasher.update(data)
        self.count += n
        return n

    def drain(self) -> None:
        while self.readinto(bytearray(COPY_CHUNK)):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()


def decompressed(raw: IO[bytes]) -> tuple[IO[bytes], str]:
    """The uncompressed stream of a layer and its compression (gzip, zstd or none)."""
    buffered: Any = io.BufferedReader(raw, buffer_size=COPY_CHUNK)  # type: ignore[type-var]
    head = buffered.peek(4)[:4]
    if head.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=buffered, mode="rb"), "gzip"  # type: ignore[return-value]
    if head == ZSTD_MAGIC:
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError as exc:
            raise LayerError(
                "the layer is zstd-compressed; install the zstd extra (pip install zstandard)"
            ) from exc
        return zstandard.ZstdDecompressor().stream_reader(buffered), "zstd"
    return buffered, "none"


@dataclass
class ApplyResult:
    diff_id: str
    compressed_digest: str
    compression: str
    size: int
    files: int
    skipped_devices: list[str] = field(default_factory=list)


def _clean_name(name: str) -> Optional[str]:
    """The member's path relative to the root, or None for the root itself."""
    parts = []
    for part in name.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise LayerError(f"unsafe path {name!r} in layer: '..' is not allowed")
        parts.append(part)
    return "/".join(parts) if parts else None


def secure_join(root: str, rel: str, follow_last: bool = False) -> str:
    """`root/rel` with every symlink on the way resolved inside `root` (as in a chroot)."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        is_last = not parts
        if os.path.islink(candidate) and (follow_last or not is_last):
            hops += 1
            if hops > 40:
                raise LayerError(f"too many symlinks resolving {rel!r}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    full = os.path.join(root, *resolved)
    if os.path.commonpath([root, full]) != root:
        raise LayerError(f"path {rel!r} resolves outside the layer")
    return full


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


class _Applier:
    def __init__(self, root: str, overlay: bool) -> None:
        self.root = os.path.realpath(root)
        self.overlay = overlay
        self.privileged = os.geteuid() == 0
        self.created: set[str] = set()
        self.dir_times: list[tuple[str, tarfile.TarInfo]] = []
        self.skipped: list[str] = []
        self.files = 0

    def _parent(self, rel: str) -> str:
        parent_rel, name = posixpath.split(rel)
        parent = secure_join(self.root, parent_rel, follow_last=True) if parent_rel else self.root
        os.makedirs(parent, exist_ok=True)
        if not os.path.isdir(parent) or os.path.islink(parent):
            raise LayerError(f"parent of {rel!r} is not a directory")
        return os.path.join(parent, name)

    def whiteout(self, rel: str) -> None:
        directory, name = posixpath.split(rel)
        if name == OPAQUE:
            target = secure_join(self.root, directory, follow_last=True) if directory else self.root
            os.makedirs(target, exist_ok=True)
            if self.overlay:
                os.setxattr(target, OVERLAY_OPAQUE_XATTRS[0], b"y")
                return
            for child in os.listdir(target):
                child_rel = f"{directory}/{child}" if directory else child
                if child_rel not in self.created:
                    _remove(os.path.join(target, child))
            return
        hidden = name[len(WHITEOUT_PREFIX) :]
        if not hidden or hidden in (".", ".."):
            raise LayerError(f"invalid whiteout {rel!r}")
        hidden_rel = f"{directory}/{hidden}" if directory else hidden
        path = self._parent(hidden_rel)
        if self.overlay:
            _remove(path)
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
            self.created.add(hidden_rel)
        elif hidden_rel not in self.created:
            _remove(path)

    def member(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        rel = _clean_name(info.name)
        if rel is None:
            if info.isdir():
                self.dir_times.append((self.root, info))
            return
        if posixpath.basename(rel).startswith(WHITEOUT_PREFIX):
            self.whiteout(rel)
            return
        path = self._parent(rel)
        existing_dir = os.path.isdir(path) and not os.path.islink(path)
        if info.isdir():
            if not existing_dir:
                _remove(path)
                os.mkdir(path, 0o700)
            self.dir_times.append((path, info))
        else:
            _remove(path)
            if info.isreg():
                source = tar.extractfile(info)
                assert source is not None
                with open(path, "wb") as out:
                    remaining = info.size
                    while remaining:
                        chunk = source.read(min(COPY_CHUNK, remaining))
                        if not chunk:
                            raise LayerError(f"layer ends inside {rel!r}")
                        out.write(chunk)
                        remaining -= len(chunk)
            elif info.issym():
                os.symlink(info.linkname, path)
            elif info.islnk():
                link_rel = _clean_name(info.linkname)
                if link_rel is None:
                    raise LayerError(f"hard link {rel!r} points to the root")
                target = secure_join(self.root, link_rel)
                if not os.path.lexists(target) or os.path.isdir(target):
                    raise LayerError(
                        f"hard link {rel!r} points to {info.linkname!r}, not a file "
                        "inside the layer"
                    )
                os.link(target, path, follow_symlinks=False)
                # a hard link shares its target's inode: its own header must not change it
                self.created.add(rel)
                self.files += 1
                return
            elif info.ischr() or info.isblk():
                if not self.privileged:
                    self.skipped.append(rel)
                    return
                kind = stat.S_IFCHR if info.ischr() else stat.S_IFBLK
                os.mknod(
                    path, kind | (info.mode & 0o7777), os.makedev(info.devmajor, info.devminor)
                )
            elif info.isfifo():
                os.mkfifo(path, info.mode & 0o7777)
            else:
                raise LayerError(f"unsupported tar entry type for {rel!r}")
            self._metadata(path, info)
        self.created.add(rel)
        self.files += 1

    def _metadata(self, path: str, info: tarfile.TarInfo) -> None:
        if self.privileged:
            os.lchown(path, info.uid, info.gid)
        for key, value in info.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                try:
                    os.setxattr(
                        path,
                        key[len("SCHILY.xattr.") :],
                        value.encode("utf-8", "surrogateescape"),
                        follow_symlinks=False,
                    )
                except OSError:
                    pass  # an xattr namespace this filesystem or user cannot set
        if not info.issym():
            os.chmod(path, info.mode & 0o7777)
        os.utime(path, (info.mtime, info.mtime), follow_symlinks=False)

    def finish(self) -> None:
        for path, info in reversed(self.dir_times):
            self._metadata(path, info)


def apply_layer(source: IO[bytes], target: str, overlay: bool = False) -> ApplyResult:
    """Apply the layer read from `source` to `target` (which must exist).

    On error the target may be half-written: callers extract into a temp directory and rename
    it into place only on success (see the layer store)."""
    raw = HashingReader(source)
    try:
        stream, compression = decompressed(raw)  # type: ignore[arg-type]
        plain = HashingReader(stream)
        applier = _Applier(target, overlay)
        with tarfile.open(fileobj=plain, mode="r|", bufsize=COPY_CHUNK) as tar:  # type: ignore[call-overload]
            for info in tar:
                applier.member(tar, info)
        plain.drain()
        raw.drain()
        applier.finish()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise LayerError(f"corrupt or truncated layer: {exc}") from exc
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, NotADirectoryError)):
            raise LayerError(f"cannot apply layer: {exc}") from exc
        raise
    return ApplyResult(
        diff_id=plain.digest,
        compressed_digest=raw.digest,
        compression=compression,
        size=plain.count,
        files=applier.files,
        skipped_devices=applier.skipped,
    )
