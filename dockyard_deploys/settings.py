"""Typed settings per concern, built once per host from `host.data` with the concern's defaults
applied and validated: pyinfra applies a deploy's `data_defaults` only while that deploy runs, so
a concern never reads another concern's raw keys — it reads that concern's settings object here.
Every key, its default and its meaning are in the README's tables (checked by a test)."""

from __future__ import annotations

import posixpath
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, TypeVar

from pyinfra.api import DeployError
from pyinfra.context import ctx_host

from dockyard.registry.config import ENDPOINT_KEYS, ConfigError, parse_endpoints

T = TypeVar("T")


class SettingsError(DeployError):
    """A data key holds a value its concern cannot use; the message names key, value and what is
    valid."""


def invalid(key: str, value: Any, valid: str) -> SettingsError:
    return SettingsError(f"{key}={value!r} is not valid; valid: {valid}")


class _Data:
    """Typed reads of one concern's keys from host data; None (unset) means the default."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def raw(self, key: str, default: Any) -> Any:
        value = self.data.get(key)
        return default if value is None else value

    def text(self, key: str, default: str, choices: tuple[str, ...] = ()) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str) or not value:
            raise invalid(key, value, ", ".join(choices) if choices else "a non-empty string")
        if choices and value not in choices:
            raise invalid(key, value, ", ".join(choices))
        return value

    def optional_text(self, key: str, choices: tuple[str, ...] = ()) -> Optional[str]:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, (str, int)) or isinstance(value, bool) or value == "":
            raise invalid(key, value, ", ".join(choices) + " or None" if choices else "a string")
        if choices and value not in choices:
            raise invalid(key, value, ", ".join(choices) + " (or None)")
        return str(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise invalid(key, value, "true or false")
        return value

    def number(self, key: str, default: int, low: int, high: int) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise invalid(key, value, f"an integer from {low} to {high}")
        return value

    def path(self, key: str, default: str, remote: bool = True) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str) or not value:
            raise invalid(key, value, "an absolute path")
        if remote and not posixpath.isabs(value):
            raise invalid(key, value, "an absolute path")
        if not remote:
            return value
        return value.rstrip("/") or "/"

    def texts(self, key: str, pattern: Optional[re.Pattern[str]] = None) -> tuple[str, ...]:
        value = self.raw(key, [])
        what = "a list of strings" + (f" matching {pattern.pattern}" if pattern else "")
        if not isinstance(value, (list, tuple)):
            raise invalid(key, value, what)
        for item in value:
            if not isinstance(item, str) or (pattern and not pattern.match(item)):
                raise invalid(key, value, what)
        return tuple(value)

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.raw(key, {})
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise invalid(key, value, "a mapping of string keys")
        return dict(value)


# --- Docker engine ------------------------------------------------------------------------------

_VERSION = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class EngineSettings:
    """`docker_engine_*`: where the engine comes from and whether it starts at boot."""

    # "distro" or "docker-ce"; None picks per distro (distro on Debian/Ubuntu, docker-ce on RHEL).
    source: Optional[str] = None
    # Pin of a docker-ce version ("24.0.9"); None installs the repository's newest.
    version: Optional[str] = None
    # Base URL of Docker's package repository (a local mirror in air-gapped fleets).
    repo_url: str = "https://download.docker.com/linux"
    # Keep the engine enabled at boot.
    enabled: bool = True

    @classmethod
    def from_data(cls, data: Any) -> EngineSettings:
        d, base = _Data(data), cls()
        version = d.optional_text("docker_engine_version")
        if version is not None and not _VERSION.match(version):
            raise SettingsError(f"docker_engine_version={version!r} is not a version like '24.0.9'")
        return cls(
            source=d.optional_text("docker_engine_source", ("distro", "docker-ce")),
            version=version,
            repo_url=d.text("docker_engine_repo_url", base.repo_url).rstrip("/"),
            enabled=d.flag("docker_engine_enabled", base.enabled),
        )


# --- Docker storage -----------------------------------------------------------------------------

# Drivers dockyard configures; aufs and the legacy overlay driver are never chosen.
DRIVERS: tuple[str, ...] = ("overlay2", "btrfs", "zfs", "devicemapper", "vfs")
REMOVED_DRIVERS: dict[str, str] = {
    "aufs": "aufs was removed from the engine (24) and was never upstream in the kernel",
    "overlay": "the legacy overlay driver was removed from the engine (24); use overlay2",
}
# Filesystems a backing store may be made with.
DEVICE_FILESYSTEMS: tuple[str, ...] = ("xfs", "btrfs")
DEFAULT_DATA_ROOT = "/var/lib/docker"
_SIZE = re.compile(r"^[1-9][0-9]*[KMGT]$")
_STORAGE_OPT = re.compile(r"^[A-Za-z0-9_.-]+=.*$")


@dataclass(frozen=True)
class StorageSettings:
    """`docker_storage_*`: the requested driver and the data root's backing store."""

    # Storage driver; None chooses from facts (btrfs on btrfs, zfs on zfs, else overlay2).
    driver: Optional[str] = None
    # Extra storage-opts appended to the driver's own ("key=value" strings).
    opts: tuple[str, ...] = ()
    # The engine's data root; written as data-root only when it differs from the default.
    data_root: str = DEFAULT_DATA_ROOT
    # Dedicated backing store for the data root: a block device, or a loop file path.
    device: Optional[str] = None
    # Filesystem made on the device when it holds none: xfs (ftype=1) or btrfs.
    device_fs: str = "xfs"
    # Size of the sparse loop file created when the device is a missing file ("4G").
    device_size: Optional[str] = None
    # Allow a driver switch (or a new backing store) that hides existing images and containers.
    allow_switch: bool = False

    @classmethod
    def from_data(cls, data: Any) -> StorageSettings:
        d, base = _Data(data), cls()
        driver = d.optional_text("docker_storage_driver")
        if driver in REMOVED_DRIVERS:
            raise SettingsError(
                f"docker_storage_driver={driver!r} is never configured: "
                f"{REMOVED_DRIVERS[driver]}; valid: {', '.join(DRIVERS)}"
            )
        if driver is not None and driver not in DRIVERS:
            raise SettingsError(
                f"docker_storage_driver={driver!r} is not a storage driver; "
                f"valid: {', '.join(DRIVERS)} (or None to choose from facts)"
            )
        opts = data.get("docker_storage_opts")
        if opts is not None and not (
            isinstance(opts, (list, tuple))
            and all(isinstance(o, str) and _STORAGE_OPT.match(o) for o in opts)
        ):
            raise SettingsError(
                f"docker_storage_opts={opts!r} must be a list of 'key=value' strings"
            )
        data_root = d.raw("docker_storage_data_root", base.data_root)
        if not isinstance(data_root, str) or not posixpath.isabs(data_root):
            raise SettingsError(f"docker_storage_data_root={data_root!r} must be an absolute path")
        device = d.optional_text("docker_storage_device")
        if device is not None and not posixpath.isabs(device):
            raise SettingsError(f"docker_storage_device={device!r} must be an absolute path")
        size = d.optional_text("docker_storage_device_size")
        if size is not None and not _SIZE.match(size):
            raise invalid("docker_storage_device_size", size, "a size like '4G' (K, M, G or T)")
        return cls(
            driver=driver,
            opts=tuple(opts or ()),
            data_root=data_root.rstrip("/") or "/",
            device=device,
            device_fs=d.text("docker_storage_device_fs", base.device_fs, DEVICE_FILESYSTEMS),
            device_size=size,
            allow_switch=d.flag("docker_storage_allow_switch", base.allow_switch),
        )


