"""Graph drivers: how layers and containers sit on disk. One interface (`GraphDriver`), two
drivers — `overlay` (kernel overlayfs: each layer keeps only its diff, a container is an upper
and work dir over the stacked lower layers, so creating one costs the same at any image size) and
`vfs` (copies: each layer is a full root, a container a copy of its image; works everywhere).
Both report a container's changes the same way, which commit turns into a layer."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, Optional, Protocol

from dockyard.layers.tarsafe import OVERLAY_OPAQUE_XATTRS, ApplyResult, LayerError, apply_layer

# The most lower layers one overlayfs mount stacks: the kernel's OVL_MAX_STACK (measured on 6.18
# with both mount paths below: 500 mount, 501 fail with "too many lower directories, limit is 500").
OVERLAY_MAX_LOWERS = 500
# The longest option string mount(2) takes: the kernel copies one page of it, NUL included.
MOUNT_DATA_MAX = 4095
# The longest path fsconfig(2) takes as a string value (fs/fsopen.c copies at most 256 bytes).
FSCONFIG_STRING_MAX = 255
# The kernel from which overlayfs takes one lower layer per `lowerdir+` (fsconfig); before it,
# and on other errors of the new mount API, the legacy mount(2) with short links is used.
LOWERDIR_ADD_KERNEL = (6, 8)
# Machines whose syscall table numbers the new mount API as below (the shared numbering of
# syscalls added since Linux 5.2; mips and alpha differ and take the legacy mount).
MOUNT_API_MACHINES = ("x86_64", "aarch64", "i686", "armv7l", "ppc64le", "s390x", "riscv64")
# Directory in an overlay container holding one short symlink per lower layer ("0" is the top):
# the legacy mount(2) is made from inside it, so 500 lowerdirs take under 2 KB of the page.
LOWER_LINKS = "lower"
# xattr namespaces that describe a layer's own storage (overlay's whiteouts, opaque dirs,
# origins), not the image content: never compared, never committed.
STORAGE_XATTRS = ("trusted.overlay.", "user.overlay.")
# A vfs container's record, taken right after its copy, of each path's inode and ctime (see
# _record_copy): commit reads only files that moved from it.
VFS_COPY_RECORD = "copied.json"
# How long taking that record waits for the clock to pass the copy's last ctime (a coarse tick
# is 1-10 ms), so that files copied in the record's own tick can be trusted too.
VFS_RECORD_TICK_WAIT = 0.05
# Bytes read per step when commit compares a container file with its image file.
COMPARE_CHUNK = 1024 * 1024

# Syscall numbers and flags of the new mount API (include/uapi/linux/mount.h), and of unshare.
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_FSMOUNT_CLOEXEC = 0x1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_AT_FDCWD = -100
_CLONE_FS = 0x200

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class Change:
    """One path that differs in a container: added/modified (`kind="A"`/`"C"`), deleted (`"D"`),
    or a directory whose lower contents are hidden (`opaque`)."""

    path: str
    kind: str
    opaque: bool = False


class GraphDriver(Protocol):
    name: str

    def apply(self, layer_dir: str, parent_dirs: list[str], source: IO[bytes]) -> ApplyResult: ...

    def create_container(self, container_dir: str, layer_dirs: list[str]) -> None: ...

    def mount(self, container_dir: str, layer_dirs: list[str]) -> str: ...

    def umount(self, container_dir: str) -> None: ...

    def is_mounted(self, container_dir: str) -> bool: ...

    def changes(self, container_dir: str, layer_dirs: list[str]) -> Iterator[Change]: ...

    def rootfs(self, container_dir: str) -> str: ...

    def changed_root(self, container_dir: str) -> str: ...


def _is_mountpoint(path: str) -> bool:
    return os.path.ismount(path)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: str) -> bool:
    for name in OVERLAY_OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def image_xattrs(path: str) -> dict[str, bytes]:
    """The xattrs of `path` (not followed) that belong to the image, by name."""
    out: dict[str, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out  # a filesystem without xattrs
    for name in names:
        if name.startswith(STORAGE_XATTRS):
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue  # removed since listed, or a namespace this user cannot read
    return out


def check_overlay_depth(layers: int) -> None:
    """Refuse, saying so, an image deeper than one overlay mount can stack."""
    if layers > OVERLAY_MAX_LOWERS:
        raise LayerError(
            f"image has {layers} layers; overlay mounts at most {OVERLAY_MAX_LOWERS} "
            "(squash the image, or use --driver vfs)"
        )


class OverlayDriver:
    """Kernel overlayfs. Layer dirs hold `diff/`; a container `upper/`, `work/`, `merged/`."""

    name = "overlay"
    # Mount with the new mount API (one `lowerdir+` per layer) where the kernel has it; off, the
    # legacy mount(2) over short links is used, as on kernels before 6.8 (the suite runs both).
    use_mount_api = True

    @staticmethod
    def supported() -> bool:
        try:
            with open("/proc/filesystems") as f:
                return any(line.split()[-1] == "overlay" for line in f if line.strip())
        except OSError:
            return False

    def apply(self, layer_dir: str, parent_dirs: list[str], source: IO[bytes]) -> ApplyResult:
        diff = os.path.join(layer_dir, "diff")
        os.makedirs(diff, exist_ok=True)
        return apply_layer(source, diff, overlay=True)

    def create_container(self, container_dir: str, layer_dirs: list[str]) -> None:
        check_overlay_depth(len(layer_dirs))
        for sub in ("upper", "work", "merged"):
            os.makedirs(os.path.join(container_dir, sub), exist_ok=True)

    def rootfs(self, container_dir: str) -> str:
        return os.path.join(container_dir, "merged")

    def changed_root(self, container_dir: str) -> str:
        return os.path.join(container_dir, "upper")

    def is_mounted(self, container_dir: str) -> bool:
        return _is_mountpoint(self.rootfs(container_dir))

    def mount(self, container_dir: str, layer_dirs: list[str]) -> str:
        merged = os.path.abspath(self.rootfs(container_dir))
        if self.is_mounted(container_dir):
            return merged
        check_overlay_depth(len(layer_dirs))
        container_dir = os.path.abspath(container_dir)
        lowers = [os.path.abspath(os.path.join(d, "diff")) for d in reversed(layer_dirs)]
        if not lowers:
            empty = os.path.join(container_dir, "empty-lower")
            os.makedirs(empty, exist_ok=True)
            lowers = [empty]
        upper = os.path.join(container_dir, "upper")
        work = os.path.join(container_dir, "work")
        if self.use_mount_api and _mount_with_fsconfig(lowers, upper, work, merged):
            return merged
        _mount_with_links(container_dir, lowers, upper, work, merged)
        return merged

    def umount(self, container_dir: str) -> None:
        if self.is_mounted(container_dir):
            proc = subprocess.run(
                ["umount", self.rootfs(container_dir)], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                raise LayerError(f"umount failed: {proc.stderr.strip()}")

    def changes(self, container_dir: str, layer_dirs: list[str]) -> Iterator[Change]:
        upper = self.changed_root(container_dir)
        lowers = [os.path.join(d, "diff") for d in layer_dirs]

        def in_lower(rel: str) -> bool:
            return any(os.path.lexists(os.path.join(lower, rel)) for lower in lowers)

        for directory, dirs, files in os.walk(upper):
            dirs.sort()
            rel_dir = os.path.relpath(directory, upper)
            rel_dir = "" if rel_dir == "." else rel_dir
            for name in sorted(dirs) + sorted(files):
                rel = f"{rel_dir}/{name}" if rel_dir else name
                full = os.path.join(directory, name)
                st = os.lstat(full)
                if _is_whiteout(st):
                    yield Change(rel, "D")
                    continue
                opaque = stat.S_ISDIR(st.st_mode) and _is_opaque(full)
                yield Change(rel, "C" if in_lower(rel) else "A", opaque=opaque)


def _errno_error(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


def _syscall(what: str, number: int, *args: Any) -> int:
    result = int(_LIBC.syscall(ctypes.c_long(number), *args))
    if result < 0:
        raise _errno_error(what)
    return result


def _kernel_at_least(version: tuple[int, int]) -> bool:
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return match is not None and (int(match[1]), int(match[2])) >= version


def _fs_context_log(fs_fd: int) -> str:
    """The kernel's own messages about a failed fsconfig/fsmount ("too many lower directories,
    limit is 500", "failed to resolve …"), read from the filesystem context."""
    messages = []
    for _ in range(16):
        try:
            line = os.read(fs_fd, 4096).decode("utf-8", "replace").strip()
        except OSError:
            break  # ENODATA: nothing more
        if line[:2] in ("e ", "w "):
            messages.append(line[2:])
    return "; ".join(messages)


