"""The fleet's TLS registry on `registry` hosts: the bundled core (`dockyard registry serve`) as a
systemd service, with `config.yml` from a template (storage root, delete, headers, health,
htpasswd auth when users are given), the certificate and key from `registry_pki`, and its data on
the NFS-backed path. A registry whose storage is declared NFS-backed is never started on a path
that is neither an export of this host nor an NFS mount (it would write to the local disk)."""

from __future__ import annotations

import hashlib
import io
import json
import shlex
from pathlib import Path
from typing import Any, Optional

import jinja2
from pyinfra import host
from pyinfra.api import DeployError, deploy
from pyinfra.facts.files import FileContents
from pyinfra.operations import files, server, systemd

from dockyard.registry.auth import BCRYPT_PASSWORD_MAX
from dockyard.registry.config import NOTIFICATIONS_QUEUE_DIRECTORY
from dockyard_deploys import nfs_server, registry_pki, settings
from dockyard_deploys.common import current_distro
from dockyard_deploys.operations import (
    REGISTRY_CONTAINER,
    pki_file,
    registry_container,
    remove_registry_container,
    require_nfs_backed,
    stop_registry_service,
)
from dockyard_deploys.settings import RegistrySettings

TEMPLATES = Path(__file__).resolve().parent / "templates"
# Seconds the deploy waits after a (re)start for the registry to answer /v2/ over TLS.
REGISTRY_WAIT_SECONDS = 30

# Paths inside a registry container (as the registry image has them).
IN_CONTAINER = {
    "data": "/var/lib/registry",
    "certs": "/certs",
    "config": "/etc/docker/registry",
    "auth": "/auth",
}


def observability(
    reg: RegistrySettings, queue: Optional[str], fleet_ca: Optional[str] = None
) -> dict[str, Any]:
    """The template's metrics and notifications values: the debug listener's address, the
    endpoints as one JSON flow sequence (JSON is YAML; the values stay as the user gave them),
    and the bundled core's extensions: the queues' directory and the fleet CA trusted for https
    endpoints (None: not rendered, as for a registry image that has neither)."""
    return {
        "metrics_addr": reg.metrics_addr,
        "notifications": json.dumps(list(reg.notifications)) if reg.notifications else "",
        "notifications_queue": queue,
        "notifications_cafile": fleet_ca if reg.notifications_fleet_ca else None,
    }


def htpasswd_content(users: dict[str, str], current: str) -> str:
    """bcrypt htpasswd for `users`, keeping existing lines whose hash still matches (so a second
    run writes nothing: bcrypt salts are random)."""
    import bcrypt

    existing = {}
    for line in current.splitlines():
        user, sep, hashed = line.partition(":")
        if sep:
            existing[user] = hashed
    lines = []
    for user, password in sorted(users.items()):
        if not user or ":" in user or not password:
            raise DeployError(
                f"registry_users: user {user!r} needs a name without ':' and a password"
            )
        hashed = existing.get(user, "")
        # bcrypt uses the first 72 bytes (the registry checks those too); bcrypt 5 raises on more
        secret = str(password).encode()[:BCRYPT_PASSWORD_MAX]
        try:
            ok = bool(hashed) and bcrypt.checkpw(secret, hashed.encode())
        except ValueError:
            ok = False
        if not ok:
            hashed = bcrypt.hashpw(secret, bcrypt.gensalt(rounds=10)).decode()
        lines.append(f"{user}:{hashed}")
    return "\n".join(lines) + "\n"


def _wait_command(reg: RegistrySettings, certs_dir: str) -> str:
    """The deploy's readiness check: `/v2/` answered as a registry over TLS, the certificate
    verified against the fleet CA for this host's name. An open port is not enough: right
    after a restart it may still belong to the dying registry."""
    dns, ips = registry_pki.registry_names()
    args = [
        f"{settings.core().venv_bin}/dockyard",
        "registry",
        "wait",
        f"https://127.0.0.1:{reg.port}",
        "--ca-file",
        f"{certs_dir}/ca.crt",
        "--server-name",
        (dns or ips)[0],
        "--timeout",
        str(REGISTRY_WAIT_SECONDS),
    ]
    if reg.client_certs:
        args += ["--cert", f"{reg.config_dir}/probe.crt", "--key", f"{reg.config_dir}/probe.key"]
    return shlex.join(args)