# --- daemon.json --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonSettings:
    """`docker_daemon_*`: the file, the free-form keys merged into it and live-restore."""

    # Path of the engine's configuration file.
    config_path: str = "/etc/docker/daemon.json"
    # Free-form daemon.json keys (as geerlingguy.docker's docker_daemon_options).
    options: dict[str, Any] = field(default_factory=dict)
    # daemon.json's `live-restore`: running containers survive an engine restart.
    live_restore: bool = True

    @classmethod
    def from_data(cls, data: Any) -> DaemonSettings:
        d, base = _Data(data), cls()
        return cls(
            config_path=d.path("docker_daemon_config_path", base.config_path),
            options=d.mapping("docker_daemon_options"),
            live_restore=d.flag("docker_daemon_live_restore", base.live_restore),
        )


# --- NFS server ---------------------------------------------------------------------------------

_CLIENT = re.compile(r"^[A-Za-z0-9.:/*?_-]+$")
_EXPORT_OPTION = re.compile(r"^[a-z_]+(=[A-Za-z0-9_.:/@-]+)?$")
_MODE = re.compile(r"^0?[0-7]{3,4}$")
# Directories never exported whole.
SYSTEM_DIRS: tuple[str, ...] = ("/", "/etc", "/root", "/var", "/usr", "/home")


