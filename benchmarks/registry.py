"""Registry benchmark: dockyard's registry and CNCF distribution (Debian's docker-registry) side by
side on loopback, each with a fresh storage root on the same disk, the same client and the same
blobs. Prints push and pull MB/s of each for 1, 64 and 256 MiB blobs at concurrency 1 and 8,
manifest GET requests/s, and the ratios dockyard / distribution. Each scenario runs `--rounds`
times with fresh blobs and alternating order; the best rate of each registry is kept, which takes
most of this machine's disk write-back noise out of the ratios.

Every loop is bounded (a fixed number of uploads, downloads and requests); traffic goes only to
127.0.0.1. Usage: python benchmarks/registry.py [--quick] [--rounds N]"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import ctypes.util
import functools
import hashlib
import http.client
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from dockyard.fsutil import fsync_dir
from dockyard.registry.probe import wait_ready

BIN = Path(sys.executable).parent
MIB = 1024 * 1024
# Bytes per send/recv step of the client (large, so the client is not what is measured).
CLIENT_BLOCK = 4 * MIB
# (blob size in MiB, concurrency, uploads in all); downloads repeat the same blobs.
SCENARIOS_FULL = [(1, 1, 64), (1, 8, 128), (64, 1, 6), (64, 8, 16), (256, 1, 3), (256, 8, 8)]
SCENARIOS_QUICK = [(1, 1, 16), (1, 8, 32), (64, 1, 2), (64, 8, 8)]
MANIFEST_REQUESTS = 3000
MANIFEST_THREADS = 8
# Bytes written (and fdatasync'ed) to measure the disk's sustained durable write rate.
DISK_PROBE_BYTES = 1024 * MIB
# Blobs pushed and pulled (untimed) to warm up each registry before the measurements.
WARMUP_BLOBS = 16
# Longest wait for the disk to drain what the previous phase wrote.
SETTLE_MAX_S = 30.0


@dataclass
class Server:
    kind: str
    port: int
    root: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(kind: str, base: Path) -> Server:
    port = _free_port()
    root = base / kind
    root.mkdir(parents=True)
    config = root / "config.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "version": 0.1,
                "log": {"level": "error", "accesslog": {"disabled": True}},
                "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
                "http": {"addr": f"127.0.0.1:{port}"},
            }
        )
    )
    cmd = (
        [str(BIN / "dockyard"), "registry", "serve", "--config", str(config)]
        if kind == "dockyard"
        else ["docker-registry", "serve", str(config)]
    )
    log = open(root / "server.log", "wb")  # noqa: SIM115 - owned by the process
    process = subprocess.Popen(cmd, stdout=log, stderr=log)
    # Ready means /v2/ answered as a registry (an open port is not enough: dockyard.probe).
    answer = wait_ready(f"http://127.0.0.1:{port}", 20)
    if not answer.ready or process.poll() is not None:
        process.kill()
        raise SystemExit(f"{kind} did not start: {(root / 'server.log').read_text()[-1000:]}")
    return Server(kind, port, root, process)


def _conn(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=300, blocksize=CLIENT_BLOCK)


def _path(location: str) -> str:
    if "://" in location:
        return "/" + location.split("://", 1)[1].split("/", 1)[1]
    return location


def push(port: int, repo: str, blob: Path, digest: str) -> None:
    conn = _conn(port)
    try:
        conn.request("POST", f"/v2/{repo}/blobs/uploads/")
        reply = conn.getresponse()
        reply.read()
        location = _path(reply.headers["Location"])
        with open(blob, "rb") as f:
            conn.request(
                "PATCH",
                location,
                body=f,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(blob.stat().st_size),
                },
            )
            reply = conn.getresponse()
            reply.read()
        assert reply.status == 202, reply.status
        location = _path(reply.headers["Location"])
        sep = "&" if "?" in location else "?"
        conn.request("PUT", f"{location}{sep}digest={digest}", headers={"Content-Length": "0"})
        reply = conn.getresponse()
        reply.read()
        assert reply.status == 201, (reply.status, reply.read())
    finally:
        conn.close()


def pull(port: int, repo: str, digest: str, size: int) -> None:
    """GET a blob over a raw socket into one reused buffer: the least client work per byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=300) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_BLOCK)
        sock.sendall(
            f"GET /v2/{repo}/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        buffer = bytearray(CLIENT_BLOCK)
        view = memoryview(buffer)
        head = b""
        while b"\r\n\r\n" not in head:
            n = sock.recv_into(view)
            if not n:
                raise AssertionError("connection closed before the headers ended")
            head += bytes(view[:n])
        header, _, rest = head.partition(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        assert status == 200, status
        got = len(rest)
        while got < size:
            n = sock.recv_into(view)
            if not n:
                break
            got += n
        assert got == size, (got, size)


def _parallel(jobs: list[Callable[[], None]], concurrency: int) -> float:
    lock = threading.Lock()
    pending = list(jobs)
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not pending or errors:
                    return
                job = pending.pop()
            try:
                job()
            except BaseException as exc:  # noqa: BLE001 - reported after the run
                with lock:
                    errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def make_blobs(base: Path, size_mib: int, count: int) -> list[tuple[Path, str]]:
    """`count` distinct blobs of the size (distinct, so no registry can skip a write)."""
    out = []
    seed = os.urandom(MIB)
    for i in range(count):
        path = base / f"blob-{size_mib}-{i}"
        hasher = hashlib.sha256()
        with open(path, "wb") as f:
            for j in range(size_mib):
                chunk = (i * 100_003 + j).to_bytes(8, "little") + seed[8:]
                f.write(chunk)
                hasher.update(chunk)
        out.append((path, "sha256:" + hasher.hexdigest()))
    return out


def disk_write_rate(base: Path) -> float:
    """MB/s of writing DISK_PROBE_BYTES and fdatasync, with write-back started every 8 MiB as
    dockyard's registry starts it: about the most any registry that makes each blob durable
    before answering can push, sustained, on the disk the benchmark stores on."""
    path = base / "disk-probe"
    block = os.urandom(4 * MIB)
    settle(0, 1.0)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        kicked = written = 0
        for _ in range(DISK_PROBE_BYTES // len(block)):
            written += os.write(fd, block)
            if written - kicked >= 8 * MIB:
                _start_writeback(fd, kicked, written - kicked)
                kicked = written
        os.fdatasync(fd)
    finally:
        os.close(fd)
    rate = DISK_PROBE_BYTES / 1e6 / (time.perf_counter() - started)
    path.unlink()
    return rate


def small_file_rate(base: Path, size: int, concurrency: int, count: int) -> float:
    """MB/s of making `count` blobs of `size` bytes durable, `concurrency` at a time, with the
    least file system work a registry in distribution's layout must do per blob before its 201:
    the data and its repository link (71 bytes) each written to a temp file, fsynced and
    renamed into a directory of their own, then both directories fsynced (the two files' fsyncs
    side by side, then the two directories', as dockyard does). No HTTP, no hashing: the disk's
    own limit for that blob size, beside which the push of that size is read."""
    root = base / "small-probe"
    data = os.urandom(size)
    link = b"sha256:" + b"0" * 64

    def durable(directory: Path, name: str, payload: bytes) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / name)

    helper = concurrent.futures.ThreadPoolExecutor(concurrency)

    def blob(i: int) -> Callable[[], None]:
        def run() -> None:
            blob_dir = root / "blobs" / f"{i:02x}"[-2:] / f"b{i}"
            link_dir = root / "links" / f"b{i}"
            side = helper.submit(durable, link_dir, "link", link)
            durable(blob_dir, "data", data)
            side.result()
            side = helper.submit(fsync_dir, str(link_dir))
            fsync_dir(str(blob_dir))
            side.result()

        return run

    settle(0, 1.0)
    try:
        elapsed = _parallel([blob(i) for i in range(count)], concurrency)
    finally:
        helper.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    return size * count / 1e6 / elapsed


def _start_writeback(fd: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.sync_file_range(fd, ctypes.c_longlong(offset), ctypes.c_longlong(length), 2)


def settle(written: int, rate: float) -> None:
    """Flush dirty pages, then give the disk the time it needs to drain them at its sustained
    rate: os.sync() returns once the device accepted the data, and a virtual disk drains its
    own cache afterwards, which would otherwise slow the next registry's fsyncs."""
    os.sync()
    time.sleep(min(SETTLE_MAX_S, 1.0 + 1.5 * written / 1e6 / rate))


def _tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children (the registry's workers)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def report_cpu(push_cpu: dict[tuple[int, int, str], tuple[float, float]]) -> None:
    """CPU per pushed blob, server and client, and the push rate that CPU alone allows on this
    machine's cores: the physical limit beside the small-blob cells."""
    cores = os.cpu_count() or 1
    print(f"CPU per pushed blob, server + client (ms), and the push rate {cores} cores allow:")
    for (size, conc, kind), (server, client) in sorted(push_cpu.items()):
        if size != 1:
            continue
        bound = cores / ((server + client) / 1000) * size * MIB / 1e6
        print(
            f"  {size}MiB x{conc} {kind:<12} {server:6.2f} + {client:5.2f}  -> at most "
            f"{bound:5.0f} MB/s"
        )


def bench_manifest_get(port: int, pid: int) -> tuple[float, float, float]:
    """Manifest GETs per second over keep-alive connections, and the CPU per GET (ms) of the
    server's processes and of the client."""
    config = b"{}"
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    tmp = Path(tempfile.mkstemp()[1])
    tmp.write_bytes(config)
    push(port, "bench/manifest", tmp, digest)
    tmp.unlink()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": digest,
                "size": 2,
            },
            "layers": [],
        }
    ).encode()
    conn = _conn(port)
    conn.request(
        "PUT",
        "/v2/bench/manifest/manifests/latest",
        body=manifest,
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert conn.getresponse().read() is not None
    conn.close()
    per_thread = MANIFEST_REQUESTS // MANIFEST_THREADS

    def worker() -> None:
        c = _conn(port)
        for _ in range(per_thread):
            c.request(
                "GET",
                "/v2/bench/manifest/manifests/latest",
                headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
            )
            r = c.getresponse()
            r.read()
            assert r.status == 200
        c.close()

    before = (_tree_cpu(pid), _self_cpu())
    elapsed = _parallel([worker] * MANIFEST_THREADS, MANIFEST_THREADS)
    after = (_tree_cpu(pid), _self_cpu())
    requests = per_thread * MANIFEST_THREADS
    return (
        requests / elapsed,
        (after[0] - before[0]) / requests * 1000,
        (after[1] - before[1]) / requests * 1000,
    )


# The targets: push at concurrency 8 against the disk's durable write rate, 1 MiB x 1
# push (latency: syncs per blob), every pull cell and manifest GET against distribution.
TARGET_PUSH_OF_DISK = 0.9
TARGET_SMALL_PUSH = 2.0
TARGET_PULL = 1.5
TARGET_MANIFEST_GET = 3.0


def report_targets(
    cells: dict[tuple[int, int], tuple[float, float, float, float]],
    get_ratio: float,
    disk: float,
    small: float,
) -> None:
    """One line per target: measured value, target, met or not. Both registries fsync blob
    data before answering (distribution 2.8 in its writer's Commit: strace counts 22 fsyncs for
    two 8 MiB pushes); `disk` is the lower of the two probes of this run."""

    def line(what: str, value: float, target: float) -> None:
        verdict = "met" if value >= target else "NOT met"
        print(f"target {what}: {value:.2f}x (>= {target}x) {verdict}")

    for (size, conc), (dy_push, _, _, _) in sorted(cells.items()):
        if conc == 8:
            line(f"push {size}MiB x8 / disk {disk:.0f} MB/s", dy_push / disk, TARGET_PUSH_OF_DISK)
            if size == 1:
                print(
                    f"  (1 MiB blobs: the disk makes them durable at {small:.0f} MB/s, 8 at a "
                    f"time; the push reaches {dy_push / small:.2f}x of that)"
                )
    if (1, 1) in cells:
        dy_push, di_push, _, _ = cells[(1, 1)]
        line("push 1MiB x1 / distribution", dy_push / di_push, TARGET_SMALL_PUSH)
    worst = min(cells.items(), key=lambda item: item[1][2] / item[1][3])
    (size, conc), (_, _, dy_pull, di_pull) = worst
    line(f"pull, lowest cell ({size}MiB x{conc}) / distribution", dy_pull / di_pull, TARGET_PULL)
    line("manifest GET / distribution", get_ratio, TARGET_MANIFEST_GET)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller run (no 256 MiB blobs)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: /var/tmp)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds per scenario; the best of each registry is kept (default 2)",
    )
    args = parser.parse_args()
    if shutil.which("docker-registry") is None:
        raise SystemExit("docker-registry is not installed: run `make engine`")
    scenarios = SCENARIOS_QUICK if args.quick else SCENARIOS_FULL
    base = Path(tempfile.mkdtemp(prefix="dockyard-bench-", dir=args.dir or "/var/tmp"))
    servers = {}
    try:
        servers = {kind: start(kind, base / "servers") for kind in ("dockyard", "distribution")}
        blobs_dir = base / "blobs"
        blobs_dir.mkdir()
        disk = disk_write_rate(base)
        small = small_file_rate(base, MIB, 8, 128)
        # untimed warm-up of both (first connections, every worker process, thread pools)
        for server in servers.values():
            warm = make_blobs(blobs_dir, 1, WARMUP_BLOBS)
            _parallel(
                [functools.partial(push, server.port, "bench/warmup", b, d) for b, d in warm], 4
            )
            _parallel(
                [functools.partial(pull, server.port, "bench/warmup", d, MIB) for _, d in warm], 4
            )
            for path, _ in warm:
                path.unlink()
        print(f"disk: {DISK_PROBE_BYTES // MIB} MiB written + fdatasync at {disk:.0f} MB/s")
        print(
            f"disk: 1 MiB blobs made durable 8 at a time (data + link: fsync, rename, directory "
            f"fsync; no HTTP) at {small:.0f} MB/s"
        )
        written = DISK_PROBE_BYTES
        print(
            f"{'blob':>8} {'conc':>4} | {'push MB/s':>20} {'ratio':>6} | "
            f"{'pull MB/s':>20} {'ratio':>6}"
        )
        print(
            f"{'':>8} {'':>4} | {'dockyard':>10}{'distrib':>10} {'':>6} | "
            f"{'dockyard':>10}{'distrib':>10}"
        )
        push_ratios: list[float] = []
        # (blob MiB, concurrency, registry) -> CPU ms per pushed blob (server, client), last round
        push_cpu: dict[tuple[int, int, str], tuple[float, float]] = {}
        # (blob MiB, concurrency) -> (dockyard push, distribution push, dockyard pull, distrib pull)
        cells: dict[tuple[int, int], tuple[float, float, float, float]] = {}
        for size_mib, concurrency, count in scenarios:
            total = size_mib * count * MIB / 1e6
            rates: dict[str, tuple[float, float]] = {}
            for round_ in range(args.rounds):
                # fresh blobs every round (a registry must not be able to skip a write) and the
                # order alternated, so neither registry always runs on a warmer page cache
                blobs = make_blobs(blobs_dir, size_mib, count)
                order = ["dockyard", "distribution"]
                if (len(push_ratios) + round_) % 2:
                    order.reverse()
                for kind in order:
                    # every push starts on a disk that has written back the previous phase
                    settle(written, disk)
                    written = size_mib * count * MIB
                    port = servers[kind].port
                    repo = f"bench/s{size_mib}c{concurrency}r{round_}"
                    cpu_before = (_tree_cpu(servers[kind].process.pid), _self_cpu())
                    t_push = _parallel(
                        [functools.partial(push, port, repo, b, d) for b, d in blobs],
                        concurrency,
                    )
                    cpu_after = (_tree_cpu(servers[kind].process.pid), _self_cpu())
                    push_cpu[(size_mib, concurrency, kind)] = (
                        (cpu_after[0] - cpu_before[0]) / count * 1000,
                        (cpu_after[1] - cpu_before[1]) / count * 1000,
                    )
                    t_pull = _parallel(
                        [functools.partial(pull, port, repo, d, size_mib * MIB) for _, d in blobs],
                        concurrency,
                    )
                    best = rates.get(kind, (0.0, 0.0))
                    rates[kind] = (max(best[0], total / t_push), max(best[1], total / t_pull))
                for path, _ in blobs:
                    path.unlink()
            dy, di = rates["dockyard"], rates["distribution"]
            cells[(size_mib, concurrency)] = (dy[0], di[0], dy[1], di[1])
            push_ratio = rates["dockyard"][0] / rates["distribution"][0]
            pull_ratio = rates["dockyard"][1] / rates["distribution"][1]
            push_ratios.append(push_ratio)
            print(
                f"{size_mib:>5}MiB {concurrency:>4} | {rates['dockyard'][0]:>10.0f}"
                f"{rates['distribution'][0]:>10.0f} {push_ratio:>5.2f}x | "
                f"{rates['dockyard'][1]:>10.0f}{rates['distribution'][1]:>10.0f} "
                f"{pull_ratio:>5.2f}x",
                flush=True,
            )
        report_cpu(push_cpu)
        measured = {
            kind: bench_manifest_get(servers[kind].port, servers[kind].process.pid)
            for kind in servers
        }
        gets = {kind: value[0] for kind, value in measured.items()}
        get_ratio = gets["dockyard"] / gets["distribution"]
        print(
            f"manifest GET req/s: dockyard {gets['dockyard']:.0f}, distribution "
            f"{gets['distribution']:.0f}, ratio {get_ratio:.2f}x"
        )
        print(
            "  CPU per GET, server + client (ms): "
            + ", ".join(
                f"{kind} {server:.3f} + {client:.3f}"
                for kind, (_, server, client) in measured.items()
            )
        )
        settle(written, disk)
        disk_after = disk_write_rate(base)
        print(f"disk after the pushes: {disk_after:.0f} MB/s (before: {disk:.0f} MB/s)")
        report_targets(cells, get_ratio, min(disk, disk_after), small)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
