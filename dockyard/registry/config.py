"""The registry's configuration: CNCF distribution's `config.yml` format (the subset dockyard
serves), `REGISTRY_<PATH>` environment overrides as the registry image has them, warnings for
unknown keys and a clear error naming the key for every invalid value."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import yaml


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key and what is valid."""


# Every key dockyard reads, with its parser (others are warned about and ignored).
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)$")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, key: str) -> float:
    """Go-style duration ("168h", "10s", "1h30m") in seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) / 1e9  # Go reads a bare integer as nanoseconds
    text = str(value).strip()
    total = 0.0
    for part in re.findall(r"\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h)", text):
        number, unit = _DURATION.match(part).groups()  # type: ignore[union-attr]
        total += float(number) * _UNITS[unit]
    if not text or "".join(re.findall(r"\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h)", text)) != text:
        raise ConfigError(f"{key}: {value!r} is not a duration (like 10s, 24h, 1h30m)")
    return total


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{key}: {value!r} is not a boolean (true or false)")


def _int(value: Any, key: str, minimum: int = 0) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: {value!r} is not a whole number") from exc
    if isinstance(value, bool) or number < minimum:
        raise ConfigError(f"{key}: {value!r} must be a whole number of at least {minimum}")
    return number


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: {value!r} must be a non-empty string")
    return value


@dataclass
class TLSConfig:
    certificate: str
    key: str
    clientcas: list[str] = field(default_factory=list)
    minimum: str = "tls1.2"


@dataclass
class RegistryConfig:
    rootdirectory: str
    addr: str = ":5000"
    log_level: str = "info"
    delete_enabled: bool = False
    readonly: bool = False
    headers: dict[str, list[str]] = field(default_factory=dict)
    tls: Optional[TLSConfig] = None
    htpasswd_realm: Optional[str] = None
    htpasswd_path: Optional[str] = None
    purge_enabled: bool = True
    purge_age: float = 168 * 3600.0
    purge_interval: float = 24 * 3600.0
    purge_dryrun: bool = False
    health_enabled: bool = False
    health_interval: float = 10.0
    health_threshold: int = 1
    warnings: list[str] = field(default_factory=list)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.addr.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)


# Keys that are valid in distribution's format and read here; a dotted path per key.
KNOWN: set[str] = {
    "version",
    "log",
    "log.level",
    "log.formatter",
    "log.fields",
    "log.accesslog",
    "log.accesslog.disabled",
    "storage",
    "storage.filesystem",
    "storage.filesystem.rootdirectory",
    "storage.filesystem.maxthreads",
    "storage.delete",
    "storage.delete.enabled",
    "storage.cache",
    "storage.cache.blobdescriptor",
    "storage.maintenance",
    "storage.maintenance.uploadpurging",
    "storage.maintenance.uploadpurging.enabled",
    "storage.maintenance.uploadpurging.age",
    "storage.maintenance.uploadpurging.interval",
    "storage.maintenance.uploadpurging.dryrun",
    "storage.maintenance.readonly",
    "storage.maintenance.readonly.enabled",
    "http",
    "http.addr",
    "http.net",
    "http.secret",
    "http.debug",
    "http.debug.addr",
    "http.headers",
    "http.tls",
    "http.tls.certificate",
    "http.tls.key",
    "http.tls.clientcas",
    "http.tls.minimumtls",
    "auth",
    "auth.htpasswd",
    "auth.htpasswd.realm",
    "auth.htpasswd.path",
    "health",
    "health.storagedriver",
    "health.storagedriver.enabled",
    "health.storagedriver.interval",
    "health.storagedriver.threshold",
}
_FREEFORM = ("http.headers", "log.fields")


def _walk(doc: Mapping[str, Any], prefix: str = "") -> list[str]:
    unknown = []
    for key, value in doc.items():
        path = f"{prefix}{key}".lower()
        if path not in KNOWN:
            unknown.append(path)
            continue
        if isinstance(value, Mapping) and path not in _FREEFORM:
            unknown += _walk(value, f"{path}.")
    return unknown


def _apply_env(doc: dict[str, Any], environ: Mapping[str, str]) -> None:
    """REGISTRY_HTTP_TLS_CERTIFICATE=... sets http.tls.certificate (as the registry image)."""
    for name, value in sorted(environ.items()):
        if not name.startswith("REGISTRY_") or name == "REGISTRY_CONFIGURATION_PATH":
            continue
        parts = name[len("REGISTRY_") :].lower().split("_")
        node = doc
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = yaml.safe_load(value) if value else value


def _get(doc: Mapping[str, Any], path: str, default: Any = None) -> Any:
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def load_config(
    path: Optional[str] = None,
    text: Optional[str] = None,
    environ: Optional[Mapping[str, str]] = None,
    warn: Callable[[str], None] = lambda message: None,
) -> RegistryConfig:
    """Read, override from the environment and validate a distribution-format config."""
    if text is None:
        if path is None:
            raise ConfigError("no configuration given (--config config.yml)")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path or 'config'} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError("the configuration must be a mapping of keys")
    _apply_env(doc, os.environ if environ is None else environ)

    warnings = []
    for key in _walk(doc):
        message = f"unknown configuration key {key} (ignored)"
        warnings.append(message)
        warn(message)

    version = str(_get(doc, "version", ""))
    if version != "0.1":
        raise ConfigError(f"version: {version!r} is not supported; valid: '0.1'")
    root = _get(doc, "storage.filesystem.rootdirectory")
    if root is None:
        raise ConfigError("storage.filesystem.rootdirectory is required (only filesystem storage)")
    root = _str(root, "storage.filesystem.rootdirectory")
    if not os.path.isabs(root):
        raise ConfigError(f"storage.filesystem.rootdirectory: {root!r} must be an absolute path")
    level = str(_get(doc, "log.level", "info")).lower()
    if level not in ("error", "warn", "info", "debug"):
        raise ConfigError(f"log.level: {level!r} is not valid; valid: error, warn, info, debug")
    addr = str(_get(doc, "http.addr", ":5000"))
    match = re.match(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]*):(\d{1,5})$", addr)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"http.addr: {addr!r} is not host:port (like :5000 or 127.0.0.1:5000)")

    headers_doc = _get(doc, "http.headers", {}) or {}
    if not isinstance(headers_doc, Mapping):
        raise ConfigError("http.headers must map header names to lists of values")
    headers: dict[str, list[str]] = {}
    for name, values in headers_doc.items():
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ConfigError(f"http.headers.{name}: must be a list of strings")
        headers[str(name)] = list(values)

    tls = None
    tls_doc = _get(doc, "http.tls")
    if tls_doc:
        if not isinstance(tls_doc, Mapping):
            raise ConfigError("http.tls must be a mapping")
        minimum = str(tls_doc.get("minimumtls") or "tls1.2").lower()
        if minimum not in ("tls1.2", "tls1.3"):
            raise ConfigError(
                f"http.tls.minimumtls: {minimum!r} is not allowed; valid: tls1.2, tls1.3 "
                "(TLS 1.0 and 1.1 are never served)"
            )
        cas = tls_doc.get("clientcas") or []
        if isinstance(cas, str):
            cas = [cas]
        tls = TLSConfig(
            certificate=_str(tls_doc.get("certificate"), "http.tls.certificate"),
            key=_str(tls_doc.get("key"), "http.tls.key"),
            clientcas=[_str(c, "http.tls.clientcas") for c in cas],
            minimum=minimum,
        )

    htpasswd = _get(doc, "auth.htpasswd")
    realm = path_ = None
    if htpasswd is not None:
        if not isinstance(htpasswd, Mapping):
            raise ConfigError("auth.htpasswd must have realm and path")
        realm = _str(htpasswd.get("realm"), "auth.htpasswd.realm")
        path_ = _str(htpasswd.get("path"), "auth.htpasswd.path")
    if isinstance(_get(doc, "auth"), Mapping):
        others = [k for k in _get(doc, "auth") if k != "htpasswd"]
        if others:
            raise ConfigError(f"auth.{others[0]}: not supported; valid: htpasswd")

    purge = "storage.maintenance.uploadpurging"
    health = "health.storagedriver"
    return RegistryConfig(
        rootdirectory=root,
        addr=addr,
        log_level=level,
        delete_enabled=_bool(_get(doc, "storage.delete.enabled", False), "storage.delete.enabled"),
        readonly=_bool(
            _get(doc, "storage.maintenance.readonly.enabled", False),
            "storage.maintenance.readonly.enabled",
        ),
        headers=headers,
        tls=tls,
        htpasswd_realm=realm,
        htpasswd_path=path_,
        purge_enabled=_bool(_get(doc, f"{purge}.enabled", True), f"{purge}.enabled"),
        purge_age=parse_duration(_get(doc, f"{purge}.age", "168h"), f"{purge}.age"),
        purge_interval=parse_duration(_get(doc, f"{purge}.interval", "24h"), f"{purge}.interval"),
        purge_dryrun=_bool(_get(doc, f"{purge}.dryrun", False), f"{purge}.dryrun"),
        health_enabled=_bool(_get(doc, f"{health}.enabled", False), f"{health}.enabled"),
        health_interval=parse_duration(
            _get(doc, f"{health}.interval", "10s"), f"{health}.interval"
        ),
        health_threshold=_int(_get(doc, f"{health}.threshold", 1), f"{health}.threshold", 1),
        warnings=warnings,
    )
