"""Lab end to end for `dockyard rollout`: a failure in the second wave (a storage driver the host
cannot run) stops the rollout and leaves the later waves untouched (their daemon.json
unchanged), and `--resume` after the fix finishes from that wave — the two runs together roll
the whole lab out, every other wave passing every gate; a canary failure stops before any other
Docker host changes.

The change rolled out is real (`live-restore` turned off in daemon.json, which the engines
reload; the plain deploy turns it back on afterwards), and the failures are injected per host
through an inventory of the test's own: the lab's groups and data (inventory/lab.py) with a few
keys changed. All the lab's containers get the same `rollout_release`, so the default waves (a
canary of one host per release, 25% of the rest, the rest) are three waves of one host each."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fleet.conftest import BIN, ENV, ROOT, run_deploy

pytestmark = pytest.mark.lab

# Bound on one rollout (every tier's deploy over ssh, the gates after each wave).
ROLLOUT_TIMEOUT = 1800
# The change: data that every rolled-out host's daemon.json shows, and a plain deploy reverts.
CHANGE = {"docker_daemon_live_restore": False}

INVENTORY = '''
"""Test inventory: the running lab (inventory/lab.py) with per-host data changed."""
import json, sys
sys.path.insert(0, {root!r})
from dockyard_lab.inventory import lab_groups

_OVERRIDES = json.loads({overrides!r})
_groups = lab_groups()
for _members in _groups.values():
    for _name, _data in _members:
        if _data["lab_kind"] == "container":
            _data.update(_OVERRIDES.get("*containers", {{}}))
        _data.update(_OVERRIDES.get(_name, {{}}))
globals().update(_groups)
'''


def _containers(lab: list[dict[str, Any]]) -> list[str]:
    """The lab's container Docker hosts in inventory order (the order the waves take them)."""
    return [h["name"] for h in lab if h["kind"] == "container"]


def _inventory(tmp_path: Path, overrides: dict[str, dict[str, Any]]) -> Path:
    """An inventory of the lab with `overrides` ({host or '*containers': data}); group_data
    comes from the working directory (the checkout), as for inventory/lab.py."""
    path = tmp_path / "rollout_inventory.py"
    path.write_text(INVENTORY.format(root=str(ROOT), overrides=json.dumps(overrides)))
    return path


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


def test_a_failure_in_the_second_wave_stops_and_resume_finishes(
    lab: list[dict[str, Any]], hosts: dict[str, Any], tmp_path: Path, restored: None
) -> None:
    first, second, third = _containers(lab)
    same_release = {"rollout_release": "lab", **CHANGE}
    # The second wave's host is asked for a storage driver its kernel cannot run: its deploy
    # fails there (and leaves the host as it was).
    broken = _inventory(
        tmp_path, {"*containers": same_release, second: {"docker_storage_driver": "zfs"}}
    )
    code, result, log = _rollout(broken)
    assert code == 1, log[-6000:]
    assert result["ok"] is False
    docker_waves = [w for w in result["waves"] if w["tier"] == "docker_hosts"]
    assert [w["hosts"] for w in docker_waves] == [[first], [second]]
    assert [w["passed"] for w in docker_waves] == [True, False]
    assert docker_waves[1]["failures"][second]  # named with what failed on it
    assert result["untouched"] == [third]
    assert second in log and "zfs" in log
    assert _changed(hosts[first])
    assert not _changed(hosts[second])  # its failed deploy left daemon.json as it was
    assert not _changed(hosts[third])  # the third wave never ran

    fixed = _inventory(tmp_path, {"*containers": same_release})
    code, resumed, log = _rollout(fixed, "--resume")
    assert code == 0, log[-6000:]
    assert resumed["ok"] is True and resumed["untouched"] == []
    ran = [w for w in resumed["waves"] if not w["previous"]]
    assert [w["hosts"] for w in ran] == [[second], [third]]  # from the failed wave on
    assert all(w["passed"] and not w["failures"] for w in resumed["waves"])
    for name in (first, second, third):
        assert _changed(hosts[name]), name

    # Across the two runs the whole lab rolled out, tier by tier, and passed every gate.
    tiers = [w["tier"] for w in resumed["waves"]]
    assert tiers[:2] == ["storage", "registry"] and set(tiers[2:]) == {"docker_hosts"}
    rolled = [name for wave in resumed["waves"] for name in wave["hosts"]]
    assert sorted(rolled) == sorted(h["name"] for h in lab)  # every host, once
    checks: dict[str, set[str]] = {}
    for wave in result["waves"] + ran:
        for name, gates in wave["checks"].items():
            checks.setdefault(name, set()).update(gates)
    registry = next(h["name"] for h in lab if "registry" in h["groups"])
    assert "registry" in checks[registry]
    for name in _containers(lab):
        assert {"engine", "pull", "mounts"} <= checks[name], (name, checks[name])
    assert "--> " in log  # pyinfra's own progress reaches the terminal


def test_a_canary_failure_stops_before_any_other_docker_host_changes(
    lab: list[dict[str, Any]], hosts: dict[str, Any], tmp_path: Path, restored: None
) -> None:
    first, second, third = _containers(lab)
    before = {n: hosts[n].file("/etc/docker/daemon.json").content_string for n in _containers(lab)}
    # The canary is asked for a storage driver its kernel cannot run: the deploy refuses it.
    inventory = _inventory(
        tmp_path,
        {
            "*containers": {"rollout_release": "lab", **CHANGE},
            first: {"docker_storage_driver": "zfs"},
        },
    )
    code, result, log = _rollout(inventory)
    assert code == 1, log[-6000:]
    canary = [w for w in result["waves"] if w["tier"] == "docker_hosts"]
    assert [w["hosts"] for w in canary] == [[first]] and canary[0]["passed"] is False
    assert result["untouched"] == [second, third]
    for name in (first, second, third):
        assert hosts[name].file("/etc/docker/daemon.json").content_string == before[name], name
    # the state is kept for --resume, in the working directory
    assert result["state"] and Path(result["state"]).is_file()
    Path(result["state"]).unlink()