def _mount_failed(exc: OSError, detail: str) -> LayerError:
    if exc.errno == errno.EPERM:
        return LayerError("mounting overlay needs root (CAP_SYS_ADMIN) (try --driver vfs)")
    return LayerError(f"overlay mount failed: {detail} (try --driver vfs)")


def _mount_with_fsconfig(lowers: list[str], upper: str, work: str, target: str) -> bool:
    """Mount with fsopen/fsconfig/fsmount/move_mount, each lower layer its own `lowerdir+`, so
    no option string has to hold them all. False (nothing done) where the kernel lacks it."""
    paths = [os.fsencode(p) for p in [*lowers, upper, work]]
    if (
        platform.machine() not in MOUNT_API_MACHINES
        or not _kernel_at_least(LOWERDIR_ADD_KERNEL)
        or any(len(p) > FSCONFIG_STRING_MAX for p in paths)
    ):
        return False
    try:
        fs_fd = _syscall(
            "fsopen", _SYS_FSOPEN, ctypes.c_char_p(b"overlay"), ctypes.c_uint(_FSOPEN_CLOEXEC)
        )
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM):
            return False  # filtered (seccomp): mount(2) may still be allowed, or says why not
        raise _mount_failed(exc, exc.strerror or "fsopen failed") from exc
    try:
        settings = [(b"source", b"overlay")] + [(b"lowerdir+", p) for p in paths[:-2]]
        settings += [(b"upperdir", paths[-2]), (b"workdir", paths[-1])]
        for key, value in settings:
            _syscall(
                f"{os.fsdecode(key)} {os.fsdecode(value)}",
                _SYS_FSCONFIG,
                ctypes.c_int(fs_fd),
                ctypes.c_uint(_FSCONFIG_SET_STRING),
                ctypes.c_char_p(key),
                ctypes.c_char_p(value),
                ctypes.c_int(0),
            )
        _syscall(
            "fsconfig create",
            _SYS_FSCONFIG,
            ctypes.c_int(fs_fd),
            ctypes.c_uint(_FSCONFIG_CMD_CREATE),
            ctypes.c_char_p(None),
            ctypes.c_char_p(None),
            ctypes.c_int(0),
        )
        mount_fd = _syscall(
            "fsmount",
            _SYS_FSMOUNT,
            ctypes.c_int(fs_fd),
            ctypes.c_uint(_FSMOUNT_CLOEXEC),
            ctypes.c_uint(0),
        )
        try:
            _syscall(
                f"move_mount to {target}",
                _SYS_MOVE_MOUNT,
                ctypes.c_int(mount_fd),
                ctypes.c_char_p(b""),
                ctypes.c_int(_AT_FDCWD),
                ctypes.c_char_p(os.fsencode(target)),
                ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH),
            )
        finally:
            os.close(mount_fd)  # detached until moved: closing it unmounts a failed one
    except OSError as exc:
        raise _mount_failed(exc, _fs_context_log(fs_fd) or str(exc.strerror)) from exc
    finally:
        os.close(fs_fd)
    return True


