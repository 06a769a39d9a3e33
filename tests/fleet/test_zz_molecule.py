"""`molecule test` (molecule/default: the delegated driver over the lab) on the fleet test lab,
last: pytest collects a directory's modules in name order, so this module (`test_zz_…`) runs
after every other fleet test, on the lab they leave running (create is `dockyard-lab up`, which
keeps it as it is: the lab is not built twice), and its destroy brings the lab down (the session
fixture's own `down` then finds nothing to remove), leaving nothing of the VMs behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dockyard_lab import defaults, vm
from tests.fleet.conftest import BIN, ENV, LAB_NAME, ROOT

pytestmark = pytest.mark.lab
# Bound on the whole scenario: two deploys over the test lab (its VMs are slow), the checks.
MOLECULE_TIMEOUT = 3600


def _molecule(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in ENV.items() if k != "DOCKYARD_LAB_UP_ARGS"}  # the lab's default
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # molecule runs ansible-config
    env["NO_COLOR"] = "1"
    return subprocess.run(
        [str(BIN / "molecule"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=MOLECULE_TIMEOUT,
        check=False,
    )


def test_molecule_test_converges_idempotently_verifies_and_destroys(
    lab: list[dict[str, Any]],
) -> None:
    # Molecule's own state of an interrupted earlier run would make it skip create.
    assert _molecule("reset").returncode == 0
    keep = bool(os.environ.get("DOCKYARD_KEEP_LAB"))
    proc = _molecule("test", *(["--destroy", "never"] if keep else []))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    for step in ("idempotence", "verify"):  # "[default > step] Executed: Successful"
        assert re.search(rf"\b{step}[]:] Executed: Successful", out), out[-8000:]
    if keep:
        return
    status = subprocess.run(
        [str(BIN / "dockyard-lab"), "status", "--json"],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(status.stdout) == [], "molecule destroy left lab hosts"
    # Nothing of the VMs outlives `dockyard-lab down` (molecule's destroy): no qemu process
    # naming the lab's VM directory, no tap device, no overlay or seed disk; the cached images
    # stay for the next lab.
    vm_dir = defaults.lab_state_dir() / f"{LAB_NAME}-vms"
    assert _processes_naming(str(vm_dir)) == []
    for item in (h for h in lab if h["kind"] == "vm"):
        assert not Path("/sys/class/net", vm.tap_name(item["name"])).exists(), item["name"]
        assert Path(item["image"]).is_file()
    assert not vm_dir.exists()


def _processes_naming(marker: str) -> list[int]:
    """Every process whose command line contains `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found