@dataclass(frozen=True)
class ExportSpec:
    """One export as the user declared it; None fields get per-distro defaults when planned."""

    path: str
    clients: Optional[tuple[str, ...]] = None
    options: Optional[str] = None
    owner: Optional[str] = None
    group: Optional[str] = None
    mode: str = "0750"
    pseudo: Optional[str] = None


def _export_spec(item: Any) -> ExportSpec:
    if not isinstance(item, Mapping) or not str(item.get("path", "")).startswith("/"):
        raise SettingsError(f"nfs_server_exports: each NFS export needs an absolute path: {item!r}")
    path = str(item["path"]).rstrip("/") or "/"
    if path in SYSTEM_DIRS:
        raise SettingsError(
            f"nfs_server_exports: refusing to export {path}: export a dedicated directory"
        )
    clients = item.get("clients") or None
    if clients is not None:
        if not isinstance(clients, (list, tuple)):
            raise SettingsError(f"nfs_server_exports: export {path}: clients must be a list")
        for client in clients:
            if not _CLIENT.match(str(client)):
                raise SettingsError(
                    f"nfs_server_exports: export {path}: client {client!r} is not a host, IP "
                    "or CIDR"
                )
    options = item.get("options") or None
    if options is not None:
        for option in str(options).split(","):
            if not _EXPORT_OPTION.match(option):
                raise SettingsError(
                    f"nfs_server_exports: export {path}: option {option!r} is not valid"
                )
    mode = str(item.get("mode") or "0750")
    if not _MODE.match(mode):
        raise SettingsError(
            f"nfs_server_exports: export {path}: mode {mode!r} is not an octal mode like 0750"
        )
    if int(mode, 8) & 0o002:
        raise SettingsError(
            f"nfs_server_exports: export {path}: mode {mode} is world-writable; exports are owned "
            "by the anonymous user instead (use 0750 or 0770)"
        )
    return ExportSpec(
        path=path,
        clients=tuple(str(c) for c in clients) if clients else None,
        options=str(options) if options else None,
        owner=str(item["owner"]) if item.get("owner") else None,
        group=str(item["group"]) if item.get("group") else None,
        mode=mode,
        pseudo=str(item["pseudo"]) if item.get("pseudo") else None,
    )


@dataclass(frozen=True)
class NfsServerSettings:
    """`nfs_server_*`: what a `storage` host exports and with which server."""

    # Exports; clients default to every inventory host, owner/group to the anonymous user.
    exports: tuple[ExportSpec, ...] = (ExportSpec(path="/srv/exports/registry"),)
    # "kernel", "ganesha", or None: the kernel server where the kernel has nfsd, else ganesha.
    impl: Optional[str] = None
    # uid/gid every client user is squashed to (None: the distro's anonymous user).
    anon_uid: Optional[int] = None
    anon_gid: Optional[int] = None

    @classmethod
    def from_data(cls, data: Any) -> NfsServerSettings:
        d, base = _Data(data), cls()
        raw = data.get("nfs_server_exports")
        if raw is not None and not isinstance(raw, (list, tuple)):
            raise invalid("nfs_server_exports", raw, "a list of mappings with a path")
        ids = []
        for key in ("nfs_server_anon_uid", "nfs_server_anon_gid"):
            value = data.get(key)
            ids.append(None if value is None else d.number(key, 0, 0, 2**32 - 2))
        return cls(
            exports=base.exports if raw is None else tuple(_export_spec(i) for i in raw),
            impl=d.optional_text("nfs_server_impl", ("kernel", "ganesha")),
            anon_uid=ids[0],
            anon_gid=ids[1],
        )


# --- NFS client ---------------------------------------------------------------------------------

_SRC = re.compile(r"^[A-Za-z0-9.\[\]:_-]+:/[A-Za-z0-9._/-]*$")
_MOUNT_OPTIONS = re.compile(r"^[a-z0-9_]+(=[A-Za-z0-9_.:/-]+)?(,[a-z0-9_]+(=[A-Za-z0-9_.:/-]+)?)*$")


@dataclass(frozen=True)
class NfsMount:
    """One NFS mount: its fstab line is the whole of what dockyard writes for it."""

    src: str
    path: str
    fstype: str
    options: str

    @property
    def fstab_line(self) -> str:
        return f"{self.src} {self.path} {self.fstype} {self.options} 0 0"