def _mount_with_links(
    container_dir: str, lowers: list[str], upper: str, work: str, target: str
) -> None:
    """The legacy mount(2), whose options must fit in a page: each lower layer gets a symlink
    named by its position in `container_dir/lower/`, and the mount is made from inside that
    directory with relative names (`lowerdir=0:1:…,upperdir=../upper`), as Docker's `l/` does."""
    links = os.path.join(container_dir, LOWER_LINKS)
    remove_tree(links)
    os.makedirs(links)
    for index, lower in enumerate(lowers):
        os.symlink(lower, os.path.join(links, str(index)))
    options = (
        f"lowerdir={':'.join(str(i) for i in range(len(lowers)))},"
        f"upperdir={os.path.relpath(upper, links)},workdir={os.path.relpath(work, links)}"
    ).encode()
    if len(options) > MOUNT_DATA_MAX:
        raise LayerError(f"overlay options of {len(lowers)} layers do not fit in one page")
    failures: list[OSError] = []

    def mount_from_links() -> None:
        # cwd is per process: this thread first takes a private copy, then moves into `links`
        try:
            if _LIBC.unshare(ctypes.c_int(_CLONE_FS)) != 0:
                raise _errno_error("unshare(CLONE_FS)")
            os.chdir(links)
            if (
                _LIBC.mount(
                    ctypes.c_char_p(b"overlay"),
                    ctypes.c_char_p(os.fsencode(target)),
                    ctypes.c_char_p(b"overlay"),
                    ctypes.c_ulong(0),
                    ctypes.c_char_p(options),
                )
                != 0
            ):
                raise _errno_error("mount")
        except OSError as exc:
            failures.append(exc)

    thread = threading.Thread(target=mount_from_links, name="dockyard-overlay-mount")
    thread.start()
    thread.join()
    if failures:
        exc = failures[0]
        raise _mount_failed(exc, f"{exc.strerror}; the kernel log (dmesg) says why") from exc


