"""Push to staging, the deploy side: the registry's event receiver (`dockyard receive`) as the
systemd service `dockyard-receiver.service` on hosts of the `receiver` group — its JSON config,
its token file (0600), a TLS certificate issued from the fleet CA on the control machine (the CA
key never leaves it) — and the release images (`docker_release_images`, references by digest)
pulled on Docker hosts, which the receiver's staging rollout sets with `--data`. Settings:
`ReceiverSettings` (`receiver_*`) and `ReleaseSettings` (`docker_release_*`), built once per host
from its data with these defaults, as every concern's in settings.py."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from io import StringIO
from typing import Any, Optional

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server, systemd

from dockyard_deploys import registry_pki, registry_trust, settings
from dockyard_deploys.operations import RELEASE_IMAGE, docker_release_image, pki_file
from dockyard_deploys.settings import SettingsError, _cached, _Data, invalid

# The receiver's unit and the placeholders its command may use (the core checks them again).
UNIT = "dockyard-receiver.service"
PLACEHOLDERS = ("repository", "tag", "digest", "image", "registry", "event_id")
MIN_TOKEN_LENGTH = 16
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]*$")


# --- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseSettings:
    """`docker_release_*`: the release images a Docker host must have (pulled by digest)."""

    # Image references by digest, REGISTRY[:PORT]/REPOSITORY@sha256:<hex>; the receiver's
    # staging rollout sets them with --data docker_release_images='["{image}"]'.
    images: tuple[str, ...] = ()

    @classmethod
    def from_data(cls, data: Any) -> ReleaseSettings:
        valid = "a list of image references by digest, REGISTRY[:PORT]/REPOSITORY@sha256:<hex>"
        raw = _Data(data).raw("docker_release_images", [])
        if isinstance(raw, str):  # one reference given as text on the command line
            raw = [raw]
        if not isinstance(raw, (list, tuple)) or not all(
            isinstance(item, str) and RELEASE_IMAGE.match(item) for item in raw
        ):
            raise invalid("docker_release_images", raw, valid)
        return cls(images=tuple(dict.fromkeys(raw)))


def _rules(raw: Any) -> tuple[dict[str, Any], ...]:
    valid = "a list of {repository: NAME, tags: [TAG, …]}"
    if not isinstance(raw, (list, tuple)):
        raise invalid("receiver_rules", raw, valid)
    rules = []
    for item in raw:
        tags = item.get("tags") if isinstance(item, dict) else None
        if (
            not isinstance(item, dict)
            or set(item) != {"repository", "tags"}
            or not isinstance(item["repository"], str)
            or not _REPOSITORY.match(item["repository"])
            or not isinstance(tags, (list, tuple))
            or not tags
            or not all(isinstance(t, str) and _TAG.match(t) for t in tags)
        ):
            raise invalid("receiver_rules", raw, valid)
        rules.append({"repository": item["repository"], "tags": list(tags)})
    return tuple(rules)


def _command(raw: Any) -> tuple[str, ...]:
    valid = "a list of strings (argv, never a shell string) with the placeholders " + ", ".join(
        "{" + p + "}" for p in PLACEHOLDERS
    )
    if not isinstance(raw, (list, tuple)) or not all(isinstance(a, str) for a in raw):
        raise invalid("receiver_command", raw, valid)
    for arg in raw:
        names = re.findall(r"(?<!\{)\{([^{}]*)\}(?!\})", arg)
        if any(name not in PLACEHOLDERS for name in names):
            raise invalid("receiver_command", raw, valid)
    return tuple(raw)


@dataclass(frozen=True)
class ReceiverSettings:
    """`receiver_*` of a `receiver` host: where the receiver listens and what it runs."""

    # Address and port the receiver listens on (TLS only).
    listen: str = "0.0.0.0"
    port: int = 9443
    # The path the registry's endpoint URL names.
    path: str = "/events"
    # The shared token (the registry endpoint's `Authorization: Bearer <token>` header).
    token: Optional[str] = None
    # Pushes that trigger: [{repository, tags}].
    rules: tuple[dict[str, Any], ...] = ()
    # The command run for a matching push (argv with placeholders), e.g. on a control host with
    # the checkout: [.venv/bin/dockyard, rollout, inventory/prod.py, deploy.py, --group,
    # staging, --data, 'docker_release_images=["{image}"]'].
    command: tuple[str, ...] = ()
    # Working directory of the command (a rollout's state goes in its .dockyard/).
    workdir: str = "/var/lib/dockyard/receiver"
    # host:port {image} names (None: the registry's address in the event).
    registry: Optional[str] = None
    # The user the receiver and its command run as.
    user: str = "root"
    # Where the config, token, certificate and key live on the host.
    config_dir: str = "/etc/dockyard/receiver"
    # Extra DNS names / IPs for the receiver's certificate (its address and names are in).
    names: tuple[str, ...] = ()

    @classmethod
    def from_data(cls, data: Any) -> ReceiverSettings:
        d, base = _Data(data), cls()
        token = d.optional_text("receiver_token")
        if token is not None and (len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token)):
            raise SettingsError(
                f"receiver_token is not valid; valid: one token of at least {MIN_TOKEN_LENGTH} "
                "characters without spaces (the value is not shown: it is a secret)"
            )
        path = d.text("receiver_path", base.path)
        if not path.startswith("/") or "?" in path:
            raise invalid("receiver_path", path, "an absolute URL path like /events")
        user = d.text("receiver_user", base.user)
        if not _USER.match(user):
            raise invalid("receiver_user", user, "a user name")
        registry = d.optional_text("receiver_registry")
        return cls(
            listen=d.text("receiver_listen", base.listen),
            port=d.number("receiver_port", base.port, 1, 65535),
            path=path,
            token=token,
            rules=_rules(d.raw("receiver_rules", [])),
            command=_command(d.raw("receiver_command", [])),
            workdir=d.path("receiver_workdir", base.workdir),
            registry=registry,
            user=user,
            config_dir=d.path("receiver_config_dir", base.config_dir),
            names=d.texts("receiver_names"),
        )


def release(on: Any = None) -> ReleaseSettings:
    return _cached(ReleaseSettings, ReleaseSettings.from_data, on)


def receiver_settings(on: Any = None) -> ReceiverSettings:
    return _cached(ReceiverSettings, ReceiverSettings.from_data, on)


# --- the release images on Docker hosts ---------------------------------------------------------


def registry_login(image: str) -> tuple[Optional[str], Optional[str]]:
    """(user, password) for pulling `image`: the fleet registry's first `registry_users` entry
    when the image is on the fleet registry (as the rollout's pull gate logs in), else none."""
    endpoint = registry_trust.registry_endpoint()
    registry = registry_trust.registry_host()
    match = RELEASE_IMAGE.match(image)
    if registry is None or match is None or match.group("registry") != endpoint:
        return None, None
    users = settings.registry(registry).users
    if not users:
        return None, None
    user = sorted(users)[0]
    return user, users[user]


@deploy("Pull the release images")
def pull_release_images() -> None:
    """
    Pull each of `docker_release_images` (by digest) unless the engine has it, logged in to the
    fleet registry with a throwaway DOCKER_CONFIG (trust: certs.d, as every pull).

    + docker_release_images: image references by digest

    Example:

    .. code:: python

        from dockyard_deploys.receiver import pull_release_images
        pull_release_images()
    """
    for image in release().images:
        user, password = registry_login(image)
        docker_release_image(
            name=f"Pull the release image {image}", image=image, user=user, password=password
        )


# --- the receiver service -----------------------------------------------------------------------


def receiver_names(cfg: ReceiverSettings) -> tuple[list[str], list[str]]:
    """(DNS names, IPs) of the receiver's certificate: the host's address, name and hostname,
    and receiver_names."""
    return registry_pki.host_names(cfg.names)


def receiver_config(cfg: ReceiverSettings) -> str:
    """The receiver's JSON config (what `dockyard receive --config` reads)."""
    doc: dict[str, Any] = {
        "listen": cfg.listen,
        "port": cfg.port,
        "path": cfg.path,
        "tls": {
            "certificate": f"{cfg.config_dir}/receiver.crt",
            "key": f"{cfg.config_dir}/receiver.key",
        },
        "token_file": f"{cfg.config_dir}/token",
        "rules": list(cfg.rules),
        "command": list(cfg.command),
        "workdir": cfg.workdir,
    }
    if cfg.registry:
        doc["registry"] = cfg.registry
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def receiver_unit(cfg: ReceiverSettings, venv_bin: str) -> str:
    return "\n".join(
        [
            "# Managed by dockyard (dockyard_deploys/receiver.py).",
            "[Unit]",
            f"Description=dockyard receiver of registry events on {cfg.listen}:{cfg.port}",
            "After=network-online.target",
            "Wants=network-online.target",
            "",
            "[Service]",
            "# READY=1 once it listens: `systemctl (re)start` returns when it serves.",
            "Type=notify",
            "NotifyAccess=main",
            f"User={cfg.user}",
            f"WorkingDirectory={cfg.workdir}",
            f"ExecStart={venv_bin}/dockyard receive --config {cfg.config_dir}/receiver.json",
            "Restart=always",
            "RestartSec=2",
            "# SIGTERM to the receiver (it ends the command it runs), the rest after the timeout.",
            "KillMode=mixed",
            "PrivateTmp=yes",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


@deploy("Run the registry event receiver")
def configure_receiver(restart_on: Optional[list[Any]] = None) -> None:
    """
    Install the receiver's config, token (0600), TLS certificate and key from the fleet CA (key
    0600) and its systemd unit; (re)start it only when one of them changed.

    + receiver_token: the shared token (required)
    + receiver_rules: pushes that trigger, [{repository, tags}] (required)
    + receiver_command: the command they run, argv with placeholders (required)
    + receiver_listen, receiver_port, receiver_path: where it listens
    + receiver_workdir, receiver_user, receiver_registry, receiver_config_dir, receiver_names
    + restart_on: operations (the core's install) whose change restarts it

    Example:

    .. code:: python

        from dockyard_deploys.receiver import configure_receiver
        configure_receiver()
    """
    cfg = receiver_settings()
    missing = [
        key
        for key, value in (
            ("receiver_token", cfg.token),
            ("receiver_rules", cfg.rules),
            ("receiver_command", cfg.command),
        )
        if not value
    ]
    if missing:
        raise SettingsError(
            f"{host.name} is in the receiver group but {', '.join(missing)} is not set; valid: "
            "a token, the rules of the pushes that trigger and the command they run (README "
            "'Push to staging')"
        )
    venv_bin = settings.core().venv_bin
    pki_dir = settings.pki().pki_dir
    conf = cfg.config_dir
    dns, ips = receiver_names(cfg)
    leaf: dict[str, Any] = {
        "pki_dir": pki_dir,
        "leaf": f"receiver-{host.name}",
        "dns": dns,
        "ips": ips,
    }
    files.directory(name=f"Create {conf}", path=conf, user="root", group="root", mode="0755")
    files.directory(
        name=f"Create the receiver's working directory {cfg.workdir}",
        path=cfg.workdir,
        user=cfg.user,
        group="root",
        mode="0750",
    )
    changed = [
        pki_file(
            name="Push the receiver's certificate (from the fleet CA)",
            kind="server",
            part="cert",
            dest=f"{conf}/receiver.crt",
            mode="0644",
            **leaf,
        ),
        pki_file(
            name=f"Push the receiver's key (0600, owned by {cfg.user})",
            kind="server",
            part="key",
            dest=f"{conf}/receiver.key",
            user=cfg.user,
            mode="0600",
            **leaf,
        ),
        files.put(
            name=f"Write the receiver's token (0600, owned by {cfg.user})",
            src=StringIO(f"{cfg.token}\n"),
            dest=f"{conf}/token",
            user=cfg.user,
            group="root",
            mode="0600",
        ),
        files.put(
            name="Write the receiver's configuration",
            src=StringIO(receiver_config(cfg)),
            dest=f"{conf}/receiver.json",
            user="root",
            group="root",
            mode="0644",
        ),
    ]
    unit = files.put(
        name=f"Install the {UNIT} unit",
        src=StringIO(receiver_unit(cfg, venv_bin)),
        dest=f"/etc/systemd/system/{UNIT}",
        user="root",
        group="root",
        mode="0644",
    )
    changed.append(unit)
    triggers = changed + list(restart_on or [])
    server.shell(
        name="Check the receiver's configuration, token and TLS files with the core",
        commands=[f"{venv_bin}/dockyard receive --config {conf}/receiver.json --check"],
        _if=lambda: any(op.did_change() for op in triggers),
    )
    systemd.daemon_reload(name="Reload systemd units", _if=unit.did_change)
    # Started, or restarted when it runs already, only when something it reads changed.
    systemd.service(
        name="(Re)start the receiver because its configuration, certificate or core changed",
        service=UNIT,
        running=True,
        restarted=True,
        _if=lambda: any(op.did_change() for op in triggers),
    )
    systemd.service(
        name=f"Keep {UNIT} running and enabled at boot",
        service=UNIT,
        running=True,
        enabled=True,
    )