@dataclass(frozen=True)
class NfsClientSettings:
    """`nfs_client_*`: the mounts a host gets in fstab, and extra client packages."""

    # Mounts: src ("server:/export"), path (mount point), options, fstype (nfs4).
    mounts: tuple[NfsMount, ...] = ()
    # Options of every mount unless it sets its own; _netdev is always added.
    options: str = "rw,hard,noatime,_netdev"
    # Extra packages on clients (the lab adds libnfs-utils to reach ganesha without a kernel).
    extra_packages: tuple[str, ...] = ()

    @classmethod
    def from_data(cls, data: Any) -> NfsClientSettings:
        d, base = _Data(data), cls()
        default_options = d.text("nfs_client_options", base.options)
        if not _MOUNT_OPTIONS.match(default_options):
            raise invalid("nfs_client_options", default_options, "comma-separated mount options")
        raw = d.raw("nfs_client_mounts", [])
        if not isinstance(raw, (list, tuple)):
            raise SettingsError(f"nfs_client_mounts must be a list of mappings, got {raw!r}")
        mounts: list[NfsMount] = []
        for item in raw:
            if not isinstance(item, Mapping):
                raise invalid("nfs_client_mounts", raw, "a list of {src, path, options, fstype}")
            src, path = str(item.get("src", "")), str(item.get("path", ""))
            if not _SRC.match(src):
                raise SettingsError(
                    f"nfs_client_mounts: NFS mount source {src!r} is not server:/path"
                )
            if not path.startswith("/") or path == "/" or " " in path:
                raise SettingsError(
                    f"nfs_client_mounts: NFS mount point {path!r} must be an absolute path"
                )
            options = str(item.get("options") or default_options)
            if not _MOUNT_OPTIONS.match(options):
                raise SettingsError(
                    f"nfs_client_mounts: NFS mount {path}: options {options!r} are not valid"
                )
            if "_netdev" not in options.split(","):
                options += ",_netdev"
            fstype = str(item.get("fstype") or "nfs4")
            if fstype not in ("nfs", "nfs4"):
                raise SettingsError(
                    f"nfs_client_mounts: NFS mount {path}: fstype {fstype!r}; valid: nfs, nfs4"
                )
            path = path.rstrip("/")
            if any(m.path == path for m in mounts):
                raise SettingsError(f"nfs_client_mounts: NFS mount point {path} is listed twice")
            mounts.append(NfsMount(src, path, fstype, options))
        return cls(
            mounts=tuple(mounts),
            options=default_options,
            extra_packages=d.texts("nfs_client_extra_packages"),
        )


# --- Registry PKI and trust ---------------------------------------------------------------------


@dataclass(frozen=True)
class PkiSettings:
    """`registry_pki_dir`, `registry_names`, `registry_certs_dir`: the fleet CA on the control
    machine and the registry's TLS files on registry hosts."""

    # Control-machine directory of the fleet CA and issued certificates (0700, CA key 0600).
    pki_dir: str = "~/.local/share/dockyard/pki"
    # Extra DNS names and IPs for the registry certificate (its address and hostname are in).
    names: tuple[str, ...] = ()
    # Directory of the registry's certificate, key and the CA on registry hosts.
    certs_dir: str = "/etc/dockyard/registry/certs"

    @classmethod
    def from_data(cls, data: Any) -> PkiSettings:
        d, base = _Data(data), cls()
        return cls(
            pki_dir=d.path("registry_pki_dir", base.pki_dir, remote=False),
            names=d.texts("registry_names"),
            certs_dir=d.path("registry_certs_dir", base.certs_dir),
        )


@dataclass(frozen=True)
class TrustSettings:
    """`registry_trust_*`: how Docker hosts trust the fleet registry."""

    # "certs.d" (verify the registry with the fleet CA) or "insecure" (no TLS verification).
    mode: str = "certs.d"
    # Also add the fleet CA to the OS trust store (update-ca-certificates / update-ca-trust).
    os_store: bool = False

    @classmethod
    def from_data(cls, data: Any) -> TrustSettings:
        d, base = _Data(data), cls()
        return cls(
            mode=d.text("registry_trust_mode", base.mode, ("certs.d", "insecure")),
            os_store=d.flag("registry_trust_os_store", base.os_store),
        )


# --- Registry -----------------------------------------------------------------------------------

