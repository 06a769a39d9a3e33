"""The daemon.json operation: merge rules, when it changes nothing, what it sends, and the
validate/restart/verify/rollback script it runs on the host."""

from __future__ import annotations

import json
import subprocess
from io import StringIO
from typing import Any

from pyinfra.api import FileUploadCommand, StringCommand

from dockyard_deploys.facts import DockerEngine, JsonFile
from dockyard_deploys.operations import apply_script, daemon_json, merge_config, render_json
from tests.operations.fakes import FakeHost, as_current

RUNNING_OVERLAY2 = ["Docker version 20.10.24+dfsg1, build 297e128", "overlay2|/var/lib/docker|0|0"]


def _run(fake: FakeHost, keys: dict[str, Any], driver: str | None) -> list[Any]:
    with as_current(fake):
        assert keys.get("storage-driver") == driver  # the driver comes from the managed keys
        return list(daemon_json._inner(keys=lambda current: keys))


def test_merge_keeps_hand_set_keys_and_removes_none() -> None:
    current = {"log-driver": "journald", "storage-opts": ["x=1"], "storage-driver": "vfs"}
    merged = merge_config(current, {"storage-driver": "overlay2", "storage-opts": None})
    assert merged == {"log-driver": "journald", "storage-driver": "overlay2"}
    assert current["storage-driver"] == "vfs"


def test_render_is_deterministic() -> None:
    a = render_json({"b": 1, "a": [1, 2]})
    b = render_json({"a": [1, 2], "b": 1})
    assert a == b and a.endswith("\n") and a.index('"a"') < a.index('"b"')


def test_no_change_when_equal_and_engine_healthy() -> None:
    fake = FakeHost(
        {
            JsonFile: ["__exists__", '{"storage-driver": "overlay2", "debug": true}'],
            DockerEngine: RUNNING_OVERLAY2,
        }
    )
    assert _run(fake, {"storage-driver": "overlay2", "storage-opts": None}, "overlay2") == []
    assert fake.noops and "up to date" in fake.noops[0]


def test_change_uploads_merged_file_and_runs_the_apply_script() -> None:
    fake = FakeHost({JsonFile: ["__exists__", '{"debug": true}'], DockerEngine: RUNNING_OVERLAY2})
    commands = _run(fake, {"storage-driver": "overlay2"}, "overlay2")
    assert isinstance(commands[0], StringCommand)
    upload = commands[1]
    assert isinstance(upload, FileUploadCommand)
    assert upload.dest == "/etc/docker/daemon.json.dockyard-new"
    assert isinstance(upload.src, StringIO)
    assert json.loads(upload.src.getvalue()) == {"debug": True, "storage-driver": "overlay2"}
    script = str(commands[2])
    assert "dockerd --validate" in script and "want=overlay2" in script


def test_engine_not_running_with_same_file_is_restarted() -> None:
    fake = FakeHost(
        {
            JsonFile: ["__exists__", '{"storage-driver": "btrfs"}'],
            DockerEngine: ["Docker version 26.1.5+dfsg1, build a72d7cd"],
        }
    )
    commands = _run(fake, {"storage-driver": "btrfs"}, "btrfs")
    assert len(commands) == 3


def test_invalid_json_fails_the_host_and_leaves_the_file() -> None:
    fake = FakeHost({JsonFile: ["__exists__", "{oops"], DockerEngine: RUNNING_OVERLAY2})
    commands = _run(fake, {"storage-driver": "overlay2"}, "overlay2")
    assert len(commands) == 1
    text = str(commands[0])
    assert "is not valid JSON" in text and "exit 1" in text


def test_refused_storage_leaves_daemon_json_alone() -> None:
    fake = FakeHost({JsonFile: ["__exists__", "{}"], DockerEngine: RUNNING_OVERLAY2})
    assert _run(fake, {}, None) == []
    assert "refused" in fake.noops[0]


def test_apply_script_is_valid_shell_and_quotes_values() -> None:
    script = apply_script("/etc/docker/daemon.json", "/tmp/x y", "overlay2", 5)
    assert "new='/tmp/x y'" in script
    assert "@" not in script.replace("2>&1", "")
    subprocess.run(["sh", "-n"], input=script, text=True, check=True)
