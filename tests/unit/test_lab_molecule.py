"""dockyard_lab.molecule without a lab: the instance config and inventory it writes from
`status --json`, its strict ssh options, and converge's `changed` from pyinfra's totals (a fake
pyinfra)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dockyard_lab import molecule

HOSTS: list[dict[str, Any]] = [
    {
        "name": "lab-bookworm",
        "address": "172.20.0.2",
        "release": "bookworm",
        "groups": ["docker_hosts", "storage", "registry"],
        "ssh_user": "root",
        "ssh_key": "/state/id_ed25519",
        "ssh_known_hosts": "/state/lab.known_hosts",
        "state": "running",
        "image": "dockyard-lab:bookworm-x",
        "kind": "container",
    },
    {
        "name": "lab-trixie",
        "address": "172.20.0.3",
        "release": "trixie",
        "groups": ["docker_hosts"],
        "ssh_user": "root",
        "ssh_key": "/state/id_ed25519",
        "ssh_known_hosts": "/state/lab.known_hosts",
        "state": "running",
        "image": "dockyard-lab:trixie-x",
        "kind": "container",
    },
]


def test_ssh_options_are_strict() -> None:
    options = molecule.ssh_options("/state/lab.known_hosts")
    assert "-o UserKnownHostsFile=/state/lab.known_hosts" in options
    assert "-o StrictHostKeyChecking=yes" in options
    assert not any("/dev/null" in o or "=no" in o for o in options)


def test_ssh_control_paths_are_private_and_per_known_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multiplexed connection is reused only for the same user, address and known_hosts
    file (a check with another known_hosts must make its own handshake), in a 0700 directory."""
    monkeypatch.setattr(molecule.tempfile, "gettempdir", lambda: str(tmp_path))
    one = molecule.ssh_control_path("root", "172.20.0.2", "/state/lab.known_hosts")
    assert one == molecule.ssh_control_path("root", "172.20.0.2", "/state/lab.known_hosts")
    others = {
        molecule.ssh_control_path("root", "172.20.0.3", "/state/lab.known_hosts"),
        molecule.ssh_control_path("root", "172.20.0.2", "/tmp/other.known_hosts"),
        molecule.ssh_control_path("admin", "172.20.0.2", "/state/lab.known_hosts"),
    }
    assert one not in others and len(others) == 3
    directory = Path(one).parent
    assert directory.stat().st_mode & 0o777 == 0o700 and len(one) < 100
    directory.chmod(0o755)
    with pytest.raises(PermissionError, match="not a private directory"):
        molecule.ssh_control_path("root", "172.20.0.2", "/state/lab.known_hosts")


def test_instance_config_has_the_delegated_driver_keys() -> None:
    assert molecule.instance_config(HOSTS)[0] == {
        "instance": "lab-bookworm",
        "address": "172.20.0.2",
        "user": "root",
        "port": 22,
        "identity_file": "/state/id_ed25519",
    }


def test_inventory_groups_the_hosts_with_strict_ssh() -> None:
    inventory = molecule.ansible_inventory(HOSTS)["all"]
    assert sorted(inventory["children"]["docker_hosts"]["hosts"]) == ["lab-bookworm", "lab-trixie"]
    assert list(inventory["children"]["registry"]["hosts"]) == ["lab-bookworm"]
    trixie = inventory["hosts"]["lab-trixie"]
    assert trixie["ansible_host"] == "172.20.0.3"
    assert "StrictHostKeyChecking=yes" in trixie["ansible_ssh_common_args"]


def _fake_pyinfra(bin_dir: Path, totals: dict[str, int], rc: int) -> None:
    results = {"results": {"totals": totals, "operations": [{"name": "Op", "success": True}]}}
    script = bin_dir / "pyinfra"
    script.write_text(
        "#!/bin/sh\necho '--> pyinfra log' >&2\n"
        f"cat <<'EOF'\n{json.dumps(results)}\nEOF\nexit {rc}\n"
    )
    script.chmod(0o755)


@pytest.mark.parametrize(("success", "rc", "changed"), [(3, 0, True), (0, 0, False), (0, 1, False)])
def test_converge_reports_changed_from_pyinfra_totals(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    success: int,
    rc: int,
    changed: bool,
) -> None:
    _fake_pyinfra(tmp_path, {"hosts": 1, "success": success, "error": rc, "no_change": 1}, rc)
    monkeypatch.setattr(molecule, "BIN", tmp_path)
    monkeypatch.setenv("MOLECULE_PROJECT_DIRECTORY", str(tmp_path))
    assert molecule.converge() == rc
    out = capsys.readouterr().out
    summary = json.loads(out)  # stdout is one JSON object, for the playbook's changed_when
    assert summary["changed"] is changed
    assert summary["totals"]["success"] == success