LOG_LEVELS: tuple[str, ...] = ("error", "warn", "info", "debug")


_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]*):(\d{1,5})$")


def _notification_endpoints(raw: Any) -> tuple[dict[str, Any], ...]:
    """`registry_notifications`, checked by the core's own parser (the keys and values the
    registry accepts), kept as given for config.yml."""
    if not isinstance(raw, (list, tuple)):
        raise invalid("registry_notifications", raw, "a list of endpoint mappings")
    try:
        parse_endpoints(list(raw), key="registry_notifications")
    except ConfigError as exc:
        raise SettingsError(f"{exc}") from None
    unknown = [
        f"registry_notifications[{i}].{k}"
        for i, item in enumerate(raw)
        for k in item
        if str(k).lower() not in ENDPOINT_KEYS
    ]
    if unknown:
        raise SettingsError(f"{unknown[0]} is not valid; valid: {', '.join(ENDPOINT_KEYS)}")
    return tuple(dict(item) for item in raw)


@dataclass(frozen=True)
class RegistrySettings:
    """`registry_*` of the registry host: where and how the TLS registry runs."""

    # The registry's data directory: on the storage host an exported path, elsewhere an NFS mount.
    data_dir: str = "/srv/exports/registry"
    # Refuse to start unless data_dir is an export of this host or an NFS mount.
    nfs_backed: bool = True
    # Users and passwords for htpasswd (bcrypt) auth; empty: no auth.
    users: dict[str, str] = field(default_factory=dict)
    # Realm of the basic-auth challenge.
    realm: str = "dockyard"
    # Allow DELETE of manifests and blobs.
    delete_enabled: bool = False
    # Require client certificates signed by the fleet CA (mutual TLS).
    client_certs: bool = False
    # Log level of the registry.
    log_level: str = "info"
    # Where config.yml and htpasswd live on the registry host.
    config_dir: str = "/etc/dockyard/registry"
    # "dockyard" (the bundled core, a systemd service) or an image such as "registry:2".
    image: str = "dockyard"
    # A `docker save` archive on the control machine that holds the image.
    image_archive: Optional[str] = None
    # Port the registry listens on (the fleet's endpoint is the first registry host:port).
    port: int = 5443
    # host:port of the debug listener: /metrics (Prometheus) and /debug/health, plain HTTP.
    metrics_addr: str = "127.0.0.1:5001"
    # Webhook endpoints for events (distribution's notifications.endpoints entries, as dicts).
    notifications: tuple[dict[str, Any], ...] = ()
    # The bundled core trusts the fleet CA (beside the system's CAs) for https endpoints.
    notifications_fleet_ca: bool = True

    @classmethod
    def from_data(cls, data: Any) -> RegistrySettings:
        d, base = _Data(data), cls()
        users = d.mapping("registry_users")
        for user, password in users.items():
            if not user or ":" in user or not isinstance(password, str) or not password:
                raise SettingsError(
                    f"registry_users: user {user!r} needs a name without ':' and a password"
                )
        port = d.number("registry_port", base.port, 1, 65535)
        metrics_addr = d.text("registry_metrics_addr", base.metrics_addr)
        match = _HOST_PORT.match(metrics_addr)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise invalid("registry_metrics_addr", metrics_addr, "host:port like 127.0.0.1:5001")
        if int(match.group(2)) == port and match.group(1) in ("", "0.0.0.0", "127.0.0.1"):
            raise invalid("registry_metrics_addr", metrics_addr, f"a port other than {port}")
        return cls(
            data_dir=d.path("registry_data_dir", base.data_dir),
            nfs_backed=d.flag("registry_nfs_backed", base.nfs_backed),
            users=users,
            realm=d.text("registry_realm", base.realm),
            delete_enabled=d.flag("registry_delete_enabled", base.delete_enabled),
            client_certs=d.flag("registry_client_certs", base.client_certs),
            log_level=d.text("registry_log_level", base.log_level, LOG_LEVELS),
            config_dir=d.path("registry_config_dir", base.config_dir),
            image=d.text("registry_image", base.image),
            image_archive=d.optional_text("registry_image_archive"),
            port=port,
            metrics_addr=metrics_addr,
            notifications=_notification_endpoints(d.raw("registry_notifications", [])),
            notifications_fleet_ca=d.flag(
                "registry_notifications_fleet_ca", base.notifications_fleet_ca
            ),
        )


# --- The core on hosts --------------------------------------------------------------------------


