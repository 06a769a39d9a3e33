"""daemon.json's merge rules and the validate/restart/verify/rollback script it runs on the host
(the operation's cases are JSON specs: specs/operations/daemon_json.json)."""

from __future__ import annotations

import subprocess

from dockyard_deploys.operations import apply_script, merge_config, render_json


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
