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
      .gc.lock                                                    shared by manifest writers,
                                                                  exclusive for a GC sweep
      .gc.stats                                                   dockyard's GC totals (JSON:
                                                                  runs, blobs swept), for the
                                                                  metrics; distribution ignores it

A link file holds the digest it points to, as text (``sha256:<hex>``). A blob or link is removed
with its directory (``BlobDir``, ``LayerDir``, ``RevisionDir``, ``ReferrerDir``), and
`digest_from_path` is the inverse of `path_for` for every path that names a digest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Union

from dockyard.registry.errors import BlobUploadUnknown, DigestInvalid, NameInvalid, TagInvalid

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
        raise BlobUploadUnknown({"upload": upload_id[:100]})
    return upload_id


# Path specs: one small dataclass per kind of path in the layout above.
@dataclass(frozen=True)
class BlobData:
    digest: Digest


@dataclass(frozen=True)
class BlobDir:
    digest: Digest


@dataclass(frozen=True)
class BlobsRoot:
    pass


@dataclass(frozen=True)
class GCLock:
    pass


@dataclass(frozen=True)
class GCStats:
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
class LayerDir:
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
class RevisionDir:
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


@dataclass(frozen=True)
class ReferrerDir:
    name: str
    subject: Digest
    digest: Digest


PathSpec = Union[
    BlobData,
    BlobDir,
    BlobsRoot,
    GCLock,
    GCStats,
    RepositoriesRoot,
    RepoRoot,
    LayerLink,
    LayerDir,
    LayersRoot,
    RevisionLink,
    RevisionDir,
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
    ReferrerDir,
]


def _repo(name: str) -> str:
    return f"{ROOT_PREFIX}/repositories/{validate_name(name)}"


def _tag(name: str, tag: str) -> str:
    return f"{_repo(name)}/_manifests/tags/{validate_tag(tag)}"


def _blob_dir(d: Digest) -> str:
    return f"{ROOT_PREFIX}/blobs/{d.algorithm}/{d.hex[:2]}/{d.hex}"


def _upload(name: str, upload_id: str) -> str:
    return f"{_repo(name)}/_uploads/{validate_upload_id(upload_id)}"


def _referrer(name: str, subject: Digest, d: Digest) -> str:
    return f"{_repo(name)}/_referrers/{subject.algorithm}/{subject.hex}/{d.algorithm}/{d.hex}"


# How each kind of path is formatted: the only place paths are made.
_FORMATS: dict[type, Callable[[Any], str]] = {
    BlobData: lambda s: f"{_blob_dir(s.digest)}/data",
    BlobDir: lambda s: _blob_dir(s.digest),
    BlobsRoot: lambda s: f"{ROOT_PREFIX}/blobs",
    GCLock: lambda s: f"{ROOT_PREFIX}/.gc.lock",
    GCStats: lambda s: f"{ROOT_PREFIX}/.gc.stats",
    RepositoriesRoot: lambda s: f"{ROOT_PREFIX}/repositories",
    RepoRoot: lambda s: _repo(s.name),
    LayerLink: lambda s: f"{path_for(LayerDir(s.name, s.digest))}/link",
    LayerDir: lambda s: f"{_repo(s.name)}/_layers/{s.digest.algorithm}/{s.digest.hex}",
    LayersRoot: lambda s: f"{_repo(s.name)}/_layers",
    RevisionLink: lambda s: f"{path_for(RevisionDir(s.name, s.digest))}/link",
    RevisionDir: lambda s: (
        f"{_repo(s.name)}/_manifests/revisions/{s.digest.algorithm}/{s.digest.hex}"
    ),
    RevisionsRoot: lambda s: f"{_repo(s.name)}/_manifests/revisions",
    TagsRoot: lambda s: f"{_repo(s.name)}/_manifests/tags",
    TagRoot: lambda s: _tag(s.name, s.tag),
    TagCurrentLink: lambda s: f"{_tag(s.name, s.tag)}/current/link",
    TagIndexLink: lambda s: f"{_tag(s.name, s.tag)}/index/{s.digest.algorithm}/{s.digest.hex}/link",
    UploadsRoot: lambda s: f"{_repo(s.name)}/_uploads",
    UploadRoot: lambda s: _upload(s.name, s.upload_id),
    UploadData: lambda s: f"{_upload(s.name, s.upload_id)}/data",
    UploadStartedAt: lambda s: f"{_upload(s.name, s.upload_id)}/startedat",
    ReferrersRoot: lambda s: f"{_repo(s.name)}/_referrers/{s.subject.algorithm}/{s.subject.hex}",
    ReferrerLink: lambda s: f"{_referrer(s.name, s.subject, s.digest)}/link",
    ReferrerDir: lambda s: _referrer(s.name, s.subject, s.digest),
}


def path_for(spec: PathSpec) -> str:
    """The storage-relative path of `spec`; the only place paths are formatted."""
    try:
        fmt = _FORMATS[type(spec)]
    except KeyError:
        raise TypeError(f"unknown path spec {spec!r}") from None
    return fmt(spec)


# The digest a path names: a blob's directory or data file (algorithm/xx/hex), or the directory
# or link of a layer, revision, tag index entry or referrer (algorithm/hex, last in the path).
_BLOB_PATH = re.compile(
    rf"^{re.escape(ROOT_PREFIX)}/blobs/([a-z0-9]+)/([a-f0-9]{{2}})/([a-f0-9]+)(?:/data)?$"
)
_LINK_PATH = re.compile(
    rf"^{re.escape(ROOT_PREFIX)}/repositories/.+/(?:_layers|_manifests/revisions|"
    r"_manifests/tags/[^/]+/index|_referrers/[a-z0-9]+/[a-f0-9]+)/([a-z0-9]+)/([a-f0-9]+)(?:/link)?$"
)


def digest_from_path(path: str) -> Digest:
    """The inverse of `path_for` for the paths that name a digest (BlobData, BlobDir, LayerLink,
    LayerDir, RevisionLink, RevisionDir, TagIndexLink, ReferrerLink, ReferrerDir): the digest,
    validated; DigestInvalid for any other path or an invalid digest in it."""
    blob = _BLOB_PATH.match(path)
    if blob is not None:
        digest = parse_digest(f"{blob.group(1)}:{blob.group(3)}")
        if digest.hex[:2] != blob.group(2):
            raise DigestInvalid({"path": path[:300]}, message="blob path of another digest")
        return digest
    link = _LINK_PATH.match(path)
    if link is not None:
        return parse_digest(f"{link.group(1)}:{link.group(2)}")
    raise DigestInvalid({"path": path[:300]}, message="the path names no digest")