@dataclass(frozen=True)
class CoreSettings:
    """`dockyard_core_*` as other concerns need them (the registry runs the core's CLI)."""

    # Where the venv and the wheelhouse live on hosts.
    prefix: str = "/opt/dockyard"
    # Control-machine cache of built wheelhouses (one per Python version and architecture).
    cache: str = "~/.cache/dockyard/wheelhouse"

    @property
    def venv_bin(self) -> str:
        return f"{self.prefix}/venv/bin"

    @classmethod
    def from_data(cls, data: Any) -> CoreSettings:
        d, base = _Data(data), cls()
        return cls(
            prefix=d.path("dockyard_core_prefix", base.prefix),
            cache=d.path("dockyard_core_cache", base.cache, remote=False),
        )


# --- Docker volumes -----------------------------------------------------------------------------

# Docker's own rule for volume names (daemon/names.RestrictedNamePattern).
VOLUME_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
_VOLUME_DRIVER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$")
_NFS_SERVER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:_-]*$")
_NFS_PATH = re.compile(r"^/[A-Za-z0-9._/-]*$")
_NFS_VOLUME_OPTION = re.compile(r"^[a-z0-9_]+(=[A-Za-z0-9_.:/-]+)?$")
# Set by the nfs shorthand itself (addr from the server, the NFS version 4).
_NFS_SHORTHAND_OPTIONS: tuple[str, ...] = ("addr", "nfsvers", "vers")
_OWNER = re.compile(r"^([a-z_][a-z0-9_.-]*\$?|[0-9]+)$")
STATES: tuple[str, ...] = ("present", "absent")


@dataclass(frozen=True)
class NfsVolumeSource:
    """The `nfs` shorthand of a volume: where the local driver mounts it from."""

    # NFS server; None: the first host of the `storage` group (its ssh_hostname, or its name).
    server: Optional[str]
    # Exported path on the server.
    path: str
    # Extra NFS mount options after addr=<server>,nfsvers=4 ("soft,timeo=50").
    options: str = ""


@dataclass(frozen=True)
class VolumeSpec:
    """One named volume as declared; `driver_options` gives what `docker volume create --opt`
    gets (the nfs shorthand expanded)."""

    name: str
    driver: str = "local"
    # Raw driver options (`--opt key=value`); empty when `nfs` is given.
    driver_opts: dict[str, str] = field(default_factory=dict)
    nfs: Optional[NfsVolumeSource] = None
    labels: dict[str, str] = field(default_factory=dict)
    state: str = "present"

    def driver_options(self, storage_address: Optional[str]) -> dict[str, str]:
        """The driver options, with the nfs shorthand expanded for the local driver's `type=nfs`
        (`storage_address`: the server of an nfs shorthand that names none)."""
        if self.nfs is None:
            return dict(self.driver_opts)
        server = self.nfs.server or storage_address
        if not server:
            raise SettingsError(
                f"docker_volumes: volume {self.name}: nfs.server is not set and the inventory "
                "has no storage host; valid: a host name or IP address"
            )
        extra = f",{self.nfs.options}" if self.nfs.options else ""
        return {
            "type": "nfs",
            "o": f"addr={server},nfsvers=4{extra}",
            "device": f":{self.nfs.path}",
        }


@dataclass(frozen=True)
class VolumeDir:
    """One host directory for bind-mounted volumes."""

    path: str
    owner: str = "root"
    group: str = "root"
    mode: str = "0750"
    state: str = "present"


def _string_map(key: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, (str, int)) and not isinstance(v, bool)
        for k, v in value.items()
    ):
        raise invalid(key, value, "a mapping of non-empty string keys to strings")
    return {k: str(v) for k, v in value.items()}


