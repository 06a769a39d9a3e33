"""The layer store is safe to share: other local users cannot reach its layers and containers
(a real unprivileged user is refused), concurrent imports, creates, commits and removals on one
store all succeed and leave it consistent, a removal waits for an operation still adding content,
what a killed extraction or commit left in tmp/ goes when the store is next idle (partial
downloads stay), read-only commands never make a store, and a bare `sha256:` selects nothing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dockyard.layers.store import ImageStore, StoreError
from tests.unit.test_graph_drivers import base_image
from tests.unit.test_tarsafe import make_tar

BIN = Path(sys.executable).parent
# Seconds any one dockyard command of these tests may take.
COMMAND_TIMEOUT = 120
# Rounds of the concurrent-operations test (each round runs its commands in parallel).
ROUNDS = 5
# Seconds the removals of a round start after its additions: when those are half-way through.
REMOVAL_DELAY = 0.4
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setuid files, other users)")


def cli(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(BIN / "dockyard"), *args, "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    if check:
        assert proc.returncode == 0, f"dockyard {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def start(root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "dockyard"), *args, "--root", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def docker_archive(path: Path, layers: list[bytes], tag: str) -> str:
    """A docker-archive (as `docker save` writes) of plain layer tars; returns the image ID."""
    diff_ids = [sha256(layer) for layer in layers]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {"Labels": {"archive": path.name}},
        }
    ).encode()
    image_id = sha256(config)

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as tar:
        add(tar, f"{image_id[7:]}.json", config)
        names = []
        for diff_id, layer in zip(diff_ids, layers):
            names.append(f"{diff_id[7:]}/layer.tar")
            add(tar, names[-1], layer)
        manifest = [{"Config": f"{image_id[7:]}.json", "RepoTags": [tag], "Layers": names}]
        add(tar, "manifest.json", json.dumps(manifest).encode())
    return image_id


def bulky_layer(name: str, files: int = 1500, bulk: int = 4_000_000) -> bytes:
    """A layer slow enough to extract that other commands overlap it: many files and bulk."""
    entries: list[tuple] = [(name, "dir", None, 0o755)]
    entries += [(f"{name}/f{i}", "file", f"{name} {i}\n") for i in range(files)]
    entries.append((f"{name}/bulk", "file", os.urandom(bulk)))
    return make_tar(entries)


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two images sharing a base layer, each with a top layer of its own, and one image whose
    only layer takes seconds to extract."""
    base = tmp_path_factory.mktemp("archives")
    shared = bulky_layer("base")
    out = {}
    for name, files in (("a", 300), ("b", 2000)):
        out[name] = base / f"{name}.tar"
        docker_archive(out[name], [shared, bulky_layer(name, files=files)], f"local/{name}:1")
    out["slow"] = base / "slow.tar"
    docker_archive(out["slow"], [bulky_layer("slow", files=5000)], "local/slow:1")
    return out


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory every user may traverse (tmp_path is not: pytest keeps it 0700)."""
    path = Path(tempfile.mkdtemp(prefix="dockyard-store-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)  # nothing below it is mounted: the tests mount nothing here


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AS_NOBODY, *cmd], capture_output=True, text=True, timeout=30, check=False
    )


# ---- item 2: the store is private to its owner ------------------------------------------------
@as_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_other_users_cannot_reach_layer_or_container_files(world_dir: Path) -> None:
    root = world_dir / "store"
    archive = world_dir / "suid.tar"
    layer = make_tar(
        [
            ("bin", "dir", None, 0o755),
            ("bin/rootshell", "file", "#!/bin/sh\nid -u\n", 0o4755),
            ("dev", "dir", None, 0o755),
            ("dev/mem-like", "chr", None, 0o666),
        ]
    )
    docker_archive(archive, [layer], "local/suid:1")
    cli(root, "image", "import", str(archive))
    cli(root, "container", "create", "local/suid:1", "box")
    [setuid] = list(root.glob("layers/*/*/bin/rootshell"))
    assert setuid.stat().st_mode & stat.S_ISUID  # the image's setuid binary is in the store
    [device] = list(root.glob("layers/*/*/dev/mem-like"))
    assert as_nobody("stat", str(world_dir)).returncode == 0  # the way to the store is open

    for path in (setuid, device, setuid.parent, root / "containers" / "box", root / "blobs"):
        proc = as_nobody("stat", str(path))
        assert proc.returncode != 0 and "Permission denied" in proc.stderr, (path, proc.stdout)
    proc = as_nobody(str(setuid))
    assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc.stdout
    private = [root, root / "layers", root / "containers", root / "tmp", root / "blobs"]
    private += list(root.glob("layers/*")) + list(root.glob("containers/*"))
    assert {str(p): stat.S_IMODE(p.stat().st_mode) & 0o077 for p in private} == {
        str(p): 0 for p in private
    }


def test_an_older_open_store_is_tightened_and_fsck_reports_open_directories(
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"
    store = ImageStore(str(root), "vfs")
    base_image(store)
    store.create_container("local/base:1", "c")
    opened = [root, root / "layers", root / "containers", root / "containers" / "c"]
    opened += list(root.glob("layers/*"))
    for path in opened:  # as older code left them
        path.chmod(0o755)

    again = ImageStore(str(root))
    assert {str(p): stat.S_IMODE(p.stat().st_mode) for p in opened} == {
        str(p): 0o700 for p in opened
    }
    assert set(again.tightened) == {str(p) for p in opened}
    assert again.fsck() == []

    layer_dir = next(root.glob("layers/*"))
    layer_dir.chmod(0o711)  # what this user could not have tightened is reported
    problems = again.fsck()
    assert len(problems) == 1 and str(layer_dir) in problems[0] and "0711" in problems[0]

    loose = tmp_path / "loose"
    ImageStore(str(loose), "vfs")
    loose.chmod(0o755)
    proc = cli(loose, "store", "fsck")
    assert "private to its owner" in proc.stdout and "private to its owner" in proc.stderr
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700


# ---- item 4: concurrent operations --------------------------------------------------------------
def _changed_root(root: Path, name: str) -> Path:
    upper = root / "containers" / name / "upper"
    return upper if upper.is_dir() else root / "containers" / name / "rootfs"


def test_concurrent_imports_creates_commits_and_removals(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "store"
    cli(root, "image", "import", str(archives["a"]), "--tag", "local/a:base")
    cli(root, "container", "create", "local/a:base", "c0")
    (_changed_root(root, "c0") / "round-0").write_text("0")
    failures = []
    for r in range(1, ROUNDS + 1):
        # one image imported under three tags at once, another sharing its base layer twice
        adding = [
            ("image", "import", str(archives["a"]), "--tag", f"local/{tag}:{r}")
            for tag in ("a", "a-twin", "a-triplet")
        ]
        adding += [
            ("image", "import", str(archives["b"]), "--tag", f"local/{tag}:{r}")
            for tag in ("b", "b-twin")
        ]
        adding += [
            ("container", "create", "local/a:base", f"c{r}"),
            ("container", "commit", f"c{r - 1}", f"local/c:{r}"),
        ]
        removing = [
            ("image", "rm", f"local/{tag}:{r - 1}") for tag in ("b", "b-twin", "c", "a-twin")
        ]
        removing.append(("container", "rm", f"c{r - 2}"))
        procs = [(job, start(root, *job)) for job in adding]
        if r > 1:  # what they remove was added by the round before
            time.sleep(REMOVAL_DELAY)
            procs += [(job, start(root, *job)) for job in removing]
        for job, proc in procs:
            _out, err = proc.communicate(timeout=COMMAND_TIMEOUT)
            if proc.returncode != 0:
                failures.append(f"round {r}: dockyard {' '.join(job)}: {err.strip()}")
        if (root / "containers" / f"c{r}").is_dir():  # a change for the next round to commit
            (_changed_root(root, f"c{r}") / f"round-{r}").write_text(str(r))
    assert failures == []
    fsck = cli(root, "store", "fsck", check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    listing = cli(root, "image", "ls").stdout
    for r in range(1, ROUNDS + 1):  # no tag was lost to another import writing at once
        assert f"local/a:{r}" in listing and f"local/a-triplet:{r}" in listing
    assert f"local/c:{ROUNDS}" in listing and f"local/b:{ROUNDS}" in listing
    assert f"local/c:{ROUNDS - 1}" not in listing and f"local/b:{ROUNDS - 1}" not in listing
    assert not list((root / "tmp").iterdir())


def test_a_removal_waits_for_an_import_and_frees_nothing_it_added(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "store"
    store = ImageStore(str(root), "vfs")
    base_image(store)
    store.create_container("local/base:1", "other")
    (Path(store.mount("other")) / "x").write_text("x")
    store.commit("other", "local/other:1")
    store.remove_container("other")
    importing = start(root, "image", "import", str(archives["a"]))
    deadline = time.monotonic() + 60
    while not list((root / "tmp").glob("layer-*")):  # the import is extracting
        assert importing.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    cli(root, "image", "rm", "local/other:1")  # frees the unused: must not be the import's
    _out, err = importing.communicate(timeout=COMMAND_TIMEOUT)
    assert importing.returncode == 0, err
    fsck = cli(root, "store", "fsck", check=False)
    assert fsck.returncode == 0, fsck.stdout
    assert "local/a:1" in cli(root, "image", "ls").stdout


def test_a_removal_while_content_is_added_says_the_store_is_in_use(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    adder = ImageStore(root, "vfs")
    base_image(adder)
    adder.create_container("local/base:1", "c")
    remover = ImageStore(root)
    remover.lock_wait = 0.3
    with adder.sharing():  # an operation adding content, e.g. a pull waiting on the network
        with pytest.raises(StoreError, match="in use by another dockyard operation"):
            remover.remove_image("local/base:1")
        with pytest.raises(StoreError, match="in use by another dockyard operation"):
            remover.remove_container("c")
        assert adder.resolve("local/base:1") and adder.container("c")
    remover.remove_container("c")
    remover.remove_image("local/base:1")
    assert remover.images() == [] and os.listdir(os.path.join(root, "layers")) == []


def test_threads_extracting_one_layer_extract_and_publish_it_once(tmp_path: Path) -> None:
    store_root = str(tmp_path / "store")
    ImageStore(store_root, "vfs")
    data = bulky_layer("x", files=400, bulk=100_000)
    digest = ImageStore(store_root).put_blob(data)
    results: list[tuple[str, str, int]] = []
    errors: list[BaseException] = []
    applied: list[str] = []

    def extract(s: ImageStore) -> None:
        try:
            results.append(s.apply_blob(None, digest, sha256(data), []))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    stores = [ImageStore(store_root) for _ in range(4)]
    for s in stores:  # count the extractions
        apply = s.driver.apply

        def counted(*args: Any, apply: Callable[..., Any] = apply) -> Any:
            applied.append("x")
            time.sleep(0.2)  # a slow disk: the others must wait, not extract too
            return apply(*args)

        s.driver.apply = counted  # type: ignore[method-assign]
    threads = [threading.Thread(target=extract, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(results) == 4 and len(set(results)) == 1
    assert len(applied) == 1
    assert os.listdir(tmp_path / "store" / "layers") == [sha256(data)[7:]]
    assert os.listdir(tmp_path / "store" / "tmp") == []


# ---- item 11: temps of killed operations --------------------------------------------------------
def _kill_when(proc: subprocess.Popen[str], tmp: Path, temp: Callable[[str], bool]) -> list[str]:
    """SIGKILL `proc` as soon as tmp/ holds an entry `temp` accepts; those entries."""
    deadline = time.monotonic() + 60
    while True:
        found = sorted(name for name in os.listdir(tmp) if temp(name))
        if found:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            return found
        assert proc.poll() is None, "the command finished before it wrote a temp"
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_temps_of_a_killed_extraction_and_commit_go_when_the_store_opens(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "store"
    tmp = root / "tmp"
    cli(root, "image", "import", str(archives["b"]))
    cli(root, "container", "create", "local/b:1", "big")
    (_changed_root(root, "big") / "bulk").write_bytes(os.urandom(40_000_000))
    partial = f"download-{'0' * 64}.partial"  # a pull resumes these: they stay
    (tmp / partial).write_bytes(b"half a layer")

    killed = start(root, "image", "import", str(archives["a"]))
    left = _kill_when(killed, tmp, lambda name: name.startswith("layer-"))
    assert left
    cli(root, "image", "ls")  # the next open of the idle store sweeps
    assert os.listdir(tmp) == [partial]

    killed = start(root, "container", "commit", "big", "local/big:1")
    left = _kill_when(killed, tmp, lambda name: name != partial)
    assert left
    assert "every digest verified" in cli(root, "store", "fsck").stdout
    assert os.listdir(tmp) == [partial]


def test_temps_of_a_running_import_are_kept_and_shown_by_du_and_fsck(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "store"
    tmp = root / "tmp"
    ImageStore(str(root))
    partial = f"download-{'0' * 64}.partial"
    (tmp / partial).write_bytes(b"half a layer")
    importing = start(root, "image", "import", str(archives["slow"]))
    deadline = time.monotonic() + 60
    while not [name for name in os.listdir(tmp) if name.startswith("layer-")]:
        assert importing.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    du = cli(root, "store", "du").stdout
    fsck = cli(root, "store", "fsck").stdout
    _out, err = importing.communicate(timeout=COMMAND_TIMEOUT)
    assert importing.returncode == 0, err  # nothing of the running import was swept
    assert f"tmp/{partial}" in du and "partial download" in du
    assert f"tmp/{partial}" in fsck and "partial download" in fsck
    assert "tmp/layer-" in du and "in use" in du
    assert "tmp/layer-" in fsck and "in use" in fsck
    assert os.listdir(tmp) == [partial]


# ---- item 12: read-only commands and image IDs -------------------------------------------------
@pytest.mark.parametrize(
    "command",
    [
        ("image", "ls"),
        ("store", "du"),
        ("store", "fsck"),
        ("container", "ls"),
        ("image", "history", "local/x:1"),
        ("image", "rm", "local/x:1"),
        ("store", "prune"),
    ],
)
def test_read_only_commands_do_not_make_a_store(tmp_path: Path, command: tuple[str, ...]) -> None:
    missing = tmp_path / "mistyped"
    proc = cli(missing, *command, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and f"no store at {missing}" in proc.stderr
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(empty, *command, check=False).returncode == 1
    assert list(empty.iterdir()) == []


def test_a_bare_or_short_sha256_prefix_selects_no_image(tmp_path: Path) -> None:
    store = ImageStore(str(tmp_path / "store"), "vfs")
    image_id = base_image(store)
    for ref in ("sha256:", "sha256:" + image_id[7:10], "sha256:XYZ"):
        with pytest.raises(StoreError):
            store.resolve(ref)
        with pytest.raises(StoreError):
            store.remove_image(ref)
    proc = cli(tmp_path / "store", "image", "rm", "sha256:", check=False)
    assert proc.returncode == 1 and "sha256:" in proc.stderr
    assert store.resolve(image_id[:19]).id == image_id  # as `image ls` shows it
    assert store.resolve(image_id[7:19]).id == image_id
    assert store.resolve(image_id).id == image_id
    assert [image.id for image in store.images()] == [image_id]
