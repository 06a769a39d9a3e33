"""The registry's on-disk layout, written once, identical to CNCF distribution's so that either
registry serves a root directory the other wrote. Only `path_for` formats paths, and only from
validated names, digests, tags and upload ids.

Layout below the storage root (``storage.filesystem.rootdirectory``)::

    docker/registry/v2/
      blobs/<algorithm>/<first two hex chars>/<hex>/data          blob content (global)
      repositories/<name>/
        _layers/<algorithm>/<hex>/link                            blob linked into the repo
        _manifests/revisions/<algorithm>/<hex>/link               manifest revision
        _manifests/tags/<tag>/current/link                        digest the tag points to
        _manifests/tags/<tag>/index/<algorithm>/<hex>/link        every digest the tag had
        _uploads/<id>/data                                        upload in progress
        _uploads/<id>/startedat                                   RFC 3339 start time
        _uploads/<id>/hashstates/<algorithm>/<offset>             (distribution's; unused here)
        _referrers/<algorithm>/<subject hex>/<algorithm>/<hex>/link
                                                                  dockyard's referrers index;
                                                                  distribution ignores it

A link file holds the digest it points to, as text (``sha256:<hex>``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from dockyard.registry.errors import DigestInvalid, NameInvalid, TagInvalid

ROOT_PREFIX = "docker/registry/v2"

# OCI distribution spec: path components separated by "/", each lowercase alphanumerics with
# separators; 255 characters at most in all (distribution's limit).
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
NAME_MAX = 255
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
# Algorithms the registry accepts, with the hex length of their digests.
ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}
DIGEST_RE = re.compile(r"^(sha256|sha512):([a-f0-9]+)$")
UPLOAD_ID_RE = re.compile(r"^[A-Za-z0-9-]{16,64}$")


@dataclass(frozen=True)
class Digest:
    """A validated content digest."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def parse_digest(value: str) -> Digest:
    match = DIGEST_RE.match(value or "")
    if not match or len(match.group(2)) != ALGORITHMS[match.group(1)]:
        raise DigestInvalid(
            {"digest": value[:200] if value else value},
            message=f"invalid digest {value[:80]!r}: expected sha256:<64 hex> or sha512:<128 hex>",
        )
    return Digest(match.group(1), match.group(2))


def validate_name(name: str) -> str:
    if len(name) > NAME_MAX or not NAME_RE.match(name):
        raise NameInvalid({"name": name[:300]}, message=f"invalid repository name {name[:80]!r}")
    return name


def validate_tag(tag: str) -> str:
    if not TAG_RE.match(tag):
        raise TagInvalid({"tag": tag[:200]}, message=f"invalid tag {tag[:80]!r}")
    return tag


def validate_upload_id(upload_id: str) -> str:
    if not UPLOAD_ID_RE.match(upload_id):
        from dockyard.registry.errors import BlobUploadUnknown

        raise BlobUploadUnknown({"upload": upload_id[:100]})
    return upload_id


# Path specs: one small dataclass per kind of path in the layout above.
@dataclass(frozen=True)
class BlobData:
    digest: Digest


@dataclass(frozen=True)
class BlobsRoot:
    pass


@dataclass(frozen=True)
class RepositoriesRoot:
    pass


@dataclass(frozen=True)
class RepoRoot:
    name: str


@dataclass(frozen=True)
class LayerLink:
    name: str
    digest: Digest


@dataclass(frozen=True)
class LayersRoot:
    name: str


@dataclass(frozen=True)
class RevisionLink:
    name: str
    digest: Digest


@dataclass(frozen=True)
class RevisionsRoot:
    name: str


@dataclass(frozen=True)
class TagsRoot:
    name: str


@dataclass(frozen=True)
class TagRoot:
    name: str
    tag: str


@dataclass(frozen=True)
class TagCurrentLink:
    name: str
    tag: str


@dataclass(frozen=True)
class TagIndexLink:
    name: str
    tag: str
    digest: Digest


