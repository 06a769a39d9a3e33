"""Tiers 2 and 3 from fake facts and data (kernel NFS cannot run here): export plans per distro,
the rendered /etc/exports and ganesha.conf, fstab mount plans, the server implementation choice,
registry trust's daemon.json keys, and htpasswd that a second run leaves as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bcrypt
import jinja2
import pytest
from pyinfra.api import DeployError

from dockyard_deploys import registry_trust
from dockyard_deploys.common import Distro
from dockyard_deploys.facts import KernelNfs
from dockyard_deploys.nfs_server import choose_impl
from dockyard_deploys.nfs_server import plan_exports as _plan_exports
from dockyard_deploys.registry import htpasswd_content
from dockyard_deploys.settings import NfsClientSettings, NfsMount, NfsServerSettings, SettingsError

TEMPLATES = Path(__file__).resolve().parents[2] / "dockyard_deploys" / "templates"
FLEET = ["10.1.0.11", "10.1.0.12"]


def plan_exports(d: Distro, data: dict[str, Any], clients: list[str]) -> Any:
    return _plan_exports(d, NfsServerSettings.from_data(data), clients)


def plan_mounts(data: dict[str, Any]) -> list[NfsMount]:
    return list(NfsClientSettings.from_data(data).mounts)


def distro(distro_id: str, version: str) -> Distro:
    return Distro.from_fact(
        {
            "name": distro_id,
            "major": int(version.split(".")[0]),
            "release_meta": {"ID": distro_id, "VERSION_ID": version},
        }
    )


@pytest.mark.parametrize(
    ("d", "owner", "group"),
    [
        (distro("debian", "12"), "nobody", "nogroup"),
        (distro("ubuntu", "24.04"), "nobody", "nogroup"),
        (distro("centos", "7"), "nfsnobody", "nfsnobody"),
        (distro("rocky", "9.4"), "nobody", "nobody"),
    ],
)
def test_export_defaults_per_distro(d: Distro, owner: str, group: str) -> None:
    (export,) = plan_exports(d, {"nfs_server_exports": [{"path": "/srv/exports/registry/"}]}, FLEET)
    assert (export.path, export.owner, export.group, export.mode) == (
        "/srv/exports/registry",
        owner,
        group,
        "0750",
    )
    assert export.clients == FLEET
    assert export.options == "rw,sync,all_squash,no_subtree_check,anonuid=65534,anongid=65534"
    assert (export.squash, export.access, export.anonuid) == ("All_Squash", "RW", 65534)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"path": "/srv/x", "mode": "0777"}, "mode 0777 is world-writable"),
        ({"path": "/srv/x", "mode": "1777"}, "world-writable"),
        ({"path": "relative"}, "needs an absolute path"),
        ({"path": "/etc"}, "refusing to export /etc"),
        ({"path": "/srv/x", "clients": ["a b"]}, "client 'a b' is not a host, IP or CIDR"),
        ({"path": "/srv/x", "options": "rw,evil option"}, "option 'evil option' is not valid"),
        ({"path": "/srv/x", "mode": "rwx"}, "mode 'rwx' is not an octal mode"),
    ],
)
def test_bad_exports_are_clear_errors(item: dict[str, Any], message: str) -> None:
    with pytest.raises(DeployError, match=message):
        plan_exports(distro("debian", "12"), {"nfs_server_exports": [item]}, FLEET)


def test_exports_and_ganesha_render() -> None:
    exports = plan_exports(
        distro("debian", "12"),
        {
            "nfs_server_exports": [
                {"path": "/srv/exports/registry"},
                {
                    "path": "/srv/exports/ro",
                    "clients": ["10.1.0.0/24"],
                    "options": "ro,root_squash",
                },
            ]
        },
        FLEET,
    )
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)))
    table = env.get_template("exports.j2").render(exports=exports)
    assert (
        "/srv/exports/registry 10.1.0.11(rw,sync,all_squash,no_subtree_check,anonuid=65534,"
        "anongid=65534) 10.1.0.12(rw,sync,all_squash,no_subtree_check,anonuid=65534,"
        "anongid=65534)"
    ) in table
    assert "/srv/exports/ro 10.1.0.0/24(ro,root_squash)" in table
    ganesha = env.get_template("ganesha.conf.j2").render(exports=exports, graceless=True)
    assert ganesha.count("EXPORT {") == 2
    assert "Clients = 10.1.0.11, 10.1.0.12;" in ganesha
    assert "Squash = All_Squash;" in ganesha and "Squash = Root_Squash;" in ganesha
    assert "Access_Type = RO;" in ganesha and "Name = VFS;" in ganesha


@pytest.mark.parametrize(
    ("output", "server", "client"),
    [
        (["server=no client=no"], False, False),
        (["server=module client=yes"], True, True),
        (["server=yes client=module"], True, True),
    ],
)
def test_kernel_nfs_fact(output: list[str], server: bool, client: bool) -> None:
    assert KernelNfs().process(output) == {"server": server, "client": client}


def test_server_implementation_choice() -> None:
    assert choose_impl(None, kernel_server=True) == "kernel"
    assert choose_impl(None, kernel_server=False) == "ganesha"
    assert choose_impl("ganesha", kernel_server=True) == "ganesha"
    with pytest.raises(DeployError, match="this kernel has no NFS server"):
        choose_impl("kernel", kernel_server=False)
    with pytest.raises(SettingsError, match="valid: kernel, ganesha"):
        NfsServerSettings.from_data({"nfs_server_impl": "knfsd"})


def test_mount_plans() -> None:
    (mount,) = plan_mounts(
        {
            "nfs_client_mounts": [
                {"src": "10.1.0.11:/srv/exports/registry", "path": "/mnt/registry/"}
            ]
        }
    )
    assert mount.fstab_line == (
        "10.1.0.11:/srv/exports/registry /mnt/registry nfs4 rw,hard,noatime,_netdev 0 0"
    )
    (own,) = plan_mounts(
        {"nfs_client_mounts": [{"src": "nas:/vol", "path": "/data", "options": "ro,soft"}]}
    )
    assert own.options == "ro,soft,_netdev"


@pytest.mark.parametrize(
    ("mounts", "message"),
    [
        ([{"src": "nas", "path": "/data"}], "is not server:/path"),
        ([{"src": "nas:/v", "path": "data"}], "must be an absolute path"),
        ([{"src": "nas:/v", "path": "/d", "fstype": "cifs"}], "valid: nfs, nfs4"),
        ([{"src": "nas:/v", "path": "/d"}, {"src": "nas:/w", "path": "/d"}], "listed twice"),
        ([{"src": "nas:/v", "path": "/d", "options": "rw;reboot"}], "are not valid"),
    ],
)
def test_bad_mounts_are_clear_errors(mounts: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(DeployError, match=message):
        plan_mounts({"nfs_client_mounts": mounts})


@pytest.mark.parametrize(
    ("mode", "current", "expected"),
    [
        ("certs.d", {}, {}),
        ("insecure", {}, {"insecure-registries": ["10.1.0.11:5443"]}),
        ("insecure", {"insecure-registries": ["10.1.0.11:5443"]}, {}),
        (
            "insecure",
            {"insecure-registries": ["old:5000"]},
            {"insecure-registries": ["old:5000", "10.1.0.11:5443"]},
        ),
        (
            "certs.d",
            {"insecure-registries": ["old:5000", "10.1.0.11:5443"]},
            {"insecure-registries": ["old:5000"]},
        ),
        ("certs.d", {"insecure-registries": ["10.1.0.11:5443"]}, {"insecure-registries": None}),
    ],
)
def test_trust_daemon_keys(
    monkeypatch: pytest.MonkeyPatch, mode: str, current: dict[str, Any], expected: dict[str, Any]
) -> None:
    monkeypatch.setattr(registry_trust, "registry_endpoint", lambda: "10.1.0.11:5443")
    monkeypatch.setattr(registry_trust, "trust_mode", lambda: mode)
    monkeypatch.setattr(registry_trust, "legacy_sysconfig", lambda: False)
    assert registry_trust.daemon_keys(current) == expected


def test_legacy_rhel_engine_uses_sysconfig_not_daemon_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_trust, "registry_endpoint", lambda: "10.1.0.11:5443")
    monkeypatch.setattr(registry_trust, "trust_mode", lambda: "insecure")
    monkeypatch.setattr(registry_trust, "legacy_sysconfig", lambda: True)
    assert registry_trust.daemon_keys({}) == {}


def test_htpasswd_is_bcrypt_and_stable() -> None:
    first = htpasswd_content({"fleet": "s3cret", "ci": "other"}, "")
    lines = dict(line.split(":", 1) for line in first.splitlines())
    assert set(lines) == {"fleet", "ci"}
    assert all(h.startswith("$2b$") for h in lines.values())
    assert bcrypt.checkpw(b"s3cret", lines["fleet"].encode())
    assert htpasswd_content({"fleet": "s3cret", "ci": "other"}, first) == first
    changed = htpasswd_content({"fleet": "new"}, first)
    assert "ci:" not in changed and changed != first
    with pytest.raises(DeployError, match="needs a name without ':'"):
        htpasswd_content({"a:b": "x"}, "")


def test_htpasswd_takes_passwords_longer_than_72_bytes() -> None:
    """bcrypt uses the first 72 bytes (bcrypt 5 raises on more): the deploy hashes those, as
    the registry checks them, and a second run keeps the line."""
    password = "p" * 72 + "-and-more"
    first = htpasswd_content({"ci": password}, "")
    hashed = first.split(":", 1)[1].strip().encode()
    assert bcrypt.checkpw(b"p" * 72, hashed)
    assert htpasswd_content({"ci": password}, first) == first
