"""Manifests the registry accepts — OCI image manifest and index, Docker schema 2 manifest and
manifest list — validated as untrusted input, with what each references (blobs, child
manifests, subject) for the store's existence checks, referrers and garbage collection."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from dockyard.mediatypes import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    FOREIGN_LAYERS,
    IMAGE_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
)
from dockyard.registry import paths as p
from dockyard.registry.errors import DigestInvalid, ManifestInvalid

# Largest descriptor size a pushed manifest may give: sizes are int64 (OCI image spec).
SIZE_MAX = 2**63 - 1
# Deepest nesting of objects and arrays in a pushed manifest (real ones use four or five levels).
DEPTH_MAX = 64


@dataclass(frozen=True)
class Manifest:
    """What a manifest references."""

    media_type: str
    blobs: list[p.Digest] = field(default_factory=list)
    manifests: list[p.Digest] = field(default_factory=list)
    subject: Optional[p.Digest] = None
    artifact_type: Optional[str] = None


def _invalid(reason: str) -> ManifestInvalid:
    return ManifestInvalid({"reason": reason}, message=f"manifest invalid: {reason}")


def _descriptor(value: Any, where: str, strict: bool) -> tuple[p.Digest, dict[str, Any]]:
    if not isinstance(value, dict):
        raise _invalid(f"{where} is not a descriptor object")
    media = value.get("mediaType")
    if not isinstance(media, str) or not media:
        raise _invalid(f"{where}.mediaType is missing")
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _invalid(f"{where}.size must be a non-negative integer")
    if strict and size > SIZE_MAX:
        raise _invalid(f"{where}.size is beyond int64")
    try:
        digest = p.parse_digest(str(value.get("digest", "")))
    except DigestInvalid as exc:
        raise _invalid(f"{where}.digest is not a valid digest") from exc
    return digest, value


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _too_deep(doc: Any) -> bool:
    """Whether objects and arrays in `doc` nest deeper than DEPTH_MAX (walked without recursion,
    so no depth can overflow the stack)."""
    pending: list[tuple[Any, int]] = [(doc, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > DEPTH_MAX:
            return True
        children = value.values() if isinstance(value, dict) else value
        pending.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _load(raw: bytes, strict: bool) -> Any:
    """The JSON document in `raw`. Strict (a manifest being pushed): UTF-8 only, without a byte
    order mark (json.loads of bytes would also take UTF-16 and UTF-32), no NaN or Infinity, and
    nested at most DEPTH_MAX deep (deeper than the parser's recursion limit included)."""
    if not strict:
        try:
            return json.loads(raw)
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise _invalid("body is not JSON") from exc
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_not_json)
    except RecursionError as exc:
        raise _invalid(f"body is nested deeper than {DEPTH_MAX} levels") from exc
    except ValueError as exc:
        raise _invalid("body is not JSON in UTF-8") from exc
    if isinstance(doc, (dict, list)) and _too_deep(doc):
        raise _invalid(f"body is nested deeper than {DEPTH_MAX} levels")
    return doc


def parse_manifest(raw: bytes, content_type: Optional[str], strict: bool = False) -> Manifest:
    """Validate `raw` as a manifest of `content_type` (or of its own mediaType field). `strict`
    for a manifest being pushed: UTF-8 JSON only, sizes within int64, an integer schemaVersion.
    Stored manifests are read without those rules: older versions accepted some that break them,
    and garbage collection must still see what those reference."""
    doc = _load(raw, strict)
    if not isinstance(doc, dict):
        raise _invalid("top level is not a JSON object")
    version = doc.get("schemaVersion")
    if version != 2 or (strict and type(version) is not int):
        raise _invalid("schemaVersion must be 2 (schema 1 is not accepted)")
    declared = doc.get("mediaType")
    ctype = (content_type or "").split(";")[0].strip()
    if ctype not in MANIFEST_TYPES:
        ctype = ""
    if declared is not None and not isinstance(declared, str):
        raise _invalid("mediaType must be a string")
    if declared and ctype and declared != ctype:
        raise _invalid(f"mediaType {declared} does not match Content-Type {ctype}")
    media = ctype or declared or (OCI_INDEX if "manifests" in doc else OCI_MANIFEST)
    if media not in MANIFEST_TYPES:
        raise _invalid(f"unsupported manifest media type {media!r}")
    if media in (DOCKER_MANIFEST, DOCKER_LIST) and declared != media:
        raise _invalid(f"Docker manifests must carry mediaType {media}")

    subject = None
    if "subject" in doc:
        subject, _ = _descriptor(doc["subject"], "subject", strict)
    artifact = doc.get("artifactType")
    if artifact is not None and not isinstance(artifact, str):
        raise _invalid("artifactType must be a string")

    if media in IMAGE_TYPES:
        if "manifests" in doc:
            raise _invalid("an image manifest has no manifests list")
        config, _ = _descriptor(doc.get("config"), "config", strict)
        layers = doc.get("layers", [] if media == OCI_MANIFEST else None)
        if not isinstance(layers, list):
            raise _invalid("layers must be a list")
        blobs = [config]
        for i, item in enumerate(layers):
            digest, desc = _descriptor(item, f"layers[{i}]", strict)
            if desc["mediaType"] in FOREIGN_LAYERS and desc.get("urls"):
                continue
            blobs.append(digest)
        return Manifest(media, blobs=blobs, subject=subject, artifact_type=artifact)

    children = doc.get("manifests")
    if not isinstance(children, list):
        raise _invalid("manifests must be a list")
    if "layers" in doc or "config" in doc:
        raise _invalid("an index has no config or layers")
    manifests = [_descriptor(item, f"manifests[{i}]", strict)[0] for i, item in enumerate(children)]
    return Manifest(media, manifests=manifests, subject=subject, artifact_type=artifact)
