"""The registry's path spec (the only place paths are made, from validated input) and its
configuration parsing (distribution's format, REGISTRY_* overrides, clear errors)."""

from __future__ import annotations

import pytest
import yaml

from dockyard.registry import paths as p
from dockyard.registry.config import ConfigError, load_config, parse_duration
from dockyard.registry.driver import FilesystemDriver
from dockyard.registry.errors import DigestInvalid, InvalidPath, NameInvalid, TagInvalid

HEX = "ab" * 32
BASE = "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: /srv/registry\n"


def test_layout_matches_distribution() -> None:
    d = p.parse_digest(f"sha256:{HEX}")
    assert p.path_for(p.BlobData(d)) == f"docker/registry/v2/blobs/sha256/ab/{HEX}/data"
    assert (
        p.path_for(p.LayerLink("lib/app", d))
        == f"docker/registry/v2/repositories/lib/app/_layers/sha256/{HEX}/link"
    )
    assert (
        p.path_for(p.RevisionLink("app", d))
        == f"docker/registry/v2/repositories/app/_manifests/revisions/sha256/{HEX}/link"
    )
    assert (
        p.path_for(p.TagCurrentLink("app", "v1.0"))
        == "docker/registry/v2/repositories/app/_manifests/tags/v1.0/current/link"
    )
    assert (
        p.path_for(p.TagIndexLink("app", "v1", d))
        == f"docker/registry/v2/repositories/app/_manifests/tags/v1/index/sha256/{HEX}/link"
    )
    upload = "0f3e7c5a-0000-4000-8000-00000000abcd"
    assert (
        p.path_for(p.UploadStartedAt("app", upload))
        == f"docker/registry/v2/repositories/app/_uploads/{upload}/startedat"
    )


@pytest.mark.parametrize(
    "name", ["../etc", "a/../../b", "UPPER", "a//b", "_uploads", "a/_layers", "x" * 256, ""]
)
def test_names_are_validated_before_any_path(name: str) -> None:
    with pytest.raises(NameInvalid):
        p.path_for(p.RepoRoot(name))


@pytest.mark.parametrize(
    "digest", ["sha256:../../etc", "sha256:" + "a" * 63, "sha1:" + "a" * 40, "sha256:" + "A" * 64]
)
def test_digests_are_validated(digest: str) -> None:
    with pytest.raises(DigestInvalid):
        p.parse_digest(digest)


@pytest.mark.parametrize("tag", ["../x", ".hidden", "a" * 129, "with space", "a/b"])
def test_tags_are_validated(tag: str) -> None:
    with pytest.raises(TagInvalid):
        p.path_for(p.TagRoot("app", tag))


@pytest.mark.parametrize("path", ["../x", "/abs", "a/./b", "a/../b", "a b", "a\x00b"])
def test_driver_refuses_paths_outside_its_root(tmp_path: object, path: str) -> None:
    driver = FilesystemDriver(str(tmp_path))
    with pytest.raises(InvalidPath):
        driver.get_content(path)


def test_driver_put_content_is_atomic_and_leaves_no_temp(tmp_path: object) -> None:
    driver = FilesystemDriver(str(tmp_path))
    driver.put_content("a/b/link", b"one")
    driver.put_content("a/b/link", b"two")
    assert driver.get_content("a/b/link") == b"two"
    assert driver.list("a/b") == ["a/b/link"]


def test_minimal_config_defaults() -> None:
    config = load_config(text=BASE, environ={})
    assert config.rootdirectory == "/srv/registry"
    assert config.addr == ":5000" and config.host_port == ("0.0.0.0", 5000)
    assert config.delete_enabled is False and config.readonly is False
    assert config.purge_enabled and config.purge_age == 168 * 3600
    assert config.purge_interval == 24 * 3600 and config.tls is None


def test_environment_overrides_like_the_registry_image() -> None:
    config = load_config(
        text=BASE,
        environ={
            "REGISTRY_HTTP_TLS_CERTIFICATE": "/certs/registry.crt",
            "REGISTRY_HTTP_TLS_KEY": "/certs/registry.key",
            "REGISTRY_STORAGE_DELETE_ENABLED": "true",
            "REGISTRY_HTTP_ADDR": "127.0.0.1:5443",
            "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": "/var/lib/registry",
        },
    )
    assert config.tls is not None and config.tls.certificate == "/certs/registry.crt"
    assert config.tls.minimum == "tls1.2"
    assert config.delete_enabled is True
    assert config.host_port == ("127.0.0.1", 5443)
    assert config.rootdirectory == "/var/lib/registry"


def test_unknown_keys_warn_and_are_ignored() -> None:
    seen: list[str] = []
    config = load_config(text=BASE + "redis:\n  x: 1\n", environ={}, warn=seen.append)
    assert seen == ["unknown configuration key redis (ignored)"]
    assert config.warnings == seen
    # notifications are read now: only what is unknown inside them is warned about
    seen.clear()
    load_config(text=BASE + "notifications:\n  x: 1\n", environ={}, warn=seen.append)
    assert seen == ["unknown configuration key notifications.x (ignored)"]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"storage": {"filesystem": {}}}, "storage.filesystem.rootdirectory is required"),
        ({"storage": {"delete": {"enabled": "maybe"}}}, "storage.delete.enabled: 'maybe'"),
        ({"health": {"storagedriver": {"threshold": 0}}}, "health.storagedriver.threshold"),
        ({"auth": {"token": {}}}, "auth.token: not supported; valid: htpasswd"),
        ({"storage": {"filesystem": {"rootdirectory": "rel/dir"}}}, "must be an absolute path"),
    ],
)
def test_invalid_values_name_the_key(doc: dict, message: str) -> None:
    base = yaml.safe_load(BASE)
    for key, value in doc.items():
        if key == "storage" and "filesystem" in value:
            base["storage"] = value
        else:
            base.setdefault(key, {}).update(value)
    with pytest.raises(ConfigError) as info:
        load_config(text=yaml.safe_dump(base), environ={})
    assert message in str(info.value)


def test_version_is_required() -> None:
    with pytest.raises(ConfigError, match="version: '0.2' is not supported"):
        load_config(text=BASE.replace("0.1", "0.2"), environ={})


@pytest.mark.parametrize(
    ("text", "seconds"), [("10s", 10.0), ("168h", 604800.0), ("1h30m", 5400.0), ("500ms", 0.5)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "k") == pytest.approx(seconds)