@dataclass(frozen=True)
class UploadsRoot:
    name: str


@dataclass(frozen=True)
class UploadData:
    name: str
    upload_id: str


@dataclass(frozen=True)
class UploadStartedAt:
    name: str
    upload_id: str


@dataclass(frozen=True)
class UploadRoot:
    name: str
    upload_id: str


@dataclass(frozen=True)
class ReferrersRoot:
    name: str
    subject: Digest


@dataclass(frozen=True)
class ReferrerLink:
    name: str
    subject: Digest
    digest: Digest


PathSpec = Union[
    BlobData,
    BlobsRoot,
    RepositoriesRoot,
    RepoRoot,
    LayerLink,
    LayersRoot,
    RevisionLink,
    RevisionsRoot,
    TagsRoot,
    TagRoot,
    TagCurrentLink,
    TagIndexLink,
    UploadsRoot,
    UploadData,
    UploadStartedAt,
    UploadRoot,
    ReferrersRoot,
    ReferrerLink,
]


def _repo(name: str) -> str:
    return f"{ROOT_PREFIX}/repositories/{validate_name(name)}"


def _tag(name: str, tag: str) -> str:
    return f"{_repo(name)}/_manifests/tags/{validate_tag(tag)}"


def path_for(spec: PathSpec) -> str:  # noqa: C901 - one branch per layout entry, on purpose
    """The storage-relative path of `spec`; the only place paths are formatted."""
    if isinstance(spec, BlobData):
        d = spec.digest
        return f"{ROOT_PREFIX}/blobs/{d.algorithm}/{d.hex[:2]}/{d.hex}/data"
    if isinstance(spec, BlobsRoot):
        return f"{ROOT_PREFIX}/blobs"
    if isinstance(spec, RepositoriesRoot):
        return f"{ROOT_PREFIX}/repositories"
    if isinstance(spec, RepoRoot):
        return _repo(spec.name)
    if isinstance(spec, LayerLink):
        return f"{_repo(spec.name)}/_layers/{spec.digest.algorithm}/{spec.digest.hex}/link"
    if isinstance(spec, LayersRoot):
        return f"{_repo(spec.name)}/_layers"
    if isinstance(spec, RevisionLink):
        d = spec.digest
        return f"{_repo(spec.name)}/_manifests/revisions/{d.algorithm}/{d.hex}/link"
    if isinstance(spec, RevisionsRoot):
        return f"{_repo(spec.name)}/_manifests/revisions"
    if isinstance(spec, TagsRoot):
        return f"{_repo(spec.name)}/_manifests/tags"
    if isinstance(spec, TagRoot):
        return _tag(spec.name, spec.tag)
    if isinstance(spec, TagCurrentLink):
        return f"{_tag(spec.name, spec.tag)}/current/link"
    if isinstance(spec, TagIndexLink):
        d = spec.digest
        return f"{_tag(spec.name, spec.tag)}/index/{d.algorithm}/{d.hex}/link"
    if isinstance(spec, UploadsRoot):
        return f"{_repo(spec.name)}/_uploads"
    if isinstance(spec, UploadRoot):
        return f"{_repo(spec.name)}/_uploads/{validate_upload_id(spec.upload_id)}"
    if isinstance(spec, UploadData):
        return f"{_repo(spec.name)}/_uploads/{validate_upload_id(spec.upload_id)}/data"
    if isinstance(spec, UploadStartedAt):
        return f"{_repo(spec.name)}/_uploads/{validate_upload_id(spec.upload_id)}/startedat"
    if isinstance(spec, ReferrersRoot):
        s = spec.subject
        return f"{_repo(spec.name)}/_referrers/{s.algorithm}/{s.hex}"
    if isinstance(spec, ReferrerLink):
        s, d = spec.subject, spec.digest
        return f"{_repo(spec.name)}/_referrers/{s.algorithm}/{s.hex}/{d.algorithm}/{d.hex}/link"
    raise TypeError(f"unknown path spec {spec!r}")
