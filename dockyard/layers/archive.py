"""Image archives: export to and import from an OCI image layout (a directory skopeo and other
OCI tools read) and a docker-archive tarball (what `docker save` writes and `docker load`
reads). Every blob read from an archive is verified against its digest before it is kept."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from typing import IO, Any, Optional

from dockyard.layers.store import (
    Image,
    ImageStore,
    LayerRef,
    StoreError,
)
from dockyard.layers.tarsafe import decompressed
from dockyard.mediatypes import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
)

REF_NAME = "org.opencontainers.image.ref.name"
# Bytes per copy step.
CHUNK = 1024 * 1024


def _oci_layer_type(media: str) -> str:
    if media.endswith("tar.gzip") or media.endswith("+gzip"):
        return OCI_LAYER
    if media.endswith("+zstd"):
        return OCI_LAYER_ZSTD
    return OCI_LAYER_TAR


def export_image(store: ImageStore, ref: str, path: str, fmt: str) -> None:
    image = store.resolve(ref)
    if fmt == "oci":
        _export_oci(store, image, ref, path)
    elif fmt == "docker-archive":
        _export_docker(store, image, ref, path)
    else:
        raise StoreError(f"unknown archive format {fmt!r}; valid: oci, docker-archive")


def _export_oci(store: ImageStore, image: Image, ref: str, path: str) -> None:
    blobs = os.path.join(path, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def put(digest: str) -> int:
        target = os.path.join(blobs, digest[7:])
        if not os.path.exists(target):
            shutil.copyfile(store.blob_path(digest), target)
        return os.path.getsize(target)

    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": image.id, "size": put(image.id)},
        "layers": [
            {
                "mediaType": _oci_layer_type(layer.media_type),
                "digest": layer.digest,
                "size": put(layer.digest),
            }
            for layer in image.layers
        ],
    }
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    with open(os.path.join(blobs, digest[7:]), "wb") as out:
        out.write(raw)
    tag = ref.rsplit(":", 1)[-1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    index_path = os.path.join(path, "index.json")
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    index["manifests"] = [
        m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) != tag
    ]
    index["manifests"].append(
        {
            "mediaType": OCI_MANIFEST,
            "digest": digest,
            "size": len(raw),
            "annotations": {REF_NAME: tag},
        }
    )
    with open(index_path, "w") as f:
        json.dump(index, f)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _export_docker(store: ImageStore, image: Image, ref: str, path: str) -> None:
    tags = [t for t in image.tags if "@" not in t] or ([ref] if ":" in ref else [])
    layer_names = []
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, f"{image.id[7:]}.json", store.read_blob(image.id))
        for layer in image.layers:
            name = f"{layer.diff_id[7:]}/layer.tar"
            with open(store.blob_path(layer.digest), "rb") as blob:
                stream, _ = decompressed(blob)  # type: ignore[arg-type]
                tmp = os.path.join(store.root, "tmp", f"export-{layer.diff_id[7:]}.tar")
                with open(tmp, "wb") as out:
                    shutil.copyfileobj(stream, out, CHUNK)
            try:
                tar.add(tmp, arcname=name)
            finally:
                os.unlink(tmp)
            layer_names.append(name)
        manifest = [{"Config": f"{image.id[7:]}.json", "RepoTags": tags, "Layers": layer_names}]
        _add_bytes(tar, "manifest.json", json.dumps(manifest).encode())


def _copy_verified(store: ImageStore, source: IO[bytes], digest: str) -> None:
    if store.has_blob(digest):
        return
    with store.temp_file() as (tmp, out):
        hasher = hashlib.sha256()
        for chunk in iter(lambda: source.read(CHUNK), b""):
            hasher.update(chunk)
            out.write(chunk)
        out.flush()
        if "sha256:" + hasher.hexdigest() != digest:
            raise StoreError(f"archive blob {digest} does not match its content")
        store.adopt_blob(tmp, digest)


def import_image(store: ImageStore, path: str, tag: Optional[str] = None) -> Image:
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "oci-layout")):
        return _import_oci(store, path, tag)
    if os.path.isfile(path) and tarfile.is_tarfile(path):
        return _import_docker(store, path, tag)
    raise StoreError(f"{path} is neither an OCI layout directory nor a docker-archive tarball")


def _apply_all(store: ImageStore, layers: list[tuple[str, str, int, str]]) -> list[LayerRef]:
    refs = []
    parent: Optional[str] = None
    dirs: list[str] = []
    for digest, diff_id, size, media in layers:
        chain, diff, _ = store.apply_blob(parent, digest, diff_id, dirs)
        refs.append(LayerRef(digest, diff, chain, size, media))
        parent = chain
        dirs = dirs + [store.layer_dir(chain)]
    return refs


def _import_oci(store: ImageStore, path: str, tag: Optional[str]) -> Image:
    with open(os.path.join(path, "index.json")) as f:
        index = json.load(f)
    manifests = index.get("manifests", [])
    if not manifests:
        raise StoreError(f"{path}/index.json lists no image")
    entry = manifests[0]

    def blob(digest: str) -> str:
        if not digest.startswith("sha256:") or len(digest) != 71:
            raise StoreError(f"unsupported digest {digest!r} in {path}")
        return os.path.join(path, "blobs", "sha256", digest[7:])

    with open(blob(entry["digest"]), "rb") as fb:
        raw = fb.read()
    if "sha256:" + hashlib.sha256(raw).hexdigest() != entry["digest"]:
        raise StoreError(f"manifest {entry['digest']} in {path} does not match its content")
    manifest = json.loads(raw)
    for desc in [manifest["config"], *manifest.get("layers", [])]:
        with open(blob(desc["digest"]), "rb") as fb:
            _copy_verified(store, fb, desc["digest"])
    config_bytes = store.read_blob(manifest["config"]["digest"])
    diff_ids = json.loads(config_bytes).get("rootfs", {}).get("diff_ids", [])
    layers = [
        (d["digest"], diff, int(d["size"]), d["mediaType"])
        for d, diff in zip(manifest.get("layers", []), diff_ids)
    ]
    refs = _apply_all(store, layers)
    media = manifest.get("mediaType") or OCI_MANIFEST
    return store.register(config_bytes, refs, media, tag)


def _import_docker(store: ImageStore, path: str, tag: Optional[str]) -> Image:
    with tarfile.open(path) as tar:

        def member(name: str) -> IO[bytes]:
            if name.startswith("/") or ".." in name.split("/"):
                raise StoreError(f"unsafe member name {name!r} in {path}")
            handle = tar.extractfile(name)
            if handle is None:
                raise StoreError(f"{path} has no file {name!r}")
            return handle

        manifest = json.load(member("manifest.json"))[0]
        config_bytes = member(manifest["Config"]).read()
        store.put_blob(config_bytes)
        diff_ids = json.loads(config_bytes).get("rootfs", {}).get("diff_ids", [])
        layers = []
        for name, diff_id in zip(manifest["Layers"], diff_ids):
            # docker-archive layers are plain tars: their digest is the diff ID
            with store.temp_file() as (tmp, out):
                stream, _ = decompressed(member(name))  # type: ignore[arg-type]
                hasher = hashlib.sha256()
                while chunk := stream.read(CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                out.flush()
                digest = "sha256:" + hasher.hexdigest()
                if digest != diff_id:
                    raise StoreError(
                        f"layer {name} in {path} has diff ID {digest}, the config says {diff_id}"
                    )
                size = os.path.getsize(tmp)
                store.adopt_blob(tmp, digest)
            layers.append((digest, diff_id, size, OCI_LAYER_TAR))
    refs = _apply_all(store, layers)
    return store.register(
        config_bytes, refs, OCI_MANIFEST, tag or (manifest.get("RepoTags") or [None])[0]
    )
