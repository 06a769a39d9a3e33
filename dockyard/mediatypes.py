"""Media types of the OCI image and distribution specs and of Docker's schema 2, shared by the
layer store, the registry client and the registry, so each is spelled in one place."""

from __future__ import annotations

# OCI image manifest (one platform's config and layers).
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
# OCI image index (a manifest of manifests: multi-platform images, referrers answers).
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# OCI image configuration blob.
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
# OCI layers: plain tar, gzip- and zstd-compressed tar.
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
# Docker schema 2 manifest and manifest list (distribution's names).
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
# Docker image configuration blob and gzip-compressed layer.
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
# Manifests of one image, and manifests listing others.
IMAGE_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
# Every manifest media type the registry accepts and the client asks for.
MANIFEST_TYPES = IMAGE_TYPES + INDEX_TYPES
# Layers that live elsewhere (Windows base layers) and need not be in a registry.
FOREIGN_LAYERS = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)
# Content type of blobs, which the registry serves as opaque bytes.
OCTET_STREAM = "application/octet-stream"
