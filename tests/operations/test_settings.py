"""The typed settings per concern: defaults applied once from an empty host, every key read by
exactly one concern and documented in the README with its default, and invalid values refused
with the key, the value and what is valid."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from dockyard_deploys import settings
from dockyard_deploys.settings import PREFIXES, SettingsError, data_keys
from tests.operations.fakes import FakeHost, as_current

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


class _Spy(dict):
    """Host data that records which keys were read."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


@pytest.mark.parametrize("cls", list(PREFIXES), ids=lambda c: c.__name__)
def test_each_concern_builds_from_an_empty_host_and_reads_only_its_keys(cls: Any) -> None:
    data = _Spy()
    built = cls.from_data(data)
    assert built == cls()  # the defaults are the dataclass defaults, nothing else
    assert data.read == set(data_keys(cls))


def _readme_rows() -> dict[str, str]:
    rows = {}
    for line in README.splitlines():
        match = re.match(r"^\| `([a-z_]+)`(?: / `([a-z_]+)`)? \| (.*?) \|", line)
        if match:
            rows[match.group(1)] = match.group(3)
            if match.group(2):
                rows[match.group(2)] = match.group(3)
    return rows


@pytest.mark.parametrize("cls", list(PREFIXES), ids=lambda c: c.__name__)
def test_readme_documents_every_key_with_its_default(cls: Any) -> None:
    rows = _readme_rows()
    for key, spec in zip(data_keys(cls), fields(cls)):
        assert key in rows, f"{key} has no row in the README's tables"
        default = getattr(cls(), spec.name)
        shown = rows[key]
        if isinstance(default, (str, int)) and not isinstance(default, bool) and default != "":
            assert str(default) in shown, (key, default, shown)
        elif isinstance(default, bool):
            assert str(default) in shown, (key, default, shown)
        elif default is None:
            assert "None" in shown, (key, shown)


def test_the_settings_object_is_built_once_per_host() -> None:
    fake = FakeHost({}, {"registry_port": 5000})
    with as_current(fake):
        first = settings.registry()
        fake.data["registry_port"] = 6000
        assert settings.registry() is first and first.port == 5000
    assert settings.registry(FakeHost({}, {"registry_port": 6000})).port == 6000


def test_another_hosts_settings_apply_their_own_defaults() -> None:
    """The fleet's registry endpoint is read from the registry host's settings: its defaults
    apply even while another concern's deploy runs on another host."""
    registry_host = FakeHost({}, {}, name="registry-01")
    assert settings.registry(registry_host).port == 5443
    assert settings.pki(registry_host).pki_dir == "~/.local/share/dockyard/pki"


@pytest.mark.parametrize(
    ("cls", "data", "message"),
    [
        (settings.RegistrySettings, {"registry_port": 70000}, "registry_port=70000 is not valid"),
        (settings.RegistrySettings, {"registry_port": "x"}, "valid: an integer from 1 to 65535"),
        (settings.RegistrySettings, {"registry_log_level": "loud"}, "valid: error, warn, info"),
        (settings.RegistrySettings, {"registry_nfs_backed": "yes"}, "valid: true or false"),
        (settings.RegistrySettings, {"registry_users": {"a:b": "x"}}, "needs a name without ':'"),
        (settings.RegistrySettings, {"registry_data_dir": "srv"}, "valid: an absolute path"),
        (settings.TrustSettings, {"registry_trust_mode": "tofu"}, "valid: certs.d, insecure"),
        (settings.EngineSettings, {"docker_engine_source": "snap"}, "valid: distro, docker-ce"),
        (
            settings.EngineSettings,
            {"docker_engine_version": "latest"},
            "docker_engine_version='latest' is not a version like '24.0.9'",
        ),
        (
            settings.StorageSettings,
            {"docker_storage_driver": "overlay2x"},
            "docker_storage_driver='overlay2x' is not a storage driver; valid: overlay2, btrfs",
        ),
        (
            settings.StorageSettings,
            {"docker_storage_driver": "aufs"},
            "docker_storage_driver='aufs' is never configured",
        ),
        (
            settings.StorageSettings,
            {"docker_storage_opts": ["nokey"]},
            "docker_storage_opts=['nokey'] must be a list of 'key=value' strings",
        ),
        (settings.StorageSettings, {"docker_storage_device_fs": "ext4"}, "valid: xfs, btrfs"),
        (settings.StorageSettings, {"docker_storage_device_size": "4GB"}, "a size like '4G'"),
        (settings.DaemonSettings, {"docker_daemon_options": ["debug"]}, "a mapping"),
        (settings.NfsServerSettings, {"nfs_server_impl": "samba"}, "valid: kernel, ganesha"),
        (
            settings.NfsServerSettings,
            {"nfs_server_exports": [{"path": "/srv/x", "mode": "0777"}]},
            "mode 0777 is world-writable",
        ),
        (
            settings.NfsServerSettings,
            {"nfs_server_exports": [{"path": "/etc"}]},
            "refusing to export /etc",
        ),
        (
            settings.NfsClientSettings,
            {"nfs_client_mounts": [{"src": "nas", "path": "/data"}]},
            "is not server:/path",
        ),
        (settings.PkiSettings, {"registry_names": "reg.example"}, "valid: a list of strings"),
        (settings.CoreSettings, {"dockyard_core_prefix": "opt"}, "valid: an absolute path"),
    ],
)
def test_invalid_values_name_the_key_the_value_and_what_is_valid(
    cls: Any, data: dict[str, Any], message: str
) -> None:
    with pytest.raises(SettingsError) as info:
        cls.from_data(data)
    assert message in str(info.value)
    assert next(iter(data)) in str(info.value)
