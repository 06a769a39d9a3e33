"""Layer-core benchmark, side by side in one run:

1. layer apply throughput: dockyard's safe apply against GNU `tar -x` on the same gzip layer
   (and the same layer uncompressed), with the ratio;
2. container create time against image size, for the overlay and vfs drivers;
3. commit time against diff size (overlay).

Everything stays in a scratch directory; no network. Usage: python benchmarks/layers.py [--quick]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dockyard.layers.drivers import OverlayDriver  # noqa: E402
from dockyard.layers.store import ImageStore, LayerRef  # noqa: E402
from dockyard.layers.tarsafe import apply_layer  # noqa: E402

MIB = 1024 * 1024
# Runs of each side per cell; the best counts.
ROUNDS = 3


def make_layer(path: Path, total_mib: int, files: int) -> None:
    """A gzip layer of `files` files adding up to `total_mib` MiB (incompressible data)."""
    each = max(total_mib * MIB // files, 1)
    chunk = os.urandom(each)
    with gzip.open(path, "wb", compresslevel=1) as gz:
        with tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for i in range(files):
                info = tarfile.TarInfo(f"d{i % 50}/f{i}")
                info.size = each
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(chunk[: each - 8] + i.to_bytes(8, "little")))


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best(fn, before, rounds: int = ROUNDS) -> float:  # type: ignore[no-untyped-def]
    """The best time of `rounds` runs of `fn`, each after `before()` and with no dirty pages left
    from the previous run (os.sync), so write-back of one run does not slow the next."""
    times = []
    for _ in range(rounds):
        before()
        os.sync()
        times.append(timed(fn))
    return min(times)


def physical_limits(base: Path) -> None:
    """What one core and the page cache can do here: the bounds beside the ratios."""
    data = os.urandom(64 * MIB)
    t_hash = timed(lambda: hashlib.sha256(data).digest())
    packed = zlib.compress(data[: 16 * MIB] * 4, 1)  # compressible, as layers are
    t_inflate = timed(lambda: zlib.decompress(packed))
    path = base / "page-cache-probe"

    def write() -> None:
        with open(path, "wb") as f:
            f.write(data)

    t_write = best(write, lambda: path.unlink(missing_ok=True), 3)
    path.unlink()
    print(
        f"limits on one core: sha256 {64 * MIB / 1e6 / t_hash:.0f} MB/s, zlib inflate "
        f"{64 * MIB / 1e6 / t_inflate:.0f} MB/s (output), page-cache write "
        f"{64 * MIB / 1e6 / t_write:.0f} MB/s; cores: {os.cpu_count()}\n"
    )


def bench_apply(base: Path, sizes: list[tuple[int, int]]) -> list[tuple[str, float]]:
    print(
        f"layer apply (MB/s of uncompressed layer, best of {ROUNDS} ({ROUNDS + 4} for 2000 files), "
        "the two sides interleaved, synced between runs)"
    )
    print(
        f"{'layer':>10} {'files':>6} | {'dockyard':>9} {'tar -xzf':>9} {'ratio':>6} |"
        f" {'dockyard (plain)':>16} {'tar -xf (plain)':>15} {'ratio':>6}"
    )
    ratios = []
    for size, files in sizes:
        gz_path = base / f"layer-{size}.tar.gz"
        make_layer(gz_path, size, files)
        plain_path = base / f"layer-{size}.tar"
        with gzip.open(gz_path) as src, open(plain_path, "wb") as dst:
            shutil.copyfileobj(src, dst, MIB)
        mb = plain_path.stat().st_size / 1e6
        rates = []
        for path, flags in ((gz_path, "-xzf"), (plain_path, "-xf")):
            ours = base / "ours"
            theirs = base / "theirs"

            def fresh(d: Path) -> None:
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir()

            def ours_apply(path: Path = path, ours: Path = ours) -> None:
                with open(path, "rb") as f:
                    apply_layer(f, str(ours))

            def tar_apply(path: Path = path, flags: str = flags, theirs: Path = theirs) -> None:
                subprocess.run(["tar", flags, str(path), "-C", str(theirs)], check=True)

            # interleaved, the order alternating: file creation on this disk varies run to run
            # (a bare loop creating 2000 files takes 0.25-0.95 s), so both sides get the same
            # mix of states; many-file layers get more rounds
            rounds = ROUNDS + 4 if files >= 1000 else ROUNDS
            t_ours = t_tar = float("inf")
            for r in range(rounds):
                pair = [("ours", ours_apply, ours), ("tar", tar_apply, theirs)]
                for side, fn, target in pair if r % 2 == 0 else reversed(pair):
                    t = best(fn, lambda target=target: fresh(target), 1)
                    if side == "ours":
                        t_ours = min(t_ours, t)
                    else:
                        t_tar = min(t_tar, t)
            rates.append((mb / t_ours, mb / t_tar))
            for d in (ours, theirs):
                shutil.rmtree(d, ignore_errors=True)
        (g_ours, g_tar), (p_ours, p_tar) = rates
        print(
            f"{size:>7}MiB {files:>6} | {g_ours:>9.0f} {g_tar:>9.0f} {g_ours / g_tar:>5.2f}x |"
            f" {p_ours:>16.0f} {p_tar:>15.0f} {p_ours / p_tar:>5.2f}x",
            flush=True,
        )
        ratios.append((f"{size}MiB x {files} gzip", g_ours / g_tar))
        ratios.append((f"{size}MiB x {files} plain", p_ours / p_tar))
        gz_path.unlink()
        plain_path.unlink()
    return ratios


def _image(store: ImageStore, base: Path, size: int, files: int, name: str) -> str:
    path = base / f"img-{size}.tar.gz"
    make_layer(path, size, files)
    digest = store.put_blob(path.read_bytes())
    path.unlink()
    chain, diff, layer_size = store.apply_blob(None, digest, None, [])
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff]},
        "history": [],
    }
    store.register(
        json.dumps(config).encode(),
        [LayerRef(digest, diff, chain, layer_size, "application/vnd.oci.image.layer.v1.tar+gzip")],
        "application/vnd.oci.image.manifest.v1+json",
        name,
    )
    return name


def bench_create(base: Path, sizes: list[int]) -> None:
    drivers = ["vfs"] + (["overlay"] if OverlayDriver.supported() and os.geteuid() == 0 else [])
    print("\ncontainer create + mount time (ms) against image size")
    print(f"{'image':>10} | " + " ".join(f"{d:>10}" for d in drivers))
    stores = {d: ImageStore(str(base / f"store-{d}"), d) for d in drivers}
    for size in sizes:
        row = []
        for d in drivers:
            ref = _image(stores[d], base, size, max(size * 4, 10), f"bench/{d}:{size}")
            name = f"c{size}"

            def create(store: ImageStore = stores[d], ref: str = ref, name: str = name) -> None:
                store.create_container(ref, name)
                store.mount(name)

            row.append(timed(create) * 1000)
            stores[d].remove_container(name)
        print(f"{size:>7}MiB | " + " ".join(f"{ms:>10.1f}" for ms in row), flush=True)


def bench_commit(base: Path, diffs: list[int]) -> None:
    driver = "overlay" if OverlayDriver.supported() and os.geteuid() == 0 else "vfs"
    store = ImageStore(str(base / "store-commit"), driver)
    ref = _image(store, base, 16, 64, "bench/commit:base")
    print(f"\ncommit time against diff size ({driver})")
    print(f"{'diff':>10} {'ms':>9} {'MB/s':>8}")
    for size in diffs:
        name = f"w{size}"
        store.create_container(ref, name)
        rootfs = Path(store.mount(name))
        (rootfs / "new").mkdir()
        data = os.urandom(MIB)
        for i in range(size):
            (rootfs / "new" / f"f{i}").write_bytes(data[:-8] + i.to_bytes(8, "little"))
        elapsed = timed(lambda name=name, size=size: store.commit(name, f"bench/commit:{size}"))
        print(f"{size:>7}MiB {elapsed * 1000:>9.0f} {size * MIB / 1e6 / elapsed:>8.0f}", flush=True)
        store.remove_container(name)


def _oci_layout(base: Path, layers: int, layer_mib: int) -> Path:
    """An OCI image layout of `layers` gzip layers of `layer_mib` MiB each (64 files each)."""
    layout = base / "oci"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest, len(data)

    descriptors, diff_ids = [], []
    for i in range(layers):
        path = base / f"pull-layer-{i}.tar.gz"
        make_layer(path, layer_mib, 64)
        data = path.read_bytes()
        path.unlink()
        digest, size = put(data)
        diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest())
        descriptors.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest,
                "size": size,
            }
        )
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_digest, config_size = put(json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": descriptors,
    }
    manifest_digest, manifest_size = put(json.dumps(manifest).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": manifest_digest,
                        "size": manifest_size,
                        "annotations": {"org.opencontainers.image.ref.name": "1"},
                    }
                ],
            }
        )
    )
    return layout


def bench_pull(base: Path, layers: int, layer_mib: int) -> list[tuple[str, float]]:
    """`dockyard image pull` against `skopeo copy` to a directory plus `tar -xzf` of every
    layer in order, both from one CNCF distribution registry on loopback."""
    if shutil.which("skopeo") is None or shutil.which("docker-registry") is None:
        raise SystemExit("skopeo and docker-registry are needed: run `make engine`")
    from benchmarks.registry import start  # the reference registry, as the registry bench runs it

    server = start("distribution", base)
    try:
        layout = _oci_layout(base, layers, layer_mib)
        ref = f"127.0.0.1:{server.port}/bench/pull:1"
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "check": True}
        subprocess.run(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "--dest-tls-verify=false",
                f"oci:{layout}:1",
                f"docker://{ref}",
            ],
            **quiet,  # type: ignore[call-overload]
        )
        store, copied, rootfs = base / "pull-store", base / "pull-dir", base / "pull-rootfs"

        def fresh() -> None:
            for d in (store, copied, rootfs):
                shutil.rmtree(d, ignore_errors=True)
            for d in (store, rootfs):
                subprocess.run(["umount", "-R", str(d)], capture_output=True, check=False)

        def ours() -> None:
            subprocess.run(
                [
                    str(Path(sys.executable).parent / "dockyard"),
                    "image",
                    "pull",
                    "--root",
                    str(store),
                    ref,
                ],
                **quiet,  # type: ignore[call-overload]
            )

        def theirs() -> None:
            subprocess.run(
                [
                    "skopeo",
                    "--insecure-policy",
                    "copy",
                    "--src-tls-verify=false",
                    f"docker://{ref}",
                    f"dir:{copied}",
                ],
                **quiet,  # type: ignore[call-overload]
            )
            rootfs.mkdir()
            manifest = json.loads((copied / "manifest.json").read_text())
            for layer in manifest["layers"]:
                blob = copied / layer["digest"].split(":", 1)[1]
                subprocess.run(["tar", "-xzf", str(blob), "-C", str(rootfs)], check=True)

        t_ours = best(ours, fresh)
        t_theirs = best(theirs, fresh)
        fresh()
        mb = layers * layer_mib * MIB / 1e6
        print(
            f"\nimage pull, {layers} gzip layers x {layer_mib} MiB (MB/s uncompressed, best of "
            f"{ROUNDS}, from CNCF distribution on loopback)"
        )
        print(f"{'dockyard pull':>14} {'skopeo + tar':>13} {'ratio':>6}")
        print(f"{mb / t_ours:>14.0f} {mb / t_theirs:>13.0f} {t_theirs / t_ours:>5.2f}x", flush=True)
        return [(f"image pull {layers}x{layer_mib}MiB", t_theirs / t_ours)]
    finally:
        server.stop()


TARGETS = {"gzip": 1.0, "plain": 1.0, "image pull": 1.0}


def report_targets(ratios: list[tuple[str, float]]) -> None:
    """Each cell against the issue's target: a layer of 2000 small files (plain or gzip) >= 0.7x
    tar, other plain and gzip layers >= 1.0x, image pull >= 1.0x skopeo copy + tar."""
    print("\ntargets")
    for name, ratio in ratios:
        target = (
            0.7
            if "x 2000 " in name
            else next(value for key, value in TARGETS.items() if key in name)
        )
        verdict = "met" if ratio >= target else "NOT met"
        print(f"  {name:<28} {ratio:>5.2f}x (target >= {target:.1f}x) {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="dockyard-layers-", dir="/var/tmp"))
    try:
        physical_limits(base)
        if args.quick:
            ratios = bench_apply(base, [(16, 64), (64, 4)])
            ratios += bench_pull(base, 2, 16)
            bench_create(base, [1, 64])
            bench_commit(base, [1, 16])
        else:
            ratios = bench_apply(base, [(16, 2000), (256, 64), (256, 4)])
            ratios += bench_pull(base, 4, 64)
            bench_create(base, [1, 64, 256])
            bench_commit(base, [1, 64, 256])
        report_targets(ratios)
    finally:
        for store_dir in base.glob("store-*/containers/*"):
            subprocess.run(["umount", str(store_dir / "merged")], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
