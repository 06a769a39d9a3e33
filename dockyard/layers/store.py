"""The content-addressable image store: blobs by digest, layers by chain ID (deduplicated by diff
ID), images by config digest with their tags, and containers (a writable layer over an image).
Every write is a temp file or directory in the store, fsynced where it is a file, then renamed.

Layout below the store root (``/var/lib/dockyard`` or ``--root``/``DOCKYARD_ROOT``)::

    blobs/sha256/<hex>                   compressed layers, configs, manifests, as pulled
    layers/<chain hex>/layer.json        diff ID, parent chain ID, blob digest, size, driver
    layers/<chain hex>/diff|root/        the layer's content (overlay keeps a diff, vfs a root)
    images/<config hex>.json             an image: config, manifest, layers, tags, sources
    containers/<name>/container.json     a container: image, driver, created
    containers/<name>/upper|work|merged  (overlay) or rootfs/ (vfs)
    tmp/                                 temp files and directories, renamed into place
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, Optional

from dockyard.fsutil import atomic_write
from dockyard.layers.diff import write_layer
from dockyard.layers.drivers import GraphDriver, detect_driver, remove_tree
from dockyard.layers.tarsafe import HashingReader, LayerError, decompressed

DEFAULT_ROOT = "/var/lib/dockyard"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
# gzip level of committed layers: 1 (fastest) — layers are mostly compressed data already.
COMMIT_GZIP_LEVEL = 1
# Bytes per gzip member when a committed layer is compressed on several cores.
GZIP_BLOCK = 4 * 1024 * 1024
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
_HEX = re.compile(r"^sha256:[a-f0-9]{64}$")


class StoreError(Exception):
    """A store operation that cannot be done; the message says why and what would work."""


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_id(parent: Optional[str], diff_id: str) -> str:
    if parent is None:
        return diff_id
    return sha256_bytes(f"{parent} {diff_id}".encode())


def _hex(digest: str) -> str:
    if not _HEX.match(digest):
        raise StoreError(f"invalid digest {digest!r}: expected sha256:<64 hex>")
    return digest[7:]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LayerRef:
    digest: str  # compressed blob digest
    diff_id: str
    chain_id: str
    size: int
    media_type: str


@dataclass
class Image:
    id: str
    config: dict[str, Any]
    manifest_media_type: str
    layers: list[LayerRef]
    tags: list[str] = field(default_factory=list)
    sources: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "manifest_media_type": self.manifest_media_type,
            "layers": [vars(layer) for layer in self.layers],
            "tags": self.tags,
            "sources": self.sources,
        }


class ImageStore:
    """One store root with one graph driver."""

    def __init__(self, root: Optional[str] = None, driver: Optional[str] = None) -> None:
        self.root = os.path.abspath(root or os.environ.get("DOCKYARD_ROOT") or DEFAULT_ROOT)
        for sub in ("blobs/sha256", "layers", "images", "containers", "tmp"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        recorded = self._read_json("driver.json")
        name = driver or (recorded or {}).get("driver")
        self.driver: GraphDriver = detect_driver(name)
        if recorded and recorded.get("driver") != self.driver.name:
            raise StoreError(
                f"the store at {self.root} uses the {recorded['driver']} driver, not "
                f"{self.driver.name}; use another --root"
            )
        if not recorded:
            self._write_json("driver.json", {"driver": self.driver.name})

    # ---- files -------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _read_json(self, *parts: str) -> Optional[dict[str, Any]]:
        try:
            with open(self._path(*parts)) as f:
                data: dict[str, Any] = json.load(f)
                return data
        except FileNotFoundError:
            return None

    def _write_json(self, rel: str, data: Any) -> None:
        self._write_atomic(rel, json.dumps(data, indent=2, sort_keys=True).encode())

    def _write_atomic(self, rel: str, data: bytes) -> None:
        atomic_write(self._path(rel), data, tmp_dir=self._path("tmp"))

    @contextmanager
    def temp_file(self) -> Iterator[tuple[str, IO[bytes]]]:
        fd, tmp = tempfile.mkstemp(dir=self._path("tmp"))
        f = os.fdopen(fd, "w+b")
        try:
            yield tmp, f
        finally:
            f.close()
            if os.path.exists(tmp):
                os.unlink(tmp)

    # ---- blobs -------------------------------------------------------------------------
    def blob_path(self, digest: str) -> str:
        return self._path("blobs", "sha256", _hex(digest))

    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def adopt_blob(self, tmp: str, digest: str) -> None:
        """Move a verified temp file into place (once: an existing blob is kept)."""
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if self.has_blob(digest):
            os.unlink(tmp)
            return
        os.replace(tmp, self.blob_path(digest))

    def put_blob(self, data: bytes) -> str:
        digest = sha256_bytes(data)
        if not self.has_blob(digest):
            self._write_atomic(os.path.join("blobs", "sha256", _hex(digest)), data)
        return digest

    def read_blob(self, digest: str) -> bytes:
        try:
            with open(self.blob_path(digest), "rb") as f:
                return f.read()
        except FileNotFoundError as exc:
            raise StoreError(f"blob {digest} is not in the store") from exc

    # ---- layers ------------------------------------------------------------------------
    def layer_dir(self, chain: str) -> str:
        return self._path("layers", _hex(chain))

    def has_layer(self, chain: str) -> bool:
        return os.path.exists(os.path.join(self.layer_dir(chain), "layer.json"))

    def layer_dirs(self, image: Image) -> list[str]:
        return [self.layer_dir(layer.chain_id) for layer in image.layers]

    def apply_blob(
        self,
        parent_chain: Optional[str],
        digest: str,
        expected_diff_id: Optional[str],
        parent_dirs: list[str],
    ) -> tuple[str, str, int]:
        """Extract a stored layer blob on top of `parent_chain`; returns (chain, diff, size).

        Nothing is half-extracted: the layer goes to a temp directory renamed into place."""
        if expected_diff_id is not None:
            chain = chain_id(parent_chain, expected_diff_id)
            if self.has_layer(chain):
                meta = self._read_json("layers", _hex(chain), "layer.json") or {}
                return chain, expected_diff_id, int(meta.get("size", 0))
        work = self._path("tmp", f"layer-{uuid.uuid4().hex}")
        os.makedirs(work)
        try:
            with open(self.blob_path(digest), "rb") as source:
                result = self.driver.apply(work, parent_dirs, source)
            if result.compressed_digest != digest:
                raise LayerError(f"layer blob {digest} hashes to {result.compressed_digest}")
            if expected_diff_id is not None and result.diff_id != expected_diff_id:
                raise LayerError(
                    f"layer {digest} has diff ID {result.diff_id}, the image config says "
                    f"{expected_diff_id}"
                )
            chain = chain_id(parent_chain, result.diff_id)
            meta = {
                "chain_id": chain,
                "diff_id": result.diff_id,
                "parent": parent_chain,
                "blob": digest,
                "size": result.size,
                "driver": self.driver.name,
                "skipped_devices": result.skipped_devices,
            }
            with open(os.path.join(work, "layer.json"), "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
            if self.has_layer(chain):
                remove_tree(work)
            else:
                if os.path.lexists(self.layer_dir(chain)):
                    remove_tree(self.layer_dir(chain))
                os.replace(work, self.layer_dir(chain))
            return chain, result.diff_id, result.size
        except BaseException:
            remove_tree(work)
            raise

    # ---- images ------------------------------------------------------------------------
    def images(self) -> list[Image]:
        out = []
        for name in sorted(os.listdir(self._path("images"))):
            if name.endswith(".json"):
                image = self.load_image("sha256:" + name[:-5])
                if image is not None:
                    out.append(image)
        return out

    def load_image(self, image_id: str) -> Optional[Image]:
        data = self._read_json("images", _hex(image_id) + ".json")
        if data is None:
            return None
        config = json.loads(self.read_blob(image_id))
        return Image(
            id=image_id,
            config=config,
            manifest_media_type=data["manifest_media_type"],
            layers=[LayerRef(**layer) for layer in data["layers"]],
            tags=list(data.get("tags", [])),
            sources={k: list(v) for k, v in data.get("sources", {}).items()},
        )

    def save_image(self, image: Image) -> None:
        self._write_json(os.path.join("images", _hex(image.id) + ".json"), image.to_json())

    def resolve(self, ref: str) -> Image:
        """An image by tag (as stored), by ID, or by a unique ID prefix."""
        wanted = normalize_ref(ref) if not ref.startswith("sha256:") else ref
        for image in self.images():
            if wanted in image.tags or image.id == wanted:
                return image
        if ref.startswith("sha256:") or re.fullmatch(r"[a-f0-9]{6,64}", ref):
            prefix = ref if ref.startswith("sha256:") else "sha256:" + ref
            hits = [i for i in self.images() if i.id.startswith(prefix)]
            if len(hits) == 1:
                return hits[0]
        raise StoreError(f"no image {ref!r} in {self.root} (see `dockyard image ls`)")

    def tag(self, image: Image, ref: str) -> None:
        ref = normalize_ref(ref)
        for other in self.images():
            if ref in other.tags and other.id != image.id:
                other.tags.remove(ref)
                self.save_image(other)
        if ref not in image.tags:
            image.tags.append(ref)
        self.save_image(image)

    def register(
        self,
        config_bytes: bytes,
        layers: list[LayerRef],
        media_type: str,
        ref: Optional[str],
        source: Optional[str] = None,
    ) -> Image:
        image_id = self.put_blob(config_bytes)
        image: Image = self.load_image(image_id) or Image(
            id=image_id,
            config=json.loads(config_bytes),
            manifest_media_type=media_type,
            layers=layers,
        )
        if source:
            for layer in layers:
                sources = image.sources.setdefault(layer.digest, [])
                if source not in sources:
                    sources.append(source)
        self.save_image(image)
        if ref:
            self.tag(image, ref)
        return image

    def remove_image(self, ref: str) -> list[str]:
        """Untag `ref` (or remove the image by ID); free layers nothing else uses."""
        image = self.resolve(ref)
        if not ref.startswith("sha256:") and normalize_ref(ref) in image.tags:
            image.tags.remove(normalize_ref(ref))
        else:
            image.tags = []
        if image.tags:
            self.save_image(image)
            return []
        users = [c["name"] for c in self.containers() if c["image"] == image.id]
        if users:
            raise StoreError(f"image {ref} is used by container(s) {', '.join(users)}")
        os.unlink(self._path("images", _hex(image.id) + ".json"))
        return self.prune()

    def prune(self) -> list[str]:
        """Remove layers and blobs no image or container uses; returns what went."""
        used_chains: set[str] = set()
        used_blobs: set[str] = set()
        for image in self.images():
            used_blobs.add(image.id)
            for layer in image.layers:
                used_chains.add(layer.chain_id)
                used_blobs.add(layer.digest)
        for container in self.containers():
            base = self.load_image(container["image"])
            if base:
                used_chains.update(layer.chain_id for layer in base.layers)
        removed = []
        for name in os.listdir(self._path("layers")):
            if "sha256:" + name not in used_chains:
                remove_tree(self._path("layers", name))
                removed.append("layer sha256:" + name)
        for name in os.listdir(self._path("blobs", "sha256")):
            if "sha256:" + name not in used_blobs:
                os.unlink(self._path("blobs", "sha256", name))
                removed.append("blob sha256:" + name)
        return removed

    # ---- containers ----------------------------------------------------------------------
    def container_dir(self, name: str) -> str:
        if not _NAME.match(name):
            raise StoreError(
                f"invalid container name {name!r}: letters, digits, '_', '.', '-' (max 128)"
            )
        return self._path("containers", name)

    def containers(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(os.listdir(self._path("containers"))):
            data = self._read_json("containers", name, "container.json")
            if data:
                out.append(data)
        return out

    def container(self, name: str) -> dict[str, Any]:
        data = self._read_json("containers", name, "container.json") if _NAME.match(name) else None
        if data is None:
            raise StoreError(f"no container {name!r} (see `dockyard container ls`)")
        return data

    def create_container(self, ref: str, name: str) -> dict[str, Any]:
        directory = self.container_dir(name)
        if os.path.exists(directory):
            raise StoreError(f"container {name!r} exists already")
        image = self.resolve(ref)
        work = self._path("tmp", f"container-{uuid.uuid4().hex}")
        os.makedirs(work)
        try:
            self.driver.create_container(work, self.layer_dirs(image))
            meta = {
                "name": name,
                "image": image.id,
                "ref": ref,
                "driver": self.driver.name,
                "created": _now(),
            }
            with open(os.path.join(work, "container.json"), "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
            os.replace(work, directory)
        except BaseException:
            remove_tree(work)
            raise
        return meta

    def mount(self, name: str) -> str:
        meta = self.container(name)
        image = self._container_image(meta)
        return self.driver.mount(self.container_dir(name), self.layer_dirs(image))

    def umount(self, name: str) -> None:
        self.container(name)
        self.driver.umount(self.container_dir(name))

    def _container_image(self, meta: dict[str, Any]) -> Image:
        image = self.load_image(meta["image"])
        if image is None:
            raise StoreError(f"the image of container {meta['name']} is gone from the store")
        return image

    def remove_container(self, name: str) -> None:
        self.container(name)
        directory = self.container_dir(name)
        self.driver.umount(directory)
        remove_tree(directory)

    def commit(self, name: str, ref: str, message: str = "", author: str = "") -> Image:
        """The container's changes as one new layer over its image, tagged `ref`."""
        meta = self.container(name)
        base = self._container_image(meta)
        directory = self.container_dir(name)
        changes = list(self.driver.changes(directory, self.layer_dirs(base)))
        changed_root = self.driver.changed_root(directory)
        with self.temp_file() as (tar_path, tar_file):
            write_layer(changes, changed_root, tar_file)
            tar_file.flush()
            tar_file.seek(0)
            plain = HashingReader(tar_file)  # type: ignore[arg-type]
            with self.temp_file() as (gz_path, gz_file):
                digest = "sha256:" + gzip_parallel(plain, gz_file)
                gz_file.flush()
                size = os.path.getsize(gz_path)
                self.adopt_blob(gz_path, digest)
            diff_id = plain.digest
        parent_chain = base.layers[-1].chain_id if base.layers else None
        chain, _, _ = self.apply_blob(parent_chain, digest, diff_id, self.layer_dirs(base))
        docker = base.manifest_media_type == DOCKER_MANIFEST
        new_layer = LayerRef(digest, diff_id, chain, size, DOCKER_LAYER if docker else OCI_LAYER)
        config = json.loads(json.dumps(base.config))
        config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
        config["rootfs"]["diff_ids"] = list(config["rootfs"].get("diff_ids", [])) + [diff_id]
        created = _now()
        entry: dict[str, Any] = {
            "created": created,
            "created_by": f"dockyard container commit {name}",
        }
        if message:
            entry["comment"] = message
        if author:
            entry["author"] = author
        config["history"] = list(config.get("history", [])) + [entry]
        config["created"] = created
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        image = self.register(
            config_bytes, base.layers + [new_layer], base.manifest_media_type, ref
        )
        for layer in base.layers:
            if layer.digest in base.sources:
                image.sources.setdefault(layer.digest, []).extend(
                    s
                    for s in base.sources[layer.digest]
                    if s not in image.sources.get(layer.digest, [])
                )
        self.save_image(image)
        return image

    # ---- reports -----------------------------------------------------------------------
    def history(self, ref: str) -> list[dict[str, Any]]:
        """Newest first, as `docker history`: one row per history entry."""
        image = self.resolve(ref)
        rows = []
        layers = iter(image.layers)
        for entry in image.config.get("history", []):
            layer = None if entry.get("empty_layer") else next(layers, None)
            rows.append(
                {
                    "layer": layer.digest if layer else "<missing>",
                    "size": layer.size if layer else 0,
                    "created": entry.get("created", ""),
                    "created_by": entry.get("created_by", ""),
                    "comment": entry.get("comment", ""),
                }
            )
        for layer in layers:  # layers without history entries (imported tarballs)
            rows.append(
                {
                    "layer": layer.digest,
                    "size": layer.size,
                    "created": "",
                    "created_by": "",
                    "comment": "",
                }
            )
        return list(reversed(rows))

    def disk_usage(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for image in self.images():
            for layer in image.layers:
                counts[layer.chain_id] = counts.get(layer.chain_id, 0) + 1
        layers: list[dict[str, Any]] = []
        for chain, users in sorted(counts.items()):
            layers.append(
                {"chain_id": chain, "images": users, "bytes": _tree_size(self.layer_dir(chain))}
            )
        shared = sum(int(entry["bytes"]) for entry in layers if int(entry["images"]) > 1)
        containers = [
            {
                "name": c["name"],
                "bytes": _tree_size(self.driver.changed_root(self.container_dir(c["name"]))),
            }
            for c in self.containers()
        ]
        return {
            "layers": layers,
            "shared_bytes": shared,
            "total_layer_bytes": sum(entry["bytes"] for entry in layers),
            "containers": containers,
        }

    def fsck(self) -> list[str]:
        """Re-verify every blob's digest and every layer's diff ID; a list of damage."""
        damage = []
        for name in sorted(os.listdir(self._path("blobs", "sha256"))):
            with open(self._path("blobs", "sha256", name), "rb") as f:
                if _file_sha256(f) != name:
                    damage.append(f"blob sha256:{name}: content does not match its digest")
        for image in self.images():
            for layer in image.layers:
                if not self.has_blob(layer.digest):
                    damage.append(f"image {image.id}: layer blob {layer.digest} is missing")
                    continue
                if not self.has_layer(layer.chain_id):
                    damage.append(f"image {image.id}: layer {layer.chain_id} is not extracted")
                with open(self.blob_path(layer.digest), "rb") as f:
                    try:
                        diff = _diff_id_of(f)
                    except LayerError as exc:
                        damage.append(f"layer blob {layer.digest}: {exc}")
                        continue
                if diff != layer.diff_id:
                    damage.append(
                        f"layer blob {layer.digest}: diff ID {diff}, expected {layer.diff_id}"
                    )
        return damage


def gzip_parallel(source: Any, out: IO[bytes]) -> str:
    """Gzip `source` into `out` as a series of gzip members compressed on every core (zlib
    releases the GIL), in order; a multi-member gzip is one valid stream for every reader.
    Returns the hex sha256 of what was written."""
    hasher = hashlib.sha256()

    def compress(block: bytes) -> bytes:
        packer = zlib.compressobj(COMMIT_GZIP_LEVEL, zlib.DEFLATED, 31)
        return packer.compress(block) + packer.flush()

    workers = max(os.cpu_count() or 1, 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[Any] = []
        while True:
            block = source.read(GZIP_BLOCK)
            if block:
                pending.append(pool.submit(compress, block))
            while pending and (len(pending) > workers or not block):
                data = pending.pop(0).result()
                hasher.update(data)
                out.write(data)
            if not block:
                break
    return hasher.hexdigest()


def _file_sha256(f: IO[bytes]) -> str:
    hasher = hashlib.sha256()
    for chunk in iter(lambda: f.read(1024 * 1024), b""):
        hasher.update(chunk)
    return hasher.hexdigest()


def _diff_id_of(f: IO[bytes]) -> str:
    try:
        stream, _ = decompressed(f)  # type: ignore[arg-type]
        hasher = hashlib.sha256()
        for chunk in iter(lambda: stream.read(1024 * 1024), b""):
            hasher.update(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise LayerError(f"cannot decompress: {exc}") from exc
    return "sha256:" + hasher.hexdigest()


def _tree_size(path: str) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for directory, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def normalize_ref(ref: str) -> str:
    """`host:port/repo` → `host:port/repo:latest`; digests and tags are kept as given."""
    if "@" in ref:
        return ref
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last else f"{ref}:latest"
