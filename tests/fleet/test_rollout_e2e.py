"""Lab end to end for `dockyard rollout`, one rollout stopped twice: a canary failure (a storage
driver the host cannot run) stops before any other Docker host changes; `--resume` with the canary
fixed fails in the second wave and leaves the later waves untouched (their daemon.json
unchanged); `--resume` after that fix finishes from that wave. The runs together roll the whole
lab out, tier by tier, every other wave passing every gate; the storage and registry tiers (the
VMs) run once.

The change rolled out is real (`live-restore` turned off in daemon.json, which the engines
reload; the plain deploy turns it back on afterwards), and the failures are injected per host
through an inventory of the test's own (conftest.lab_inventory): the lab's groups and data
(inventory/lab.py) with a few keys changed. All the lab's containers get the same
`rollout_release`, so the default waves (a canary of one host per release, 25% of the rest, the
rest) are three waves of one host each."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fleet.conftest import BIN, ENV, ROOT, lab_inventory, run_deploy

pytestmark = pytest.mark.lab

# Bound on one rollout (every tier's deploy over ssh, the gates after each wave).
ROLLOUT_TIMEOUT = 1800
# The change: data that every rolled-out host's daemon.json shows, and a plain deploy reverts.
CHANGE = {"docker_daemon_live_restore": False}


def _containers(lab: list[dict[str, Any]]) -> list[str]:
    """The lab's container Docker hosts in inventory order (the order the waves take them)."""
    return [h["name"] for h in lab if h["kind"] == "container"]


def _inventory(tmp_path: Path, overrides: dict[str, dict[str, Any]]) -> Path:
    return lab_inventory(tmp_path, overrides)


def _rollout(inventory: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [str(BIN / "dockyard"), "rollout", "--json", str(inventory), "deploy.py", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=ROLLOUT_TIMEOUT,
        check=False,
    )
    result = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, result, proc.stderr


def _changed(host: Any) -> bool:
    """Whether the rolled-out change reached this host's daemon.json."""
    config = json.loads(host.file("/etc/docker/daemon.json").content_string)
    return config.get("live-restore") is False


def _waves(result: dict[str, Any]) -> list[tuple[str, list[str], bool]]:
    return [(w["tier"], w["hosts"], w["passed"]) for w in result["waves"]]


@pytest.fixture
def restored(lab: list[dict[str, Any]], hosts: dict[str, Any]) -> Iterator[None]:
    """Whatever a test rolled out, the containers end as the plain deploy makes them."""
    yield
    limits = [arg for name in _containers(lab) for arg in ("--limit", name)]  # one flag each
    back = run_deploy(*limits)
    assert back.returncode == 0, back.failures()
    for name in _containers(lab):
        assert not _changed(hosts[name]), name


def test_a_canary_failure_then_a_second_wave_failure_stop_and_resume_finishes(
    lab: list[dict[str, Any]], hosts: dict[str, Any], tmp_path: Path, restored: None
) -> None:
    """One rollout, stopped twice: the canary fails (no other Docker host changes), `--resume`
    with the canary fixed fails in the second wave (the third wave untouched), and `--resume`
    after that fix finishes. The storage and registry tiers (the VMs) run once: each pass over
    them costs emulated minutes."""
    first, second, third = _containers(lab)
    same_release = {"rollout_release": "lab", **CHANGE}
    before = {n: hosts[n].file("/etc/docker/daemon.json").content_string for n in _containers(lab)}

    # 1. The canary is asked for a storage driver its kernel cannot run: the deploy refuses it.
    broken_canary = _inventory(
        tmp_path, {"*containers": same_release, first: {"docker_storage_driver": "zfs"}}
    )
    code, result, log = _rollout(broken_canary)
    assert code == 1, log[-6000:]
    assert result["ok"] is False
    assert [w["tier"] for w in result["waves"][:2]] == ["storage", "registry"]
    assert all(w["passed"] for w in result["waves"][:2])
    canary = [w for w in result["waves"] if w["tier"] == "docker_hosts"]
    assert [w["hosts"] for w in canary] == [[first]] and canary[0]["passed"] is False
    assert canary[0]["failures"][first]  # named with what failed on it
    assert result["untouched"] == [second, third]
    for name in (first, second, third):
        assert hosts[name].file("/etc/docker/daemon.json").content_string == before[name], name
    # the state is kept for --resume, in the working directory
    assert result["state"] and Path(result["state"]).is_file()

    # 2. Resumed with the canary fixed, the second wave's host is asked for that driver.
    broken_second = _inventory(
        tmp_path, {"*containers": same_release, second: {"docker_storage_driver": "zfs"}}
    )
    code, result, log = _rollout(broken_second, "--resume")
    assert code == 1, log[-6000:]
    assert result["ok"] is False
    ran = [w for w in result["waves"] if not w["previous"]]
    assert [w["hosts"] for w in ran] == [[first], [second]]  # from the failed canary on
    assert [w["passed"] for w in ran] == [True, False]
    assert ran[1]["failures"][second]
    assert result["untouched"] == [third]
    assert second in log and "zfs" in log
    assert _changed(hosts[first])
    assert not _changed(hosts[second])  # its failed deploy left daemon.json as it was
    assert not _changed(hosts[third])  # the third wave never ran
    checks: dict[str, set[str]] = {}
    for wave in result["waves"]:
        for name, gates in wave["checks"].items():
            checks.setdefault(name, set()).update(gates)

    # 3. Resumed after the fix: the rest of the lab, every wave passing every gate.
    fixed = _inventory(tmp_path, {"*containers": same_release})
    code, resumed, log = _rollout(fixed, "--resume")
    assert code == 0, log[-6000:]
    assert resumed["ok"] is True and resumed["untouched"] == []
    ran = [w for w in resumed["waves"] if not w["previous"]]
    assert [w["hosts"] for w in ran] == [[second], [third]]  # from the failed wave on
    assert all(w["passed"] and not w["failures"] for w in resumed["waves"])
    for name in (first, second, third):
        assert _changed(hosts[name]), name
    assert not Path(result["state"]).exists()  # a finished rollout keeps no state

    # Across the runs the whole lab rolled out, tier by tier, and passed every gate.
    tiers = [w["tier"] for w in resumed["waves"]]
    assert tiers[:2] == ["storage", "registry"] and set(tiers[2:]) == {"docker_hosts"}
    rolled = [name for wave in resumed["waves"] for name in wave["hosts"]]
    assert sorted(rolled) == sorted(h["name"] for h in lab)  # every host, once
    for wave in ran:
        for name, gates in wave["checks"].items():
            checks.setdefault(name, set()).update(gates)
    registry = next(h["name"] for h in lab if "registry" in h["groups"])
    assert "registry" in checks[registry]
    for name in _containers(lab):
        assert {"engine", "pull", "mounts"} <= checks[name], (name, checks[name])
    assert "--> " in log  # pyinfra's own progress reaches the terminal