def _copy_tree(source: str, dest: str) -> None:
    """A full copy keeping links, hard links, devices, owners, modes, times and xattrs."""
    proc = subprocess.run(
        ["cp", "-a", "--reflink=auto", f"{source}/.", dest],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise LayerError(f"copying {source} failed: {proc.stderr.strip()}")


class VfsDriver:
    """Copies. Layer dirs hold `root/` (a full filesystem); a container `rootfs/`."""

    name = "vfs"

    @staticmethod
    def supported() -> bool:
        return True

    def apply(self, layer_dir: str, parent_dirs: list[str], source: IO[bytes]) -> ApplyResult:
        root = os.path.join(layer_dir, "root")
        os.makedirs(root, exist_ok=True)
        if parent_dirs:
            _copy_tree(os.path.join(parent_dirs[-1], "root"), root)
        return apply_layer(source, root, overlay=False)

    def create_container(self, container_dir: str, layer_dirs: list[str]) -> None:
        rootfs = self.rootfs(container_dir)
        os.makedirs(rootfs, exist_ok=True)
        if layer_dirs:
            _copy_tree(os.path.join(layer_dirs[-1], "root"), rootfs)
        _record_copy(container_dir, rootfs)

    def rootfs(self, container_dir: str) -> str:
        return os.path.join(container_dir, "rootfs")

    def changed_root(self, container_dir: str) -> str:
        return self.rootfs(container_dir)

    def is_mounted(self, container_dir: str) -> bool:
        return os.path.isdir(self.rootfs(container_dir))

    def mount(self, container_dir: str, layer_dirs: list[str]) -> str:
        return self.rootfs(container_dir)

    def umount(self, container_dir: str) -> None:
        return None

    def changes(self, container_dir: str, layer_dirs: list[str]) -> Iterator[Change]:
        new = self.rootfs(container_dir)
        old = os.path.join(layer_dirs[-1], "root") if layer_dirs else None
        yield from _TreeDiff(old, new, _load_copy_record(container_dir)).changes()


def _record_copy(container_dir: str, rootfs: str) -> None:
    """Write down each copied path's (inode, ctime) for commit's cheap test of "untouched".

    Every later write, truncate, chmod, chown, xattr change, link or unlink of a file moves its
    ctime to the clock's now (userspace cannot set a ctime, short of setting the system clock);
    a file replaced by another, or renamed over the path, has another inode. So a path still at
    its recorded (inode, ctime) has the content and xattrs the copy gave it, those of the image.
    The one trap is a change within the same clock tick as the copy (git's "racy clean"): the
    record is stamped with a ctime taken after the walk, and only entries strictly older than
    the stamp are kept — the others are compared in full."""
    entries: dict[str, tuple[int, int]] = {}
    newest = 0
    for directory, dirs, files in os.walk(rootfs):
        rel_dir = os.path.relpath(directory, rootfs)
        for name in dirs + files:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = os.lstat(os.path.join(directory, name))
            entries[rel] = (st.st_ino, st.st_ctime_ns)
            newest = max(newest, st.st_ctime_ns)
    path = os.path.join(container_dir, VFS_COPY_RECORD)
    with open(path + ".tmp", "w") as f:
        stamp = os.fstat(f.fileno()).st_ctime_ns
        deadline = time.monotonic() + VFS_RECORD_TICK_WAIT
        while stamp <= newest and time.monotonic() < deadline:
            time.sleep(0.001)
            os.utime(f.fileno())
            stamp = os.fstat(f.fileno()).st_ctime_ns
        kept = {rel: list(entry) for rel, entry in entries.items() if entry[1] < stamp}
        json.dump({"stamp": stamp, "files": kept}, f)
    os.replace(path + ".tmp", path)


def _load_copy_record(container_dir: str) -> dict[str, tuple[int, int]]:
    """The record of `_record_copy`; empty (everything compared in full) for a container made
    before records were kept, or a damaged record."""
    try:
        with open(os.path.join(container_dir, VFS_COPY_RECORD)) as f:
            data = json.load(f)
        return {rel: (int(entry[0]), int(entry[1])) for rel, entry in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return {}


def _same_content(path_a: str, path_b: str) -> bool:
    """Byte for byte (both are regular files of the same size)."""
    fd_a = os.open(path_a, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fd_b = os.open(path_b, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            with open(fd_a, "rb", closefd=False) as a, open(fd_b, "rb", closefd=False) as b:
                while True:
                    chunk = a.read(COMPARE_CHUNK)
                    if chunk != b.read(COMPARE_CHUNK):
                        return False
                    if not chunk:
                        return True
        finally:
            os.close(fd_b)
    finally:
        os.close(fd_a)


# (st_dev, st_ino): one file, whatever the paths to it
_Inode = tuple[int, int]


class _TreeDiff:
    """What changed from `old_root` (the image's full tree; None for none) to `new_root` (the
    container's), as the Changes a layer needs to turn the one into the other: type, mode,
    owner, device, link target, size, mtime, xattrs and content — and which paths are hard
    links of one file, since a layer re-links only the paths it carries."""

    def __init__(
        self, old_root: Optional[str], new_root: str, copied: dict[str, tuple[int, int]]
    ) -> None:
        self.old_root = old_root
        self.new_root = new_root
        self.copied = copied
        self.found: list[Change] = []
        self.emitted: set[str] = set()
        # hard links (regular files with st_nlink > 1), by inode: every one in the new tree,
        # and in the old tree those whose path is in both trees
        self.new_links: dict[_Inode, list[str]] = {}
        self.old_links: dict[_Inode, list[str]] = {}
        self.new_inode: dict[str, _Inode] = {}
        self.old_inode: dict[str, _Inode] = {}
        self.linked: list[str] = []  # paths in both trees that are hard links on either side

    def changes(self) -> list[Change]:
        self._walk(self.old_root is not None, "")
        self._relink()
        return sorted(self.found, key=lambda change: change.path.split("/"))

    def _emit(self, rel: str, kind: str, opaque: bool = False) -> None:
        self.found.append(Change(rel, kind, opaque=opaque))
        self.emitted.add(rel)

    def _walk(self, in_old: bool, rel: str) -> None:
        new_dir = os.path.join(self.new_root, rel) if rel else self.new_root
        new_names = set(os.listdir(new_dir))
        old_names: set[str] = set()
        old_dir = ""
        if in_old and self.old_root is not None:
            old_dir = os.path.join(self.old_root, rel) if rel else self.old_root
            if os.path.isdir(old_dir) and not os.path.islink(old_dir):
                old_names = set(os.listdir(old_dir))
        for name in sorted(new_names | old_names):
            child = f"{rel}/{name}" if rel else name
            if name not in new_names:
                self._emit(child, "D")
                continue
            new_path = os.path.join(new_dir, name)
            new_st = os.lstat(new_path)
            if stat.S_ISREG(new_st.st_mode) and new_st.st_nlink > 1:
                inode = (new_st.st_dev, new_st.st_ino)
                self.new_links.setdefault(inode, []).append(child)
                self.new_inode[child] = inode
            if name not in old_names:
                self._emit(child, "A")
                if stat.S_ISDIR(new_st.st_mode):
                    self._walk(False, child)
                continue
            old_path = os.path.join(old_dir, name)
            old_st = os.lstat(old_path)
            if stat.S_ISREG(old_st.st_mode) and old_st.st_nlink > 1:
                inode = (old_st.st_dev, old_st.st_ino)
                self.old_links.setdefault(inode, []).append(child)
                self.old_inode[child] = inode
            if child in self.new_inode or child in self.old_inode:
                self.linked.append(child)
            same = self._same(child, old_st, new_st, old_path, new_path)
            if stat.S_ISDIR(new_st.st_mode) and stat.S_ISDIR(old_st.st_mode):
                if not same:
                    self._emit(child, "C")
                self._walk(True, child)
            elif not same:
                if stat.S_ISDIR(new_st.st_mode):
                    # a file became a directory: the new one hides whatever was below
                    self._emit(child, "C", opaque=True)
                    self._walk(False, child)
                else:
                    self._emit(child, "C")

    def _same(
        self, rel: str, old: os.stat_result, new: os.stat_result, old_path: str, new_path: str
    ) -> bool:
        if (old.st_mode, old.st_uid, old.st_gid) != (new.st_mode, new.st_uid, new.st_gid):
            return False
        if stat.S_ISCHR(new.st_mode) or stat.S_ISBLK(new.st_mode):
            if old.st_rdev != new.st_rdev:
                return False
        elif stat.S_ISLNK(new.st_mode):
            if os.readlink(old_path) != os.readlink(new_path):
                return False
        elif stat.S_ISREG(new.st_mode):
            if (old.st_size, old.st_mtime_ns) != (new.st_size, new.st_mtime_ns):
                return False
        if self.copied.get(rel) == (new.st_ino, new.st_ctime_ns):
            return True  # untouched since the copy from the image: xattrs and content too
        if image_xattrs(old_path) != image_xattrs(new_path):
            return False
        return not stat.S_ISREG(new.st_mode) or _same_content(old_path, new_path)

    def _relink(self) -> None:
        """Carry every hard-link group the image's paths would not reproduce. A path left out
        of the layer keeps the image's links to the other left-out paths; so a group of the
        container is carried whole (its paths linked again by the tar) unless it is exactly
        what the image links, and until no group changes (carrying one can break another)."""
        changed = True
        while changed:
            changed = False
            for rel in self.linked:
                if rel in self.emitted:
                    continue
                new_inode = self.new_inode.get(rel)
                group = set(self.new_links[new_inode]) if new_inode else {rel}
                old_inode = self.old_inode.get(rel)
                was = set(self.old_links[old_inode]) if old_inode else {rel}
                if group & self.emitted or group != was - self.emitted:
                    for member in sorted(group - self.emitted):
                        self._emit(member, "C")
                    changed = True


DRIVERS: dict[str, Any] = {"overlay": OverlayDriver, "vfs": VfsDriver}


def detect_driver(requested: str | None = None) -> GraphDriver:
    """The configured driver, or overlay when the kernel has it and we can mount, else vfs."""
    if requested:
        if requested not in DRIVERS:
            raise LayerError(f"unknown graph driver {requested!r}; valid: overlay, vfs")
        driver_cls = DRIVERS[requested]
        if not driver_cls.supported():
            raise LayerError(f"the {requested} driver is not supported on this host")
        return driver_cls()  # type: ignore[no-any-return]
    if OverlayDriver.supported() and os.geteuid() == 0:
        return OverlayDriver()
    return VfsDriver()


def remove_tree(path: str) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path)
