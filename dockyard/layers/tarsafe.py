"""Apply an untrusted OCI/Docker layer tar to a directory, confined to it at the system-call level:
tarfile only parses the stream, and every file, directory, link, device and whiteout is created
here through descriptors. The root is opened once; each member's parent is looked up from it
component by component without letting the kernel follow a symlink (`openat2` with
`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` where the kernel has it, else an `openat` walk with
`O_NOFOLLOW | O_DIRECTORY`), and a symlink met on the way is read and resolved by us inside the
root, as in a chroot (an absolute target restarts at the root, `..` stops there), so a layer can
write through its own symlinks but never out. Metadata goes to the object itself: `fchown`,
`fsetxattr`, `fchmod`, `futimens` on an open file or directory, the `*at` no-follow calls for
symlinks, devices and fifos. Directory metadata is applied at the end (so that later members can
be written into read-only directories) only to the directory that member made: it is remembered
by inode, forgotten when the directory is removed or replaced, and re-opened without following
any symlink, so a member that replaces a directory (a file, or a symlink to the host) never gets
its mode, owner, times or xattrs. Hard links must point to a non-directory inside the root.
Overlay-private xattrs (`trusted.overlay.*`, `user.overlay.*`) in layer content are stripped, not
refused, and listed in `ApplyResult.stripped_xattrs`: only the overlay driver sets them, when it
keeps a `.wh..wh..opq` marker in overlay form. Whiteouts (`.wh.<name>`, `.wh..wh..opq`) are
applied (a full root, as vfs keeps) or kept in overlayfs form (a diff, as overlay keeps). Sparse
members (GNU and pax sparse formats) stay sparse: only their data regions are written. The size
bound `max_uncompressed` (default `MAX_UNCOMPRESSED`, 64 GiB) counts the bytes of the
uncompressed tar stream read, so a decompression bomb is stopped while a sparse member's holes
cost nothing. The digests of the compressed and the uncompressed stream are taken on the way."""

from __future__ import annotations

import ctypes
import errno
import gzip
import hashlib
import io
import os
import posixpath
import stat
import tarfile
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import IO, Any, Optional

from dockyard.layers.tarinput import InputError, InputTooLarge, LayerInput, open_input

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
# xattr namespaces private to overlayfs: stripped from layer content (only the driver sets them).
OVERLAY_PRIVATE_XATTRS = ("trusted.overlay.", "user.overlay.")
# pax header prefix under which tar keeps a member's xattrs.
PAX_XATTR = "SCHILY.xattr."
# Bytes copied per step from a tar member to its file.
COPY_CHUNK = 1024 * 1024
# Default bound on a layer's uncompressed tar stream, in bytes read (sparse holes are not read).
MAX_UNCOMPRESSED = 64 * 1024**3
# Symlinks followed while resolving one path inside the root before giving up (the kernel's 40).
MAX_SYMLINK_HOPS = 40
# Resolved parent directories kept open between members (tar lists a directory's files together).
PARENT_CACHE = 64
# Mode of the parent directories a layer does not list itself.
IMPLICIT_DIR_MODE = 0o755
# The first bytes of a zstd frame and of a gzip member: how a layer's compression is told.
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
# openat2(2)'s system call number: one number on every architecture (Linux 5.6+).
SYS_OPENAT2 = 437
# openat2 `resolve` flags (linux/openat2.h): no /proc magic links, no symlinks, stay beneath.
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
# The lookup openat2 does for us: beneath the root, and not a single symlink on the way.
_RESOLVE_STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
# openat2 answers meaning "not here" (no kernel support, a seccomp filter, unknown flags).
_OPENAT2_ABSENT = (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG)
# openat2 answers the openat walk handles itself: missing, a symlink, a file, a rename race, a
# path longer than PATH_MAX.
_OPENAT2_WALK = (
    errno.ENOENT,
    errno.ELOOP,
    errno.ENOTDIR,
    errno.EXDEV,
    errno.EAGAIN,
    errno.ENAMETOOLONG,
)
# A directory opened only to look things up in it (works without read permission).
_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A directory opened to list it or to set its metadata.
_DIR_READ = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A regular file being created for a member: never an existing name, never through a symlink.
_FILE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# setxattr failures that mean "this filesystem or user cannot keep this xattr": skipped.
_XATTR_UNSUPPORTED = (
    errno.ENOTSUP,
    errno.EOPNOTSUPP,
    errno.EPERM,
    errno.EACCES,
    errno.E2BIG,
    errno.ERANGE,
    errno.EINVAL,
)
# OSErrors that describe the host (disk full, I/O error), not the layer: raised as they are.
_HOST_ERRNOS = (
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EIO,
    errno.EROFS,
    errno.EMFILE,
    errno.ENFILE,
    errno.ENOMEM,
)


