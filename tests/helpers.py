"""Small helpers shared by the test tiers."""

from __future__ import annotations

import subprocess
from pathlib import Path


def docker_import(src: Path, ref: str) -> str:
    """Make a local docker image of a directory's tree (no registry needed); returns `ref`."""
    tar = subprocess.Popen(["tar", "-C", str(src), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(
        ["docker", "import", "-", ref], stdin=tar.stdout, check=True, capture_output=True
    )
    if tar.wait() != 0:
        raise RuntimeError(f"tar of {src} failed")
    return ref
