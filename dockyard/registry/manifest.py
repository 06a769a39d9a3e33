"""Manifests the registry accepts — OCI image manifest and index, Docker schema 2 manifest and
manifest list — validated as untrusted input, with what each references (blobs, child
manifests, subject) for the store's existence checks, referrers and garbage collection."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from dockyard.registry import paths as p
from dockyard.registry.errors import DigestInvalid, ManifestInvalid

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = IMAGE_TYPES + INDEX_TYPES
# Layers that live elsewhere (Windows base layers) and need not be in the registry.
FOREIGN_LAYERS = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)


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


def _descriptor(value: Any, where: str) -> tuple[p.Digest, dict[str, Any]]:
    if not isinstance(value, dict):
        raise _invalid(f"{where} is not a descriptor object")
    media = value.get("mediaType")
    if not isinstance(media, str) or not media:
        raise _invalid(f"{where}.mediaType is missing")
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _invalid(f"{where}.size must be a non-negative integer")
    try:
        digest = p.parse_digest(str(value.get("digest", "")))
    except DigestInvalid as exc:
        raise _invalid(f"{where}.digest is not a valid digest") from exc
    return digest, value


def parse_manifest(raw: bytes, content_type: Optional[str]) -> Manifest:
    """Validate `raw` as a manifest of `content_type` (or of its own mediaType field)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid("body is not JSON") from exc
    if not isinstance(doc, dict):
        raise _invalid("top level is not a JSON object")
    if doc.get("schemaVersion") != 2:
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
        subject, _ = _descriptor(doc["subject"], "subject")
    artifact = doc.get("artifactType")
    if artifact is not None and not isinstance(artifact, str):
        raise _invalid("artifactType must be a string")

    if media in IMAGE_TYPES:
        if "manifests" in doc:
            raise _invalid("an image manifest has no manifests list")
        config, _ = _descriptor(doc.get("config"), "config")
        layers = doc.get("layers", [] if media == OCI_MANIFEST else None)
        if not isinstance(layers, list):
            raise _invalid("layers must be a list")
        blobs = [config]
        for i, item in enumerate(layers):
            digest, desc = _descriptor(item, f"layers[{i}]")
            if desc["mediaType"] in FOREIGN_LAYERS and desc.get("urls"):
                continue
            blobs.append(digest)
        return Manifest(media, blobs=blobs, subject=subject, artifact_type=artifact)

    children = doc.get("manifests")
    if not isinstance(children, list):
        raise _invalid("manifests must be a list")
    if "layers" in doc or "config" in doc:
        raise _invalid("an index has no config or layers")
    manifests = [_descriptor(item, f"manifests[{i}]")[0] for i, item in enumerate(children)]
    return Manifest(media, manifests=manifests, subject=subject, artifact_type=artifact)
