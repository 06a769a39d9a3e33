"""The registry's configuration: CNCF distribution's `config.yml` format (the subset dockyard
serves), `REGISTRY_<PATH>` environment overrides as the registry image has them, warnings for
unknown keys and a clear error naming the key for every invalid value."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

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


_ADDR = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]*):(\d{1,5})$")


def _addr(value: Any, key: str) -> str:
    addr = str(value)
    match = _ADDR.match(addr)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"{key}: {addr!r} is not host:port (like :5000 or 127.0.0.1:5000)")
    return addr


def split_addr(addr: str) -> tuple[str, int]:
    """(host, port) of a validated `host:port`; an empty host is every IPv4 address."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def _headers(value: Any, key: str) -> dict[str, list[str]]:
    """A header map as distribution has it: each name maps to a list of values (a lone string
    is taken as a list of one)."""
    value = value or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must map header names to lists of values")
    headers: dict[str, list[str]] = {}
    for name, values in value.items():
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ConfigError(f"{key}.{name}: {values!r} must be a list of strings")
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", str(name)):
            raise ConfigError(f"{key}: {name!r} is not a valid HTTP header name")
        if any("\r" in v or "\n" in v for v in values):
            raise ConfigError(f"{key}.{name}: a value must not hold a line break")
        headers[str(name)] = list(values)
    return headers


def _strings(value: Any, key: str, choices: tuple[str, ...] = ()) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}: {value!r} must be a list of strings")
    for item in value:
        if choices and item not in choices:
            raise ConfigError(f"{key}: {item!r} is not valid; valid: {', '.join(choices)}")
    return list(value)


@dataclass
class TLSConfig:
    certificate: str
    key: str
    clientcas: list[str] = field(default_factory=list)
    minimum: str = "tls1.2"


# Actions a notification event may have (distribution's notifications.EventAction*).
EVENT_ACTIONS = ("push", "pull", "delete", "mount")
# dockyard's own default for where each endpoint's queue of events lives (a directory per
# endpoint): host-local state, apart from the storage root, which several registries may share.
NOTIFICATIONS_QUEUE_DIRECTORY = "/var/lib/dockyard/notifications"
# Default of the most events one endpoint's queue holds; newer events are dropped past it.
NOTIFICATIONS_MAX_QUEUE = 10_000
# An endpoint's name names its queue's directory: letters, digits, '.', '_', '-'.
ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Keys of one notifications.endpoints entry (distribution's).
ENDPOINT_KEYS = (
    "name",
    "disabled",
    "url",
    "headers",
    "timeout",
    "threshold",
    "backoff",
    "ignoredmediatypes",
    "ignore",
)


@dataclass
class NotificationEndpoint:
    """One `notifications.endpoints` entry; zero or missing values take distribution's
    defaults (timeout 1s, threshold 10, backoff 1s)."""

    name: str
    url: str
    headers: dict[str, list[str]] = field(default_factory=dict)
    timeout: float = 1.0
    threshold: int = 10
    backoff: float = 1.0
    # target media types (ignoredmediatypes and ignore.mediatypes) and actions never sent
    ignored_mediatypes: list[str] = field(default_factory=list)
    ignored_actions: list[str] = field(default_factory=list)
    disabled: bool = False


@dataclass
class NotificationsConfig:
    endpoints: list[NotificationEndpoint] = field(default_factory=list)
    # notifications.dockyard.queuedirectory: a directory per endpoint below it
    queue_directory: str = NOTIFICATIONS_QUEUE_DIRECTORY
    # notifications.dockyard.maxqueue: the most events queued per endpoint
    max_queue: int = NOTIFICATIONS_MAX_QUEUE
    # notifications.dockyard.cafile: CA certificates trusted for https endpoints, beside the
    # system's
    cafile: Optional[str] = None


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
    # http.debug.addr: the debug listener (plain HTTP: /debug/health, and /metrics with
    # http.debug.prometheus.enabled)
    debug_addr: Optional[str] = None
    prometheus_enabled: bool = False
    prometheus_path: str = "/metrics"
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)
    warnings: list[str] = field(default_factory=list)

    @property
    def host_port(self) -> tuple[str, int]:
        return split_addr(self.addr)


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
    "http.debug.prometheus",
    "http.debug.prometheus.enabled",
    "http.debug.prometheus.path",
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
    "notifications",
    "notifications.endpoints",
    "notifications.events",
    "notifications.events.includereferences",
    # dockyard's extension (distribution ignores keys it does not know)
    "notifications.dockyard",
    "notifications.dockyard.queuedirectory",
    "notifications.dockyard.maxqueue",
    "notifications.dockyard.cafile",
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
    addr = _addr(_get(doc, "http.addr", ":5000"), "http.addr")
    headers = _headers(_get(doc, "http.headers"), "http.headers")
    debug_addr = _get(doc, "http.debug.addr")
    if debug_addr is not None:
        debug_addr = _addr(debug_addr, "http.debug.addr")
        if debug_addr == addr:
            raise ConfigError(f"http.debug.addr: {debug_addr!r} must differ from http.addr")
    prometheus = "http.debug.prometheus"
    prometheus_enabled = _bool(_get(doc, f"{prometheus}.enabled", False), f"{prometheus}.enabled")
    prometheus_path = _str(_get(doc, f"{prometheus}.path", "/metrics"), f"{prometheus}.path")
    if not re.fullmatch(r"/[A-Za-z0-9._~/-]*", prometheus_path) or prometheus_path.startswith(
        "/debug/health"
    ):
        raise ConfigError(
            f"{prometheus}.path: {prometheus_path!r} is not valid; valid: an absolute URL path "
            "like /metrics (not /debug/health)"
        )
    if prometheus_enabled and debug_addr is None:
        message = f"{prometheus}.enabled is set without http.debug.addr: no metrics are served"
        warnings.append(message)
        warn(message)

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

    notifications = _notifications(doc, warnings, warn)

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
        debug_addr=debug_addr,
        prometheus_enabled=prometheus_enabled,
        prometheus_path=prometheus_path,
        notifications=notifications,
        warnings=warnings,
    )