class LayerError(Exception):
    """A layer that cannot be applied: corrupt, truncated or unsafe; the message says which."""


class LayerTooLarge(LayerError):
    """A layer whose uncompressed tar stream is longer than the bound it is applied with."""


class HashingReader(io.RawIOBase):
    """Reads through to `source`, hashing and counting every byte that passes; past `limit`
    bytes (when given) it raises `LayerTooLarge`."""

    def __init__(self, source: IO[bytes], limit: Optional[int] = None) -> None:
        self.source = source
        self.hasher = hashlib.sha256()
        self.count = 0
        self.limit = limit

    def readable(self) -> bool:
        return True

    def _account(self, data: bytes) -> None:
        self.hasher.update(data)
        self.count += len(data)
        if self.limit is not None and self.count > self.limit:
            raise LayerTooLarge(
                f"the layer is larger than {self.limit} bytes uncompressed (max_uncompressed); "
                "refusing it"
            )

    def read(self, size: Optional[int] = -1) -> bytes:
        data = self.source.read(-1 if size is None else size)
        self._account(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.source.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self._account(data)
        return n

    def drain(self) -> None:
        while self.read(COPY_CHUNK):
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
    # "path: xattr" of every overlay-private xattr dropped from the layer's content
    stripped_xattrs: list[str] = field(default_factory=list)


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


class _OpenHow(ctypes.Structure):
    """struct open_how of openat2(2)."""

    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


class _Openat2:
    """openat2(2) through libc's syscall(); `usable` turns False the first time the kernel (or a
    seccomp filter) says it has none, and every lookup then takes the openat walk."""

    def __init__(self) -> None:
        self.usable = True
        self._syscall: Any = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self._syscall = libc.syscall
            self._syscall.restype = ctypes.c_long
        except (OSError, AttributeError):
            self.usable = False

    def open(self, dir_fd: int, path: str, flags: int, resolve: int) -> Optional[int]:
        """A descriptor; None when openat2 is unavailable; OSError for what the lookup met."""
        if not self.usable:
            return None
        how = _OpenHow(flags, 0, resolve)
        fd = self._syscall(
            ctypes.c_long(SYS_OPENAT2),
            ctypes.c_long(dir_fd),
            ctypes.c_char_p(os.fsencode(path)),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        code = ctypes.get_errno()
        if code in _OPENAT2_ABSENT:
            self.usable = False
            return None
        raise OSError(code, os.strerror(code), path)


OPENAT2 = _Openat2()


class _Tree:
    """The layer root, opened once. Every path of the layer is looked up from it one component
    at a time and no symlink is ever followed by the kernel: one met on the way is read and
    resolved here, inside the root, as in a chroot."""

    def __init__(self, root: str) -> None:
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # member parent path -> (its directory, opened; the path without symlinks)
        self._parents: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self._retired: list[int] = []

    def close(self) -> None:
        self.invalidate()
        self.end_member()
        os.close(self.fd)

    def invalidate(self) -> None:
        """Forget every resolved parent (a directory or a symlink was removed); descriptors still
        in use by the member being applied are closed at its end."""
        self._retired.extend(fd for fd, _ in self._parents.values())
        self._parents.clear()

    def end_member(self) -> None:
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()

    def parent(self, rel: str, create: bool = True) -> tuple[int, str, str]:
        """(the directory holding `rel`'s last component, that component, `rel` without symlinks).
        Missing parent directories are made when `create`; the descriptor stays owned here."""
        head, name = posixpath.split(rel)
        if not head:
            return self.fd, name, name
        cached = self._parents.get(head)
        if cached is not None:
            self._parents.move_to_end(head)
            fd, canonical = cached
        else:
            fd, canonical = self.resolve_dir(head, create)
            self._parents[head] = (fd, canonical)
            if len(self._parents) > PARENT_CACHE:
                self._retired.append(self._parents.popitem(last=False)[1][0])
        return fd, name, f"{canonical}/{name}" if canonical else name

    def resolve_dir(self, rel: str, create: bool) -> tuple[int, str]:
        """The directory `rel` (symlinks resolved inside the root) opened, and its path without
        symlinks; the caller owns the descriptor. FileNotFoundError when missing and not
        `create`, NotADirectoryError when a component is not a directory."""
        try:
            fd = OPENAT2.open(self.fd, rel, _DIR_PATH, _RESOLVE_STRICT)
        except OSError as exc:
            if exc.errno not in _OPENAT2_WALK:
                raise
            fd = None  # missing, or a symlink on the way: the walk below creates or resolves it
        if fd is not None:
            return fd, rel
        return self._walk(rel, create, follow=True)

    def open_dir_nofollow(self, rel: str) -> Optional[int]:
        """The directory at exactly `rel` (no symlink anywhere on the way) opened for reading and
        for setting its metadata, or None when that path is not a directory any more."""
        if not rel:
            return os.dup(self.fd)
        try:
            fd = OPENAT2.open(self.fd, rel, _DIR_READ, _RESOLVE_STRICT)
            if fd is not None:
                return fd
            path_fd = self._walk(rel, create=False, follow=False)[0]
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EXDEV):
                return None
            raise
        try:
            return os.open(".", _DIR_READ, dir_fd=path_fd)
        finally:
            os.close(path_fd)

    def _walk(self, rel: str, create: bool, follow: bool) -> tuple[int, str]:
        parts = deque(p for p in rel.split("/") if p not in ("", "."))
        stack: list[tuple[int, str]] = []  # directories below the root, opened, in path order
        hops = 0
        try:
            while parts:
                part = parts.popleft()
                here = stack[-1][0] if stack else self.fd
                if part == "..":  # only from a symlink's target: stops at the root
                    if stack:
                        os.close(stack.pop()[0])
                    continue
                try:
                    fd = os.open(part, _DIR_PATH, dir_fd=here)
                except FileNotFoundError:
                    if not create:
                        raise
                    fd = _mkdir(here, part)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    st = os.stat(part, dir_fd=here, follow_symlinks=False)
                    if not follow or not stat.S_ISLNK(st.st_mode):
                        raise NotADirectoryError(
                            errno.ENOTDIR, f"{part!r} in {rel!r} is not a directory"
                        ) from None
                    hops += 1
                    if hops > MAX_SYMLINK_HOPS:
                        raise LayerError(f"too many symlinks resolving {rel!r}") from None
                    target = os.readlink(part, dir_fd=here)
                    if target.startswith("/"):
                        while stack:
                            os.close(stack.pop()[0])
                    parts.extendleft(reversed([p for p in target.split("/") if p not in ("", ".")]))
                    continue
                stack.append((fd, part))
        except BaseException:
            for fd, _ in stack:
                os.close(fd)
            raise
        canonical = "/".join(name for _, name in stack)
        if not stack:
            return os.dup(self.fd), canonical
        for fd, _ in stack[:-1]:
            os.close(fd)
        return stack[-1][0], canonical


def _mkdir(dir_fd: int, name: str) -> int:
    """A parent directory the layer does not list, made with `IMPLICIT_DIR_MODE`; opened."""
    os.mkdir(name, IMPLICIT_DIR_MODE, dir_fd=dir_fd)
    fd = os.open(name, _DIR_READ, dir_fd=dir_fd)
    os.fchmod(fd, IMPLICIT_DIR_MODE)  # whatever the umask
    return fd


class _Applier:
    def __init__(self, tree: _Tree, overlay: bool, layer_input: LayerInput) -> None:
        self.tree = tree
        self.overlay = overlay
        self.input = layer_input
        self.umask = _umask()
        self.privileged = os.geteuid() == 0
        self.created: set[str] = set()  # paths (without symlinks) this layer made
        # directories whose metadata is due at the end: (st_dev, st_ino) -> (path, header)
        self.dirs: dict[tuple[int, int], tuple[str, tarfile.TarInfo]] = {}
        self.skipped: list[str] = []
        self.stripped: list[str] = []
        self.files = 0

    # ---- members ---------------------------------------------------------------------------
    def member(self, info: tarfile.TarInfo) -> None:
        rel = _clean_name(info.name)
        if rel is None:
            if info.isdir():
                self._defer(os.fstat(self.tree.fd), "", info)
            return
        if posixpath.basename(rel).startswith(WHITEOUT_PREFIX):
            self.whiteout(rel)
            return
        parent, name, path = self.tree.parent(rel)
        if info.isdir():
            st = _lstat(parent, name)
            if st is None or not stat.S_ISDIR(st.st_mode):
                self._remove(parent, name)
                os.mkdir(name, 0o700, dir_fd=parent)
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            self._defer(st, path, info)
        elif info.islnk():
            self._hard_link(rel, info, parent, name)
            self.created.add(path)
            self.files += 1
            return
        elif info.isreg():
            if info.size < 0:
                raise LayerError(f"corrupt layer: {rel!r} has a negative size")
            # created with its final permission bits where the umask keeps them (most files: no
            # fchmod); an existing name (or a symlink) is removed first, never written through
            mode = info.mode & 0o777
            try:
                fd = os.open(name, _FILE_NEW, mode, dir_fd=parent)
            except FileExistsError:
                self._remove(parent, name)
                fd = os.open(name, _FILE_NEW, mode, dir_fd=parent)
            try:
                self._write(info, fd, rel)
                self._fd_metadata(fd, info, path, created_mode=mode & ~self.umask)
            finally:
                os.close(fd)
        elif info.issym():
            self._remove(parent, name)
            os.symlink(info.linkname, name, dir_fd=parent)
            self._at_metadata(parent, name, info, path)
        elif info.ischr() or info.isblk():
            if not self.privileged:
                self.skipped.append(rel)
                return
            self._remove(parent, name)
            kind = stat.S_IFCHR if info.ischr() else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(info.devmajor, info.devminor), dir_fd=parent)
            self._at_metadata(parent, name, info, path)
        elif info.isfifo():
            self._remove(parent, name)
            os.mkfifo(name, 0o600, dir_fd=parent)
            self._at_metadata(parent, name, info, path)
        else:
            raise LayerError(f"unsupported tar entry type for {rel!r}")
        self.created.add(path)
        self.files += 1

    def _hard_link(self, rel: str, info: tarfile.TarInfo, parent: int, name: str) -> None:
        refused = f"hard link {rel!r} points to {info.linkname!r}, not a file inside the layer"
        link_rel = _clean_name(info.linkname)
        if link_rel is None:
            raise LayerError(f"hard link {rel!r} points to the root")
        try:
            source_dir, source_name, _ = self.tree.parent(link_rel, create=False)
            source = os.stat(source_name, dir_fd=source_dir, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError, LayerError) as exc:
            raise LayerError(refused) from exc
        if stat.S_ISDIR(source.st_mode):
            raise LayerError(refused)
        existing = _lstat(parent, name)
        if existing is not None and (existing.st_dev, existing.st_ino) == (
            source.st_dev,
            source.st_ino,
        ):
            return  # already that very file
        self._remove(parent, name)
        # a hard link shares its target's inode: its own header must not change it
        os.link(source_name, name, src_dir_fd=source_dir, dst_dir_fd=parent, follow_symlinks=False)

    def whiteout(self, rel: str) -> None:
        directory, name = posixpath.split(rel)
        if name == OPAQUE:
            self._opaque(directory)
            return
        hidden = name[len(WHITEOUT_PREFIX) :]
        if not hidden or hidden in (".", ".."):
            raise LayerError(f"invalid whiteout {rel!r}")
        hidden_rel = f"{directory}/{hidden}" if directory else hidden
        if self.overlay:
            parent, hidden, path = self.tree.parent(hidden_rel)
            self._remove(parent, hidden)
            os.mknod(hidden, 0o600 | stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent)
            self.created.add(path)
            return
        try:
            parent, hidden, path = self.tree.parent(hidden_rel, create=False)
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing there to hide
        if path not in self.created:
            self._remove(parent, hidden)

    def _opaque(self, directory: str) -> None:
        if directory:
            path_fd, path = self.tree.resolve_dir(directory, create=True)
            try:
                fd = os.open(".", _DIR_READ, dir_fd=path_fd)
            finally:
                os.close(path_fd)
        else:
            fd, path = os.dup(self.tree.fd), ""
        try:
            if self.overlay:
                os.setxattr(fd, OVERLAY_OPAQUE_XATTRS[0], b"y")
                return
            for child in os.listdir(fd):
                if (f"{path}/{child}" if path else child) not in self.created:
                    self._remove(fd, child)
        finally:
            os.close(fd)

    # ---- data ------------------------------------------------------------------------------
    def _write(self, info: tarfile.TarInfo, fd: int, rel: str) -> None:
        """The member's data into `fd`: for a sparse member only its data regions, at their
        offsets, then the file is extended to its full size (the holes are never written)."""
        sparse: Any = info.sparse
        regions = [(0, info.size)] if sparse is None else _sparse_regions(sparse, info.size, rel)
        position = info.offset_data
        for offset, length in regions:
            self.input.seek(position)  # forward only: the regions' data follow one another
            position += length
            try:
                self.input.copy_to(fd, offset, length)
            except InputError as exc:
                if isinstance(exc, InputTooLarge):
                    raise
                raise LayerError(f"corrupt or truncated layer: it ends inside {rel!r}") from exc
        if sparse is not None:
            os.ftruncate(fd, info.size)

    # ---- metadata --------------------------------------------------------------------------
    def _defer(self, st: os.stat_result, path: str, info: tarfile.TarInfo) -> None:
        key = (st.st_dev, st.st_ino)
        self.dirs.pop(key, None)  # the last header for a directory wins
        self.dirs[key] = (path, info)

    def _xattrs(self, info: tarfile.TarInfo, path: str) -> list[tuple[str, bytes]]:
        out = []
        for key, value in info.pax_headers.items():
            if not key.startswith(PAX_XATTR):
                continue
            name = key[len(PAX_XATTR) :]
            if name.startswith(OVERLAY_PRIVATE_XATTRS):
                self.stripped.append(f"{path or '.'}: {name}")
                continue
            out.append((name, value.encode("utf-8", "surrogateescape")))
        return out

    def _fd_metadata(
        self, fd: int, info: tarfile.TarInfo, path: str, created_mode: Optional[int] = None
    ) -> None:
        """Owner, xattrs, mode and times of an open file or directory (in that order: chown
        clears set-id bits and file capabilities). `created_mode`: the permission bits the
        object was made with, when known; the mode is then set only if it differs."""
        if self.privileged:
            os.fchown(fd, info.uid, info.gid)
        for name, value in self._xattrs(info, path):
            _setxattr(fd, name, value)
        if created_mode is None or created_mode != info.mode & 0o7777:
            os.fchmod(fd, info.mode & 0o7777)
        os.utime(fd, (info.mtime, info.mtime))

    def _at_metadata(self, parent: int, name: str, info: tarfile.TarInfo, path: str) -> None:
        """The same for a symlink, device or fifo (not opened: opening a device can act on it),
        through the no-follow `*at` calls on its parent directory."""
        if self.privileged:
            os.chown(name, info.uid, info.gid, dir_fd=parent, follow_symlinks=False)
        xattrs = self._xattrs(info, path)
        for key, value in xattrs:
            # no setxattrat before Linux 6.13: the parent's descriptor, the name not followed
            _setxattr(f"/proc/self/fd/{parent}/{name}", key, value)
        if not info.issym():
            # fchmodat(AT_SYMLINK_NOFOLLOW); the name was just made here and is no symlink
            os.chmod(name, info.mode & 0o7777, dir_fd=parent, follow_symlinks=False)
        os.utime(name, (info.mtime, info.mtime), dir_fd=parent, follow_symlinks=False)

    def finish(self) -> None:
        """Directory metadata, deepest first, on each directory re-opened without following a
        symlink and only if it is still the very directory its member made."""
        for key, (path, info) in sorted(
            self.dirs.items(), key=lambda item: _depth(item[1][0]), reverse=True
        ):
            fd = self.tree.open_dir_nofollow(path)
            if fd is None:
                continue
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) == key:
                    self._fd_metadata(fd, info, path)
            finally:
                os.close(fd)

    # ---- removal ---------------------------------------------------------------------------
    def _remove(self, parent: int, name: str) -> None:
        """Remove `name` from the directory `parent`, a whole tree for a directory, never
        following a symlink."""
        st = _lstat(parent, name)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            self.tree.invalidate()
            self._remove_tree(parent, name)
            return
        if stat.S_ISLNK(st.st_mode):
            self.tree.invalidate()
        os.unlink(name, dir_fd=parent)

    def _remove_tree(self, parent: int, name: str) -> None:
        top = os.open(name, _DIR_READ, dir_fd=parent)
        # directories being emptied, outermost first: (descriptor, name, children left)
        stack: list[tuple[int, str, list[str]]] = [(top, name, [])]
        try:
            self._forget(os.fstat(top))
            stack[0][2].extend(os.listdir(top))
            while stack:
                fd, dir_name, children = stack[-1]
                if not children:
                    stack.pop()
                    os.close(fd)
                    os.rmdir(dir_name, dir_fd=stack[-1][0] if stack else parent)
                    continue
                child = children.pop()
                st = os.stat(child, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(child, dir_fd=fd)
                    continue
                child_fd = os.open(child, _DIR_READ, dir_fd=fd)
                stack.append((child_fd, child, []))
                self._forget(st)
                stack[-1][2].extend(os.listdir(child_fd))
        except BaseException:
            for fd, _, _ in stack:
                os.close(fd)
            raise

    def _forget(self, st: os.stat_result) -> None:
        """A directory removed: its deferred metadata goes with it."""
        self.dirs.pop((st.st_dev, st.st_ino), None)


def _lstat(parent: int, name: str) -> Optional[os.stat_result]:
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _depth(path: str) -> int:
    return path.count("/") + 1 if path else 0


def _setxattr(target: Any, name: str, value: bytes) -> None:
    """Set one xattr on a descriptor, or on a path whose last component is not followed;
    skipped where this filesystem or user cannot keep it."""
    try:
        os.setxattr(target, name, value, follow_symlinks=isinstance(target, int))
    except OSError as exc:
        if exc.errno not in _XATTR_UNSUPPORTED:
            raise


def _sparse_regions(sparse: Any, size: int, rel: str) -> list[tuple[int, int]]:
    """The data regions (offset, length) of a sparse member, checked: in order, not
    overlapping, inside the file."""
    regions = []
    end = 0
    for offset, length in sparse:
        if offset < end or length < 0 or offset + length > size:
            raise LayerError(f"corrupt layer: invalid sparse map for {rel!r}")
        end = offset + length
        if length:
            regions.append((offset, length))
    return regions


def _umask() -> int:
    """This process's umask, read without changing it (Linux 4.7+); 0o7777 (every mode set
    explicitly) where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o7777


def apply_layer(
    source: IO[bytes],
    target: str,
    overlay: bool = False,
    max_uncompressed: int = MAX_UNCOMPRESSED,
) -> ApplyResult:
    """Apply the layer read from `source` to `target` (which must exist); the uncompressed tar
    stream may be at most `max_uncompressed` bytes long (`LayerTooLarge` past it).

    On error the target may be half-written: callers extract into a temp directory and rename
    it into place only on success (see the layer store)."""
    try:
        tree = _Tree(target)
    except OSError as exc:
        raise LayerError(f"cannot apply layer: {exc}") from exc
    layer_input: Optional[LayerInput] = None
    try:
        layer_input = open_input(source, max_uncompressed)
        applier = _Applier(tree, overlay, layer_input)
        with tarfile.open(fileobj=layer_input, mode="r:") as tar:  # type: ignore[call-overload]
            for info in tar:
                try:
                    applier.member(info)
                except (InputError, LayerError):
                    raise
                except OSError as exc:
                    if exc.errno in _HOST_ERRNOS:
                        raise
                    raise LayerError(f"cannot apply {info.name!r}: {exc}") from exc
                except (OverflowError, ValueError) as exc:
                    raise LayerError(f"corrupt layer: {info.name!r}: {exc}") from exc
                finally:
                    tree.end_member()
        diff_id, compressed_digest, size = layer_input.finish()
        applier.finish()
    except InputTooLarge as exc:
        raise LayerTooLarge(str(exc)) from None
    except InputError as exc:
        raise LayerError(str(exc)) from None
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise LayerError(f"corrupt or truncated layer: {exc}") from exc
    except (OverflowError, ValueError) as exc:
        raise LayerError(f"corrupt layer: {exc}") from exc
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, NotADirectoryError)):
            raise LayerError(f"cannot apply layer: {exc}") from exc
        raise
    finally:
        if layer_input is not None:
            layer_input.close()
        tree.close()
    return ApplyResult(
        diff_id=diff_id,
        compressed_digest=compressed_digest,
        compression=layer_input.compression,
        size=size,
        files=applier.files,
        skipped_devices=applier.skipped,
        stripped_xattrs=applier.stripped,
    )
