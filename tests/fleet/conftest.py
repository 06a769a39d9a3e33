"""Lab end-to-end fixtures: a lab of its own (DOCKYARD_LAB_NAME=dockyard-test, so a user's lab is
left alone), pyinfra run as users run it (the CLI, over ssh, with --json results), and testinfra
hosts reached over ssh with the lab key and strict host-key checking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import testinfra

from dockyard_lab import defaults
from dockyard_lab.molecule import ssh_control_path, ssh_options

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LAB_NAME = "dockyard-test"
ENV = {**os.environ, "DOCKYARD_LAB_NAME": LAB_NAME, "PYTHONUNBUFFERED": "1"}
# Bound on one pyinfra run (a first deploy installs the engine on every host from Debian).
DEPLOY_TIMEOUT = 900


@dataclass
class DeployRun:
    """One `pyinfra --json inventory/lab.py deploy.py -y` run: exit code, results, log."""

    returncode: int
    results: dict[str, Any]
    log: str

    @property
    def totals(self) -> dict[str, int]:
        return self.results.get("totals", {})

    def failures(self) -> str:
        """What an assertion should show: every host error with the operation it belongs to
        (the log's tail shows only skipped operations after a failure), then the tail."""
        lines = self.log.splitlines()
        found: list[str] = []
        operation = ""
        for line in lines:
            if line.startswith("--> Starting operation:"):
                operation = line
            elif "Error" in line or "error" in line or "dockyard:" in line:
                found += [operation, line] if operation not in found else [line]
        return "\n".join(found[-60:]) + "\n--- tail ---\n" + "\n".join(lines[-30:])

    def changed_ops(self) -> list[str]:
        return [op["name"] for op in self.results.get("operations", []) if op["success"]]


def run_deploy(*extra: str, inventory: str | Path = "inventory/lab.py") -> DeployRun:
    proc = subprocess.run(
        [str(BIN / "pyinfra"), "--json", str(inventory), "deploy.py", "-y", *extra],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=DEPLOY_TIMEOUT,
        check=False,
    )
    results: dict[str, Any] = {}
    if proc.stdout.strip():
        results = json.loads(proc.stdout).get("results") or {}
    return DeployRun(proc.returncode, results, proc.stderr)


def _lab(*args: str) -> str:
    proc = subprocess.run(
        [str(BIN / "dockyard-lab"), *args], env=ENV, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"dockyard-lab {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


LAB_INVENTORY = '''
"""Test inventory: the lab's own (inventory/lab.py) with per-host data and groups changed."""
import json, runpy

_OVERRIDES = json.loads({overrides!r})
_JOIN = json.loads({join!r})
_groups = {{
    _key: _value
    for _key, _value in runpy.run_path({lab!r}).items()
    if not _key.startswith("_")
    and isinstance(_value, list)
    and all(isinstance(_m, tuple) and len(_m) == 2 for _m in _value)
}}
_data = {{_name: _values for _members in _groups.values() for _name, _values in _members}}
for _name, _values in _data.items():
    if _values["lab_kind"] == "container":
        _values.update(_OVERRIDES.get("*containers", {{}}))
    _values.update(_OVERRIDES.get(_name, {{}}))
for _group, _names in _JOIN.items():
    _groups.setdefault(_group, []).extend((_name, _data[_name]) for _name in _names)
globals().update(_groups)
'''


def lab_inventory(
    directory: Path,
    overrides: dict[str, dict[str, Any]] | None = None,
    join: dict[str, list[str]] | None = None,
) -> Path:
    """An inventory of the running lab with `overrides` ({host or '*containers': data}) and
    hosts joining more groups (`join`: {group: [host, ...]}); group_data comes from the working
    directory (the checkout), as for inventory/lab.py."""
    path = directory / "lab_inventory.py"
    path.write_text(
        LAB_INVENTORY.format(
            lab=str(ROOT / "inventory" / "lab.py"),
            overrides=json.dumps(overrides or {}),
            join=json.dumps(join or {}),
        )
    )
    return path


# Developers may set DOCKYARD_REUSE_LAB=1 to skip re-creating the test lab, and
# DOCKYARD_KEEP_LAB=1 to leave it running afterwards; CI does neither.
REUSE = bool(os.environ.get("DOCKYARD_REUSE_LAB"))


@pytest.fixture(scope="session")
def lab() -> Any:
    """A fresh test lab (hosts as debootstrap left them, images from the cache)."""
    if not REUSE:
        _lab("down")
    _lab("up")
    hosts = json.loads(_lab("status", "--json"))
    yield hosts
    if not os.environ.get("DOCKYARD_KEEP_LAB"):
        _lab("down")


@pytest.fixture(scope="session")
def first_deploy(lab: list[dict[str, Any]]) -> DeployRun:
    return run_deploy()


@pytest.fixture(scope="session")
def hosts(lab: list[dict[str, Any]], first_deploy: DeployRun) -> dict[str, Any]:
    """testinfra hosts by lab host name, after the first deploy: ssh with the lab key, strict
    host-key checking against the lab's known_hosts, and one multiplexed connection per host."""
    out = {}
    for item in lab:
        out[item["name"]] = testinfra.get_host(
            f"ssh://{item['ssh_user']}@{item['address']}",
            ssh_identity_file=item["ssh_key"],
            ssh_extra_args=" ".join(ssh_options(item["ssh_known_hosts"])),
            # One ssh connection per host, kept 60 s: a new one to an emulated VM costs seconds.
            controlpath=ssh_control_path(
                item["ssh_user"], item["address"], item["ssh_known_hosts"]
            ),
        )
    return out


@pytest.fixture(scope="session")
def btrfs_host(lab: list[dict[str, Any]]) -> str:
    """The lab host inventory/lab.py gives a btrfs data root (the last container; VMs never)."""
    containers = [h for h in lab if h.get("kind", "container") == "container"]
    return str(containers[-1]["name"])


@pytest.fixture(scope="session")
def overlay_host(lab: list[dict[str, Any]], btrfs_host: str) -> str:
    """A host on overlay2 that the failure cases may disturb (and must leave as it was)."""
    return str(next(h["name"] for h in lab if h["name"] != btrfs_host))


# The lab's state directory: its PKI directory (the fleet CA) and the registry's password.
STATE = Path(os.environ.get("DOCKYARD_LAB_DIR") or defaults.lab_state_dir())


@pytest.fixture(scope="session")
def storage(lab: list[dict[str, Any]], first_deploy: DeployRun) -> dict[str, Any]:
    """The lab's storage host (the storage VM in the seed topology), after the first deploy."""
    return next(h for h in lab if "storage" in h["groups"])


@pytest.fixture(scope="session")
def registry(lab: list[dict[str, Any]], first_deploy: DeployRun) -> dict[str, Any]:
    """The lab's registry host (the registry VM in the seed topology), after the first deploy."""
    return next(h for h in lab if "registry" in h["groups"])


@pytest.fixture(scope="session")
def endpoint(registry: dict[str, Any]) -> str:
    return f"{registry['address']}:5443"


@pytest.fixture(scope="session")
def password() -> str:
    return (STATE / f"{LAB_NAME}.registry-password").read_text().strip()
