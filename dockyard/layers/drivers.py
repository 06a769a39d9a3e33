"""Graph drivers: how layers and containers sit on disk. One interface (`GraphDriver`), two
drivers — `overlay` (kernel overlayfs: each layer keeps only its diff, a container is an upper
and work dir over the stacked lower layers, so creating one costs the same at any image size) and
`vfs` (copies: each layer is a full root, a container a copy of its image; works everywhere).
Both report a container's changes the same way, which commit turns into a layer."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol

from dockyard.layers.tarsafe import OVERLAY_OPAQUE_XATTRS, ApplyResult, LayerError, apply_layer


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


class OverlayDriver:
    """Kernel overlayfs. Layer dirs hold `diff/`; a container `upper/`, `work/`, `merged/`."""

    name = "overlay"

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
        for sub in ("upper", "work", "merged"):
            os.makedirs(os.path.join(container_dir, sub), exist_ok=True)

    def rootfs(self, container_dir: str) -> str:
        return os.path.join(container_dir, "merged")

    def changed_root(self, container_dir: str) -> str:
        return os.path.join(container_dir, "upper")

    def is_mounted(self, container_dir: str) -> bool:
        return _is_mountpoint(self.rootfs(container_dir))

    def mount(self, container_dir: str, layer_dirs: list[str]) -> str:
        merged = self.rootfs(container_dir)
        if self.is_mounted(container_dir):
            return merged
        lowers = [os.path.join(d, "diff") for d in reversed(layer_dirs)]
        if not lowers:
            empty = os.path.join(container_dir, "empty-lower")
            os.makedirs(empty, exist_ok=True)
            lowers = [empty]
        options = (
            f"lowerdir={':'.join(lowers)},upperdir={os.path.join(container_dir, 'upper')},"
            f"workdir={os.path.join(container_dir, 'work')}"
        )
        proc = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, merged],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise LayerError(f"overlay mount failed: {proc.stderr.strip()} (try --driver vfs)")
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


def _same(a: os.stat_result, b: os.stat_result, path_a: str, path_b: str) -> bool:
    if (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid):
        return False
    if stat.S_ISDIR(a.st_mode):
        return True
    if stat.S_ISLNK(a.st_mode):
        return os.readlink(path_a) == os.readlink(path_b)
    if stat.S_ISCHR(a.st_mode) or stat.S_ISBLK(a.st_mode):
        return a.st_rdev == b.st_rdev
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


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
        yield from _tree_changes(old, new, "")


def _tree_changes(old_root: str | None, new_root: str, rel: str) -> Iterator[Change]:
    new_dir = os.path.join(new_root, rel) if rel else new_root
    old_dir = (os.path.join(old_root, rel) if rel else old_root) if old_root else None
    new_names = set(os.listdir(new_dir))
    old_names = (
        set(os.listdir(old_dir))
        if old_dir and os.path.isdir(old_dir) and not os.path.islink(old_dir)
        else set()
    )
    for name in sorted(new_names | old_names):
        child = f"{rel}/{name}" if rel else name
        new_path = os.path.join(new_dir, name)
        if name not in new_names:
            yield Change(child, "D")
            continue
        new_st = os.lstat(new_path)
        if name not in old_names:
            yield Change(child, "A")
            if stat.S_ISDIR(new_st.st_mode):
                yield from _tree_changes(None, new_root, child)
            continue
        assert old_dir is not None and old_root is not None
        old_path = os.path.join(old_dir, name)
        old_st = os.lstat(old_path)
        if stat.S_ISDIR(new_st.st_mode) and stat.S_ISDIR(old_st.st_mode):
            if not _same(old_st, new_st, old_path, new_path):
                yield Change(child, "C")
            yield from _tree_changes(old_root, new_root, child)
        elif not _same(old_st, new_st, old_path, new_path):
            if stat.S_ISDIR(new_st.st_mode):
                # a file became a directory: the new one hides whatever was below
                yield Change(child, "C", opaque=True)
                yield from _tree_changes(None, new_root, child)
            else:
                yield Change(child, "C")


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
