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
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dockyard.layers.drivers import OverlayDriver  # noqa: E402
from dockyard.layers.store import ImageStore, LayerRef  # noqa: E402
from dockyard.layers.tarsafe import apply_layer  # noqa: E402

MIB = 1024 * 1024


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


def bench_apply(base: Path, sizes: list[tuple[int, int]]) -> None:
    print("layer apply (MB/s of uncompressed layer)")
    print(
        f"{'layer':>10} {'files':>6} | {'dockyard':>9} {'tar -x':>9} {'ratio':>6} |"
        f" {'dockyard (plain)':>16} {'tar -x (plain)':>14} {'ratio':>6}"
    )
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
            for d in (ours, theirs):
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir()

            def ours_apply(path: Path = path, ours: Path = ours) -> None:
                with open(path, "rb") as f:
                    apply_layer(f, str(ours))

            t_ours = timed(ours_apply)
            t_tar = timed(
                lambda path=path, flags=flags, theirs=theirs: subprocess.run(
                    ["tar", flags, str(path), "-C", str(theirs)], check=True
                )
            )
            rates.append((mb / t_ours, mb / t_tar))
        (g_ours, g_tar), (p_ours, p_tar) = rates
        print(
            f"{size:>7}MiB {files:>6} | {g_ours:>9.0f} {g_tar:>9.0f} {g_ours / g_tar:>5.2f}x |"
            f" {p_ours:>16.0f} {p_tar:>14.0f} {p_ours / p_tar:>5.2f}x",
            flush=True,
        )
        gz_path.unlink()
        plain_path.unlink()


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="dockyard-layers-", dir="/var/tmp"))
    try:
        if args.quick:
            bench_apply(base, [(16, 64), (64, 4)])
            bench_create(base, [1, 64])
            bench_commit(base, [1, 16])
        else:
            bench_apply(base, [(16, 2000), (256, 64), (256, 4)])
            bench_create(base, [1, 64, 256])
            bench_commit(base, [1, 64, 256])
    finally:
        for store_dir in base.glob("store-*/containers/*"):
            subprocess.run(["umount", str(store_dir / "merged")], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