def _volume_spec(index: int, item: Any) -> VolumeSpec:
    key = f"docker_volumes[{index}]"
    if not isinstance(item, Mapping):
        raise invalid(
            key, item, "a mapping with a name (and driver, nfs or driver_opts, labels, state)"
        )
    unknown = sorted(set(item) - {"name", "driver", "nfs", "driver_opts", "labels", "state"})
    if unknown:
        raise invalid(
            f"{key}.{unknown[0]}", item[unknown[0]], "name, driver, nfs, driver_opts, labels, state"
        )
    name = item.get("name")
    if not isinstance(name, str) or not VOLUME_NAME.match(name):
        raise invalid(f"{key}.name", name, f"a Docker volume name matching {VOLUME_NAME.pattern}")
    driver = item.get("driver") or "local"
    if not isinstance(driver, str) or not _VOLUME_DRIVER.match(driver):
        raise invalid(f"{key}.driver", driver, "local, or a volume plugin's name")
    state = item.get("state") or "present"
    if state not in STATES:
        raise invalid(f"{key}.state", state, ", ".join(STATES))
    driver_opts = _string_map(f"{key}.driver_opts", item.get("driver_opts"))
    labels = _string_map(f"{key}.labels", item.get("labels"))
    raw_nfs = item.get("nfs")
    nfs = None
    if raw_nfs is not None:
        if driver != "local" or driver_opts:
            raise invalid(
                f"{key}.nfs", raw_nfs, "the local driver's NFS shorthand, without driver_opts"
            )
        if not isinstance(raw_nfs, Mapping) or set(raw_nfs) - {"server", "path", "options"}:
            raise invalid(f"{key}.nfs", raw_nfs, "a mapping of server, path, options")
        server = raw_nfs.get("server")
        if server is not None and not (isinstance(server, str) and _NFS_SERVER.match(server)):
            raise invalid(
                f"{key}.nfs.server",
                server,
                "a host name or IP address (or unset: the storage host)",
            )
        path = raw_nfs.get("path")
        if not isinstance(path, str) or not _NFS_PATH.match(path):
            raise invalid(f"{key}.nfs.path", path, "the exported absolute path")
        options = raw_nfs.get("options") or ""
        parts = options.split(",") if isinstance(options, str) and options else []
        if not isinstance(options, str) or any(
            not _NFS_VOLUME_OPTION.match(o) or o.split("=", 1)[0] in _NFS_SHORTHAND_OPTIONS
            for o in parts
        ):
            raise invalid(
                f"{key}.nfs.options",
                options,
                "comma-separated NFS mount options other than "
                + ", ".join(_NFS_SHORTHAND_OPTIONS)
                + " (set by the shorthand)",
            )
        nfs = NfsVolumeSource(server, path.rstrip("/") or "/", options)
    return VolumeSpec(name, driver, driver_opts, nfs, labels, state)


def _volume_dir(index: int, item: Any) -> VolumeDir:
    key = f"docker_volume_dirs[{index}]"
    if not isinstance(item, Mapping):
        raise invalid(key, item, "a mapping with a path (and owner, group, mode, state)")
    allowed = {"path", "owner", "group", "mode", "state", "world_writable"}
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise invalid(f"{key}.{unknown[0]}", item[unknown[0]], ", ".join(sorted(allowed)))
    path = item.get("path")
    if not isinstance(path, str) or not posixpath.isabs(path) or " " in path:
        raise invalid(f"{key}.path", path, "an absolute path without spaces")
    path = posixpath.normpath(path)
    if path in SYSTEM_DIRS:
        raise invalid(f"{key}.path", path, "a dedicated directory, not " + ", ".join(SYSTEM_DIRS))
    base = VolumeDir(path)
    owner, group = item.get("owner") or base.owner, item.get("group") or base.group
    for part, value in (("owner", owner), ("group", group)):
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not _OWNER.match(value):
            raise invalid(f"{key}.{part}", value, "a user or group name, or a numeric id")
    mode = item.get("mode") or base.mode
    if not isinstance(mode, str) or not _MODE.match(mode):
        raise invalid(f"{key}.mode", mode, "an octal mode string like '0750'")
    world_writable = item.get("world_writable", False)
    if not isinstance(world_writable, bool):
        raise invalid(f"{key}.world_writable", world_writable, "true or false")
    if int(mode, 8) & 0o002 and not world_writable:
        raise invalid(
            f"{key}.mode",
            mode,
            "a mode other users cannot write (0750, 0770, 0755); a world-writable one only "
            "with world_writable: true",
        )
    state = item.get("state") or "present"
    if state not in STATES:
        raise invalid(f"{key}.state", state, ", ".join(STATES))
    return VolumeDir(path, str(owner), str(group), mode.zfill(4), state)