def _probe_client_cert(config_dir: str) -> list[Any]:
    """With mutual TLS the readiness check needs a client certificate of the fleet CA."""
    return [
        pki_file(
            name=f"Push the readiness check's client {part} ({mode})",
            pki_dir=settings.pki().pki_dir,
            kind="client",
            leaf=f"probe-{host.name}",
            part=part,
            dest=f"{config_dir}/probe.{suffix}",
            mode=mode,
        )
        for part, suffix, mode in (("cert", "crt", "0644"), ("key", "key", "0600"))
    ]


@deploy("Run the TLS registry")
def configure_registry(restart_on: Optional[list[Any]] = None) -> None:
    """
    Run the bundled registry over TLS with its data on the NFS-backed path.

    + registry_data_dir: data directory (an export of this host, or an NFS mount)
    + registry_users: htpasswd users (bcrypt); empty for no auth
    + registry_port: port to listen on
    + registry_delete_enabled, registry_client_certs, registry_log_level
    + registry_metrics_addr: the debug listener (/metrics, /debug/health), loopback by default
    + registry_notifications: webhook endpoints (distribution's notifications.endpoints)
    + registry_notifications_fleet_ca: trust the fleet CA for https endpoints (bundled core)
    + restart_on: operations (the certificate's) whose change restarts the registry

    Example:

    .. code:: python

        from dockyard_deploys.registry import configure_registry
        configure_registry()
    """
    reg = settings.registry()
    data_dir, config_dir, port = reg.data_dir, reg.config_dir, reg.port
    certs_dir = settings.pki().certs_dir
    # Only a host of the `storage` group exports; anywhere else the data must be on a mount.
    exported = nfs_server.export_holding(data_dir) is not None
    # The registry runs as the anonymous user: what it writes is owned as NFS squashes clients.
    run_user, run_group, _ = nfs_server.anonymous(current_distro())
    if reg.nfs_backed:
        require_nfs_backed(
            name=f"Check that {data_dir} is NFS-backed", path=data_dir, exported=exported
        )
    if not exported:
        files.directory(
            name=f"Create {data_dir}",
            path=data_dir,
            user=run_user,
            group=run_group,
            mode="0750",
            present=True,
        )
    files.directory(name=f"Create {config_dir}", path=config_dir, mode="0755", present=True)
    if reg.notifications and reg.image == "dockyard":
        files.directory(
            name=f"Create the notification queues' directory {NOTIFICATIONS_QUEUE_DIRECTORY}",
            path=NOTIFICATIONS_QUEUE_DIRECTORY,
            user=run_user,
            group=run_group,
            mode="0750",
            present=True,
        )
    if reg.client_certs:
        _probe_client_cert(config_dir)
    htpasswd = f"{config_dir}/htpasswd" if reg.users else None
    changed = []
    if htpasswd:
        current = host.get_fact(FileContents, path=htpasswd) or []
        content = htpasswd_content(reg.users, "\n".join(current))
        changed.append(
            files.put(
                name="Write the registry htpasswd (bcrypt)",
                src=io.StringIO(content),
                dest=htpasswd,
                user="root",
                group=run_group,
                mode="0640",
            )
        )
    config = f"{config_dir}/config.yml"
    if reg.image != "dockyard":
        _run_container(reg, certs_dir, config, htpasswd, changed, restart_on or [])
        return
    remove_registry_container(name=f"Remove the {REGISTRY_CONTAINER} container (the core serves)")
    changed.append(
        files.template(
            name=f"Write {config}",
            src=str(TEMPLATES / "registry-config.yml.j2"),
            dest=config,
            user="root",
            group=run_group,
            mode="0640",
            data_dir=data_dir,
            listen=f"0.0.0.0:{port}",
            certs_dir=certs_dir,
            delete_enabled=reg.delete_enabled,
            clientcas=reg.client_certs,
            htpasswd=htpasswd,
            realm=reg.realm,
            log_level=reg.log_level,
            **observability(reg, NOTIFICATIONS_QUEUE_DIRECTORY, f"{certs_dir}/ca.crt"),
        )
    )
    changed.append(
        files.template(
            name="Write the dockyard-registry systemd unit",
            src=str(TEMPLATES / "dockyard-registry.service.j2"),
            dest="/etc/systemd/system/dockyard-registry.service",
            mode="0644",
            listen=f"0.0.0.0:{port}",
            venv_bin=settings.core().venv_bin,
            config=config,
            data_dir=data_dir,
            requires_mounts=not exported,
            service_user=run_user,
            service_group=run_group,
        )
    )
    systemd.daemon_reload(name="Reload systemd units", _if=changed[-1].did_change)
    # Started, or restarted when it runs already, when something it reads changed: a registry
    # the first deploy starts is not restarted straight away.
    restart = systemd.service(
        name="(Re)start the registry because its configuration or certificate changed",
        service="dockyard-registry.service",
        running=True,
        restarted=True,
        _if=lambda: any(op.did_change() for op in changed + list(restart_on or [])),
    )
    keep = systemd.service(
        name="Keep the registry running and enabled",
        service="dockyard-registry.service",
        running=True,
        enabled=True,
    )
    server.shell(
        name=f"Wait until the registry answers /v2/ over TLS on port {port}",
        commands=[_wait_command(reg, certs_dir)],
        _if=lambda: restart.did_change() or keep.did_change(),
    )


