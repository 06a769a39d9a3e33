"""sync_wheelhouse with a built wheelhouse: one archive upload, unpacked beside the destination
and swapped in, run for real here with sh and tar against a temporary destination."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

from dockyard_deploys import operations
from dockyard_deploys import wheelhouse as wheels
from tests.operations.fakes import FakeHost, FakeInventory, as_current


def _fake_wheelhouse(cache: Path, files: dict[str, bytes]) -> Path:
    target = wheels.wheelhouse_path("3.11", "x86_64", str(cache))
    target.mkdir(parents=True)
    for name, data in files.items():
        (target / name).write_bytes(data)
    (target / ".complete").write_text("ok\n")
    return target


def _commands(cache: Path, dest: Path, digests: dict[str, str]) -> tuple[list, FakeHost]:
    fake = FakeHost({"FileDigests": {"__value__": digests}})
    with as_current(fake, FakeInventory({}), True, False):
        commands = list(
            operations.sync_wheelhouse._inner(
                version="3.11", machine="x86_64", cache=str(cache), dest=str(dest)
            )
        )
    return commands, fake


def _run(commands: list) -> None:
    """The commands as a host runs them: shell commands with sh, the upload as a copy."""
    for command in commands:
        if type(command).__name__ == "FileUploadCommand":
            Path(command.dest).write_bytes(Path(command.src).read_bytes())
        else:
            subprocess.run(["sh", "-c", command.get_raw_value()], check=True)


def test_a_changed_wheelhouse_is_one_upload_swapped_in_whole(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    wanted = {"a-1-py3-none-any.whl": b"a", "pip-26-py3-none-any.whl": b"pip"}
    _fake_wheelhouse(cache, wanted)
    dest = tmp_path / "host" / "opt" / "wheelhouse"
    dest.mkdir(parents=True)
    (dest / "old-0-py3-none-any.whl").write_bytes(b"gone")
    commands, _ = _commands(cache, dest, {"old-0-py3-none-any.whl": "x"})
    uploads = [c for c in commands if type(c).__name__ == "FileUploadCommand"]
    assert len(uploads) == 1  # one upload, whatever the number of wheels
    with tarfile.open(uploads[0].src) as tar:
        assert sorted(tar.getnames()) == sorted(wanted)
        assert {m.uid for m in tar.getmembers()} == {0}
    _run(commands)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == wanted
    assert sorted(p.name for p in dest.parent.iterdir()) == ["wheelhouse"]  # nothing left over
    # the same wheelhouse makes the same archive, byte for byte
    first = hashlib.sha256(Path(uploads[0].src).read_bytes()).hexdigest()
    Path(uploads[0].src).unlink()
    again = wheels.wheelhouse_archive("3.11", "x86_64", str(cache))
    assert hashlib.sha256(again.read_bytes()).hexdigest() == first


def test_a_first_sync_creates_the_parent_and_a_matching_one_is_left_alone(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    wanted = {"a-1-py3-none-any.whl": b"a"}
    _fake_wheelhouse(cache, wanted)
    dest = tmp_path / "host" / "opt" / "dockyard" / "wheelhouse"
    commands, _ = _commands(cache, dest, {})
    _run(commands)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == wanted
    digests = {"a-1-py3-none-any.whl": hashlib.sha256(b"a").hexdigest()}
    commands, fake = _commands(cache, dest, digests)
    assert commands == []
    assert any("holds the wheelhouse (1 files" in n for n in fake.noops)


def test_the_install_runs_pip_from_the_wheelhouse_wheel_or_says_what_is_missing(
    tmp_path: Path,
) -> None:
    from dockyard_deploys.dockyard_core import install_command

    prefix = tmp_path / "opt"
    (prefix / "wheelhouse").mkdir(parents=True)
    (prefix / "venv" / "bin").mkdir(parents=True)
    missing = subprocess.run(
        ["sh", "-c", install_command(str(prefix))], capture_output=True, text=True, check=False
    )
    assert missing.returncode == 1
    assert f"no pip wheel in {prefix}/wheelhouse" in missing.stderr
    # with a wheel there, the venv's python runs pip from inside it (a stand-in records argv)
    (prefix / "wheelhouse" / "pip-26.3-py3-none-any.whl").write_bytes(b"")
    python = prefix / "venv" / "bin" / "python"
    python.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$(dirname "$0")/argv"\n')
    python.chmod(0o755)
    ran = subprocess.run(["sh", "-c", install_command(str(prefix))], check=False)
    assert ran.returncode == 0
    argv = (prefix / "venv" / "bin" / "argv").read_text().split("\n")
    assert argv[0] == f"{prefix}/wheelhouse/pip-26.3-py3-none-any.whl/pip"
    assert argv[1:4] == ["install", "--quiet", "--disable-pip-version-check"]
    assert "--no-index" in argv and argv[-2] == "dockyard"


def test_a_rebuilt_wheelhouse_gets_a_new_archive(tmp_path: Path, monkeypatch: Any) -> None:
    """The wheelhouse of one source hash built again (its directory removed, a dependency
    released since): the archive hosts get is made from the new build, not the cached one."""
    releases = iter(["1.0", "1.1"])

    def fake_pip(cmd: list[str], version: str, machine: str) -> None:
        dest = Path(cmd[cmd.index("-d") + 1])
        release = next(releases)
        with zipfile.ZipFile(dest / f"dep-{release}-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"dep-{release}.dist-info/METADATA", f"Name: dep\nVersion: {release}\n")

    monkeypatch.setattr(wheels, "_pip", fake_pip)
    cache = str(tmp_path / "cache")
    target = wheels.build_wheelhouse("3.11", "x86_64", cache)
    with tarfile.open(wheels.wheelhouse_archive("3.11", "x86_64", cache)) as tar:
        assert "dep-1.0-py3-none-any.whl" in tar.getnames()
    shutil.rmtree(target)
    wheels.build_wheelhouse("3.11", "x86_64", cache)
    with tarfile.open(wheels.wheelhouse_archive("3.11", "x86_64", cache)) as tar:
        names = tar.getnames()
    assert "dep-1.1-py3-none-any.whl" in names and "dep-1.0-py3-none-any.whl" not in names
    assert sorted(names) == sorted(wheels.wheelhouse_digests("3.11", "x86_64", cache))
