"""daemon.json's merge rules and the validate/reload-or-restart/verify/rollback script it runs on
the host (the operation's cases are JSON specs: specs/operations/daemon_json.json)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from dockyard_deploys.operations import (
    RELOADABLE_KEYS,
    apply_script,
    merge_config,
    reload_check,
    render_json,
)


def test_merge_keeps_hand_set_keys_and_removes_none() -> None:
    current = {"log-driver": "journald", "storage-opts": ["x=1"], "storage-driver": "vfs"}
    merged = merge_config(current, {"storage-driver": "overlay2", "storage-opts": None})
    assert merged == {"log-driver": "journald", "storage-driver": "overlay2"}
    assert current["storage-driver"] == "vfs"


def test_render_is_deterministic() -> None:
    a = render_json({"b": 1, "a": [1, 2]})
    b = render_json({"a": [1, 2], "b": 1})
    assert a == b and a.endswith("\n") and a.index('"a"') < a.index('"b"')


def test_apply_script_is_valid_shell_and_quotes_values() -> None:
    script = apply_script("/etc/docker/daemon.json", "/tmp/x y", "overlay2", 5)
    assert "new='/tmp/x y'" in script
    assert "@" not in script.replace("2>&1", "")
    subprocess.run(["sh", "-n"], input=script, text=True, check=True)


def test_only_reloadable_keys_changing_gives_a_reload_check() -> None:
    old = {"storage-driver": "overlay2", "insecure-registries": ["a:5000", "10.0.0.0/8"]}
    trust = {
        "storage-driver": "overlay2",
        "insecure-registries": ["http://b:5000/"],
        "registry-mirrors": ["https://m.example"],
        "live-restore": True,
    }
    check = reload_check(old, trust)
    assert check is not None
    assert "grep -qxF -- b:5000 ||" in check  # listed by docker info without the scheme
    assert "! printf '%s\\n' \"$ins\" | grep -qxF -- a:5000 ||" in check  # taken out
    assert "10.0.0.0/8" not in check  # a CIDR may stay covered: not checked as gone
    assert "grep -qxF -- https://m.example/ ||" in check
    assert "'{{.LiveRestoreEnabled}}' 2>/dev/null)\" = true ]" in check
    assert set(RELOADABLE_KEYS) == {"insecure-registries", "registry-mirrors", "live-restore"}
    mirrors_out = reload_check({**old, "registry-mirrors": ["https://m.example/"]}, old)
    assert mirrors_out is not None
    assert "! printf '%s\\n' \"$mir\" | grep -qxF -- https://m.example/ ||" in mirrors_out
    assert reload_check(old, old) is None
    assert reload_check(old, {**trust, "log-opts": {"max-size": "10m"}}) is None
    assert reload_check(old, {**old, "storage-driver": "vfs"}) is None


_STUBS = {
    # `docker info --format …`: the driver, and the insecure registries once a reload applied.
    "docker": """case "$3" in
  *Driver*) echo overlay2 ;;
  *IndexConfigs*) if [ -f "$STATE/applied" ]; then echo b:5000; fi; echo 127.0.0.0/8 ;;
esac""",
    "systemctl": """echo "$*" >> "$STATE/log"
case "$1" in
  show) echo CanReload=yes ;;
  reload) if [ -f "$STATE/reload_works" ]; then touch "$STATE/applied"; fi ;;
esac""",
    "dockerd": "exit 0",
    "journalctl": "exit 0",
    "sleep": "exit 0",
}


@pytest.mark.parametrize("reload_works", [True, False])
def test_a_reload_is_verified_and_falls_back_to_a_restart(
    tmp_path: Path, reload_works: bool
) -> None:
    """The apply script reloads the engine for a trust-only change and checks `docker info`;
    when the new value does not show, it restarts the engine as for any other change."""
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    for name, body in _STUBS.items():
        stub = bin_dir / name
        stub.write_text("#!/bin/sh\n" + body + "\n")
        stub.chmod(0o755)
    if reload_works:
        (state / "reload_works").touch()
    cfg = tmp_path / "daemon.json"
    cfg.write_text('{"storage-driver": "overlay2"}\n')
    staged = tmp_path / "daemon.json.new"
    wanted = {"storage-driver": "overlay2", "insecure-registries": ["b:5000"]}
    staged.write_text(render_json(wanted))
    check = reload_check({"storage-driver": "overlay2"}, wanted)
    script = apply_script(str(cfg), str(staged), "overlay2", 5, check)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STATE": str(state)}
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    calls = (state / "log").read_text().splitlines()
    assert "reload docker.service" in calls
    assert json.loads(cfg.read_text()) == wanted
    if reload_works:
        assert not any(c.startswith("restart") for c in calls), calls
        assert "reloaded the engine (no restart)" in proc.stdout
    else:
        assert "restart docker.service" in calls, calls
        assert "restarting it" in proc.stdout
        assert "storage driver overlay2 is running" in proc.stdout