def _run_container(
    reg: RegistrySettings,
    certs_dir: str,
    config: str,
    htpasswd: Optional[str],
    changed: list[Any],
    restart_on: list[Any],
) -> None:
    """The registry image as a container: config rendered here (paths as the image has them),
    everything mounted read-only but the data, recreated when any of it changes."""
    run_user, run_group, uid = nfs_server.anonymous(current_distro())
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined
    )
    rendered = env.get_template("registry-config.yml.j2").render(
        data_dir=IN_CONTAINER["data"],
        listen="0.0.0.0:5000",
        certs_dir=IN_CONTAINER["certs"],
        delete_enabled=reg.delete_enabled,
        clientcas=reg.client_certs,
        htpasswd=f"{IN_CONTAINER['auth']}/htpasswd" if htpasswd else None,
        realm=reg.realm,
        log_level=reg.log_level,
        **observability(reg, None),
    )
    files.put(
        name=f"Write {config} (for the registry container)",
        src=io.StringIO(rendered),
        dest=config,
        user="root",
        group=run_group,
        mode="0640",
    )
    stop_registry_service(name="Stop the bundled registry service (a container serves)")
    digest = hashlib.sha256(rendered.encode())
    archive_remote = None
    if reg.image_archive:
        local = Path(reg.image_archive).expanduser()
        if not local.is_file():
            raise DeployError(
                f"registry_image_archive={reg.image_archive!r}: {local} does not exist on this "
                "machine"
            )
        archive_sha = hashlib.sha256(local.read_bytes()).hexdigest()
        digest.update(archive_sha.encode())
        archive_remote = f"/var/lib/dockyard/images/{archive_sha[:16]}.tar"
        files.directory(
            name="Create /var/lib/dockyard/images",
            path="/var/lib/dockyard/images",
            mode="0700",
            present=True,
        )
        files.put(
            name=f"Push the registry image archive ({local.name})",
            src=str(local),
            dest=archive_remote,
            mode="0600",
        )
    digest.update(repr(sorted(reg.users.items())).encode())
    digest.update(f"{reg.image}|{reg.port}|{reg.data_dir}|{uid}".encode())
    run_args = [
        "--user",
        f"{uid}:{uid}",
        "-p",
        f"{reg.port}:5000",
        "-v",
        f"{config}:{IN_CONTAINER['config']}/config.yml:ro",
        "-v",
        f"{certs_dir}:{IN_CONTAINER['certs']}:ro",
        "-v",
        f"{reg.data_dir}:{IN_CONTAINER['data']}",
    ]
    if htpasswd:
        run_args += ["-v", f"{htpasswd}:{IN_CONTAINER['auth']}/htpasswd:ro"]
    created = registry_container(
        name=f"Run the registry container ({reg.image}) on port {reg.port}",
        image=reg.image,
        archive=archive_remote,
        run_args=run_args,
        digest=digest.hexdigest(),
        # The certificate and key are hashed when the operation runs, after they are issued.
        local_files=[str(path) for path in registry_pki.issued_files()],
    )
    server.shell(
        name=f"Wait until the registry answers /v2/ over TLS on port {reg.port}",
        commands=[_wait_command(reg, certs_dir)],
        _if=lambda: created.did_change() or any(op.did_change() for op in changed + restart_on),
    )
