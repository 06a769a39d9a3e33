"""Turn a container's changes into an OCI layer tar: added and changed paths as entries (links,
hard links, devices, owners, modes, times and xattrs kept), deleted paths as `.wh.<name>`
whiteouts, and hidden directories with an opaque `.wh..wh..opq` marker."""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
from collections.abc import Iterable
from typing import IO

from dockyard.layers.drivers import Change, image_xattrs
from dockyard.layers.tarsafe import OPAQUE, WHITEOUT_PREFIX


def _xattrs(path: str) -> dict[str, str]:
    """The pax headers of the xattrs `path` carries into the layer (the image's, not overlay's)."""
    return {
        f"SCHILY.xattr.{name}": value.decode("utf-8", "surrogateescape")
        for name, value in image_xattrs(path).items()
    }


def write_layer(changes: Iterable[Change], root: str, out: IO[bytes]) -> int:
    """Write the layer tar for `changes` (paths relative to `root`) to `out`; entry count."""
    count = 0
    with tarfile.open(
        fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=1024 * 1024
    ) as tar:
        for change in changes:
            parent, name = posixpath.split(change.path)
            if change.kind == "D":
                info = tarfile.TarInfo(posixpath.join(parent, WHITEOUT_PREFIX + name))
                info.mode = 0o644
                tar.addfile(info)
                count += 1
                continue
            full = os.path.join(root, change.path)
            st = os.lstat(full)
            info = tar.gettarinfo(full, arcname=change.path)
            info.uname = info.gname = ""
            info.pax_headers = _xattrs(full)
            if stat.S_ISREG(st.st_mode) and info.type == tarfile.REGTYPE:
                with open(full, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
            count += 1
            if change.opaque:
                marker = tarfile.TarInfo(posixpath.join(change.path, OPAQUE))
                marker.mode = 0o644
                tar.addfile(marker)
                count += 1
    return count
