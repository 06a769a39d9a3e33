"""The lab's pure parts: topology planning, image recipes and their cache keys, the mirror read
from apt sources, and the CLI's errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from dockyard_lab import cli, defaults, fleet, images


def test_default_plan_is_one_host_per_release_first_host_carries_the_roles() -> None:
    plan = fleet.plan(3, defaults.LAB_RELEASES)
    assert [release for _, release, _ in plan] == ["bullseye", "bookworm", "trixie"]
    assert plan[0][2] == ("docker_hosts", "storage", "registry")
    assert all(groups == ("docker_hosts",) for _, _, groups in plan[1:])
    assert [name for name, _, _ in plan] == [
        f"{defaults.LAB_NAME}-bullseye",
        f"{defaults.LAB_NAME}-bookworm",
        f"{defaults.LAB_NAME}-trixie",
    ]


def test_larger_lab_cycles_releases_with_unique_names() -> None:
    plan = fleet.plan(5, ["bookworm", "trixie"])
    names = [name for name, _, _ in plan]
    assert len(set(names)) == 5
    assert [r for _, r, _ in plan] == ["bookworm", "trixie", "bookworm", "trixie", "bookworm"]


@pytest.mark.parametrize(("hosts", "releases"), [(0, ["bookworm"]), (2, ["jessie"]), (1, [])])
def test_bad_plans_are_refused(hosts: int, releases: list[str]) -> None:
    with pytest.raises(ValueError):
        fleet.plan(hosts, releases)


def test_image_ref_is_stable_and_follows_the_recipe() -> None:
    a = images.image_ref("bookworm", "http://deb.debian.org/debian")
    assert a == images.image_ref("bookworm", "http://deb.debian.org/debian")
    assert a.startswith(f"{defaults.LAB_IMAGE_REPO}:bookworm-")
    assert a != images.image_ref("bookworm", "http://mirror.example/debian")
    assert a != images.image_ref("trixie", "http://deb.debian.org/debian")


def test_mirror_from_deb822_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.local/debian\nSuites: bookworm\n"
        "Types: deb\nURIs: http://mirror.local/debian-security\n"
    )
    assert images.debian_mirror(tmp_path) == "http://mirror.local/debian"


def test_mirror_from_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64] http://ftp.local/debian/ bookworm main\n"
    )
    assert images.debian_mirror(tmp_path) == "http://ftp.local/debian"


def test_mirror_default_when_none_found(tmp_path: Path) -> None:
    assert images.debian_mirror(tmp_path) == defaults.DEBIAN_MIRROR


def test_customise_removes_host_keys_and_enables_first_boot_unit(tmp_path: Path) -> None:
    root = tmp_path
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("secret")
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/local/sbin").mkdir(parents=True)
    (root / "root").mkdir()
    images._customise(root)
    assert not list((root / "etc/ssh").glob("ssh_host_*"))
    link = root / "etc/systemd/system/sysinit.target.wants/dockyard-lab-init.service"
    assert link.is_symlink()
    assert (root / "usr/local/sbin/dockyard-lab-init").stat().st_mode & 0o111
    assert (root / "etc/machine-id").read_text() == ""
    for unit in ("console-getty.service", "systemd-udevd.service"):
        assert (root / "etc/systemd/system" / unit).resolve() == Path("/dev/null")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["up", "--hosts", "0"], "'0' is not a whole number of at least 1"),
        (["up", "--releases", "buster"], "unknown release(s) buster; valid: bullseye"),
        (["sideways"], "invalid choice: 'sideways'"),
    ],
)
def test_cli_bad_input_is_a_clear_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["lab", "up"], ["lab", "status", "--json"], ["lab"]])
def test_the_core_cli_points_at_dockyard_lab(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Hosts install the core alone: `dockyard lab …` is one line naming `dockyard-lab`."""
    from dockyard import cli as core_cli

    assert core_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("dockyard: error: the lab is not part of the core; run `dockyard-lab ")