def _positive_duration(value: Any, key: str, default: float) -> float:
    """A duration where zero (or none) means distribution's default, as its endpoints have."""
    if value is None:
        return default
    seconds = parse_duration(value, key)
    return seconds if seconds > 0 else default


def _endpoint(
    key: str, item: Any, warnings: list[str], warn: Callable[[str], None]
) -> NotificationEndpoint:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{key}: {item!r} must be a mapping with name and url")
    for unknown in sorted(str(k) for k in item if str(k).lower() not in ENDPOINT_KEYS):
        message = f"unknown configuration key {key}.{unknown} (ignored)"
        warnings.append(message)
        warn(message)
    item = {str(k).lower(): v for k, v in item.items()}
    name = item.get("name")
    if not isinstance(name, str) or not ENDPOINT_NAME.match(name):
        raise ConfigError(
            f"{key}.name: {name!r} is not valid; valid: 1 to 64 letters, digits, '.', '_', '-' "
            "(it names the endpoint's queue directory)"
        )
    url = item.get("url")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}.url: {url!r} is not valid; valid: an http:// or https:// URL")
    try:
        parts.port  # noqa: B018 - a bad port raises here
    except ValueError as exc:
        raise ConfigError(f"{key}.url: {url!r} has an invalid port") from exc
    ignore = item.get("ignore") or {}
    if not isinstance(ignore, Mapping) or set(ignore) - {"mediatypes", "actions"}:
        raise ConfigError(f"{key}.ignore: {ignore!r} is not valid; valid: mediatypes, actions")
    threshold = item.get("threshold")
    threshold = 0 if threshold is None else _int(threshold, f"{key}.threshold", 0)
    return NotificationEndpoint(
        name=name,
        url=url,
        headers=_headers(item.get("headers"), f"{key}.headers"),
        timeout=_positive_duration(item.get("timeout"), f"{key}.timeout", 1.0),
        threshold=threshold or 10,
        backoff=_positive_duration(item.get("backoff"), f"{key}.backoff", 1.0),
        ignored_mediatypes=_strings(item.get("ignoredmediatypes"), f"{key}.ignoredmediatypes")
        + _strings(ignore.get("mediatypes"), f"{key}.ignore.mediatypes"),
        ignored_actions=_strings(ignore.get("actions"), f"{key}.ignore.actions", EVENT_ACTIONS),
        disabled=_bool(item.get("disabled", False), f"{key}.disabled"),
    )


def parse_endpoints(
    raw: Any,
    warnings: Optional[list[str]] = None,
    warn: Callable[[str], None] = lambda message: None,
    key: str = "notifications.endpoints",
) -> list[NotificationEndpoint]:
    """Validate a list of notification endpoints (distribution's keys); ConfigError names the
    entry as `<key>[<index>].<field>` (the deploys pass their own data key)."""
    raw = raw or []
    if not isinstance(raw, list):
        raise ConfigError(f"{key}: {raw!r} must be a list of endpoints (name, url, ...)")
    found = [] if warnings is None else warnings
    endpoints = [_endpoint(f"{key}[{i}]", item, found, warn) for i, item in enumerate(raw)]
    names = [e.name for e in endpoints]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{key}: the name {twice[0]!r} is used twice")
    return endpoints


def _notifications(
    doc: Mapping[str, Any], warnings: list[str], warn: Callable[[str], None]
) -> NotificationsConfig:
    """`notifications`: distribution's endpoints, and dockyard's queue settings."""
    endpoints = parse_endpoints(_get(doc, "notifications.endpoints"), warnings, warn)
    if _get(doc, "notifications.events.includereferences") not in (None, False):
        message = "notifications.events.includereferences is not supported (ignored)"
        warnings.append(message)
        warn(message)
    ext = "notifications.dockyard"
    directory = _str(
        _get(doc, f"{ext}.queuedirectory", NOTIFICATIONS_QUEUE_DIRECTORY), f"{ext}.queuedirectory"
    )
    if not os.path.isabs(directory):
        raise ConfigError(f"{ext}.queuedirectory: {directory!r} must be an absolute path")
    cafile = _get(doc, f"{ext}.cafile")
    return NotificationsConfig(
        endpoints=endpoints,
        queue_directory=os.path.normpath(directory),
        max_queue=_int(_get(doc, f"{ext}.maxqueue", NOTIFICATIONS_MAX_QUEUE), f"{ext}.maxqueue", 1),
        cafile=None if cafile is None else _str(cafile, f"{ext}.cafile"),
    )
