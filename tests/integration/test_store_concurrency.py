"""Concurrent pulls into one layer store from Debian's CNCF distribution (`docker-registry`) on
loopback — the same image twice at once, another sharing its base layer — with container creates
and removals alongside, round after round: every command succeeds (a removal waits for the pulls
rather than free what they downloaded) and the store is consistent afterwards."""

from __future__ import annotations

import time
from pathlib import Path

from tests.integration.conftest import make_server
from tests.unit.test_store_safety import (
    COMMAND_TIMEOUT,
    REMOVAL_DELAY,
    archives,  # noqa: F401 - the fixture, shared with the unit tests
    cli,
    start,
)

# Rounds of parallel pulls (each a few seconds).
PULL_ROUNDS = 4


def test_concurrent_pulls_creates_and_removals(archives: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    dist = make_server("distribution", tmp_path / "dist")
    try:
        src = tmp_path / "src"
        refs = {name: f"{dist.address}/cc/{name}:1" for name in ("a", "b")}
        for name, ref in refs.items():
            cli(src, "image", "import", str(archives[name]))
            cli(src, "image", "push", ref, "--from", f"local/{name}:1")

        root = tmp_path / "store"
        failures = []
        for r in range(1, PULL_ROUNDS + 1):
            adding = [
                ("image", "pull", refs["a"]),
                ("image", "pull", refs["a"]),
                ("image", "pull", refs["b"]),
            ]
            removing = [("image", "rm", refs["a"])]
            if r > 1:
                adding.append(("container", "create", refs["b"], f"k{r}"))
            if r > 2:
                removing.append(("container", "rm", f"k{r - 1}"))
            procs = [(job, start(root, *job)) for job in adding]
            if r > 1:  # what they remove was added by the round before
                time.sleep(REMOVAL_DELAY)
                procs += [(job, start(root, *job)) for job in removing]
            for job, proc in procs:
                _out, err = proc.communicate(timeout=COMMAND_TIMEOUT)
                if proc.returncode != 0:
                    failures.append(f"round {r}: dockyard {' '.join(job)}: {err.strip()[-500:]}")
        assert failures == []
        cli(root, "image", "pull", refs["a"])  # the last round's rm may have come after its pulls
        fsck = cli(root, "store", "fsck", check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        listing = cli(root, "image", "ls").stdout
        assert refs["a"] in listing and refs["b"] in listing
        assert sorted(p.name for p in (root / "containers").iterdir()) == [f"k{PULL_ROUNDS}"]
        assert not list((root / "tmp").iterdir())  # no partial download left behind
    finally:
        dist.stop()