@dataclass(frozen=True)
class VolumeSettings:
    """`docker_volumes` and `docker_volume_dirs`: the named volumes and the host directories a
    Docker host keeps for its containers. Nothing is removed unless its `state` is `absent`."""

    # Named volumes: name, driver (local), nfs {server, path, options} or driver_opts, labels,
    # state (present; absent removes it).
    volumes: tuple[VolumeSpec, ...] = ()
    # Host directories: path, owner (root), group (root), mode (0750), state, world_writable.
    volume_dirs: tuple[VolumeDir, ...] = ()

    @classmethod
    def from_data(cls, data: Any) -> VolumeSettings:
        lists = {}
        for key in ("docker_volumes", "docker_volume_dirs"):
            raw = data.get(key)
            if raw is not None and not isinstance(raw, (list, tuple)):
                raise invalid(key, raw, "a list of mappings")
            lists[key] = list(raw or [])
        volumes = tuple(_volume_spec(i, item) for i, item in enumerate(lists["docker_volumes"]))
        dirs = tuple(_volume_dir(i, item) for i, item in enumerate(lists["docker_volume_dirs"]))
        for key, names in (
            ("docker_volumes", [v.name for v in volumes]),
            ("docker_volume_dirs", [d.path for d in dirs]),
        ):
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise invalid(key, twice[0], "each name or path listed once")
        return cls(volumes=volumes, volume_dirs=dirs)


# --- Rollouts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutSettings:
    """`rollout_*`: how `dockyard rollout` groups a Docker host for its canary wave (read on the
    control machine, never by a deploy)."""

    # The host's release for the canary wave (one host per release); None: the lab's
    # `lab_release`, else the distribution and version from pyinfra's LinuxDistribution fact.
    release: Optional[str] = None

    @classmethod
    def from_data(cls, data: Any) -> RolloutSettings:
        return cls(release=_Data(data).optional_text("rollout_release"))


# --- one object per concern per host ------------------------------------------------------------

# Each concern's settings class and the prefix of its data keys: a field `x` is the key
# `<prefix>x` (the README's tables list every one, with its default).
PREFIXES: dict[type, str] = {
    EngineSettings: "docker_engine_",
    StorageSettings: "docker_storage_",
    DaemonSettings: "docker_daemon_",
    NfsServerSettings: "nfs_server_",
    NfsClientSettings: "nfs_client_",
    PkiSettings: "registry_",
    TrustSettings: "registry_trust_",
    RegistrySettings: "registry_",
    CoreSettings: "dockyard_core_",
    VolumeSettings: "docker_",
    RolloutSettings: "rollout_",
}


def data_keys(cls: type) -> list[str]:
    """The data keys of a concern's settings, in field order."""
    return [PREFIXES[cls] + f.name for f in fields(cls)]


_CACHE: weakref.WeakKeyDictionary[Any, dict[type, Any]] = weakref.WeakKeyDictionary()


def _cached(cls: type[T], builder: Callable[[Any], T], on: Any = None) -> T:
    # pyinfra's `host` is a context proxy: cache on the real host object behind it.
    real = ctx_host.get() if on is None else on
    if real is None:
        raise SettingsError("settings are read for a host: no pyinfra host is current")
    per_host = _CACHE.setdefault(real, {})
    if cls not in per_host:
        per_host[cls] = builder(real.data)
    return per_host[cls]


def engine(on: Any = None) -> EngineSettings:
    return _cached(EngineSettings, EngineSettings.from_data, on)


def storage(on: Any = None) -> StorageSettings:
    return _cached(StorageSettings, StorageSettings.from_data, on)


def daemon(on: Any = None) -> DaemonSettings:
    return _cached(DaemonSettings, DaemonSettings.from_data, on)


def nfs_server(on: Any = None) -> NfsServerSettings:
    return _cached(NfsServerSettings, NfsServerSettings.from_data, on)


def nfs_client(on: Any = None) -> NfsClientSettings:
    return _cached(NfsClientSettings, NfsClientSettings.from_data, on)


def pki(on: Any = None) -> PkiSettings:
    return _cached(PkiSettings, PkiSettings.from_data, on)


def trust(on: Any = None) -> TrustSettings:
    return _cached(TrustSettings, TrustSettings.from_data, on)


def registry(on: Any = None) -> RegistrySettings:
    return _cached(RegistrySettings, RegistrySettings.from_data, on)


def core(on: Any = None) -> CoreSettings:
    return _cached(CoreSettings, CoreSettings.from_data, on)


def volumes(on: Any = None) -> VolumeSettings:
    return _cached(VolumeSettings, VolumeSettings.from_data, on)


def rollout(on: Any = None) -> RolloutSettings:
    return _cached(RolloutSettings, RolloutSettings.from_data, on)
