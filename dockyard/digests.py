"""Content digests shared by the layer store, the registry client and the registry: the sha256
of a whole stream, read in bounded steps."""

from __future__ import annotations

import hashlib
from typing import IO

# Bytes read per step when hashing a stream.
HASH_CHUNK = 1024 * 1024


def file_sha256(f: IO[bytes]) -> str:
    """The hex sha256 of what is left to read in `f`, read HASH_CHUNK bytes at a time."""
    hasher = hashlib.sha256()
    for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
        hasher.update(chunk)
    return hasher.hexdigest()
