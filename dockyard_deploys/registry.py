"""The fleet's TLS registry on `registry` hosts: the bundled core (`dockyard registry serve`) as a
systemd service, with `config.yml` from a template (storage root, delete, headers, health,
htpasswd auth when users are given), the certificate and key from `registry_pki`, and its data on
the NFS-backed path. A registry whose storage is declared NFS-backed is never started on a path
that is neither an export of this host nor an NFS mount (it would write to the local disk)."""

from __future__ import annotations

import hashlib
import io
import shlex
from pathlib import Path
from typing import Any, Optional, cast

import jinja2
from pyinfra import host
from pyinfra.api import DeployError, FactBase, deploy, operation
from pyinfra.facts.files import FileContents
from pyinfra.facts.server import Mounts
from pyinfra.facts.systemd import SystemdEnabled, SystemdStatus
from pyinfra.operations import files, server, systemd

from dockyard import pki
from dockyard.registry.auth import BCRYPT_PASSWORD_MAX
from dockyard_deploys import nfs_server, registry_pki
from dockyard_deploys.common import current_distro
from dockyard_deploys.dockyard_core import venv_bin
from dockyard_deploys.operations import fail_command
from dockyard_deploys.registry_trust import DEFAULTS as TRUST_DEFAULTS
from dockyard_deploys.registry_trust import pki_dir

TEMPLATES = Path(__file__).resolve().parent / "templates"
# Seconds the deploy waits after a (re)start for the registry to answer /v2/ over TLS.
REGISTRY_WAIT_SECONDS = 30

DEFAULTS: dict[str, Any] = {
    # The registry's data directory: on the storage host an exported path, elsewhere an NFS mount.
    "registry_data_dir": "/srv/exports/registry",
    # Refuse to start unless registry_data_dir is an export of this host or an NFS mount.
    "registry_nfs_backed": True,
    # Users and passwords for htpasswd (bcrypt) auth; empty: no auth.
    "registry_users": {},
    # Realm of the basic-auth challenge.
    "registry_realm": "dockyard",
    # Allow DELETE of manifests and blobs.
    "registry_delete_enabled": False,
    # Require client certificates signed by the fleet CA (mutual TLS).
    "registry_client_certs": False,
    # Log level of the registry (error, warn, info, debug).
    "registry_log_level": "info",
    # Where config.yml and htpasswd live on the registry host.
    "registry_config_dir": "/etc/dockyard/registry",
    # "dockyard" (the bundled core, a systemd service) or an image such as "registry:2",
    # run as the container dockyard-registry (restart always, data on registry_data_dir).
    "registry_image": "dockyard",
    # A `docker save` archive on the control machine that holds registry_image: pushed and
    # loaded when the host lacks the image (fleets and the lab may have no Docker Hub).
    "registry_image_archive": None,
}

CONTAINER = "dockyard-registry"
# Paths inside a registry container (as the registry image has them).
IN_CONTAINER = {
    "data": "/var/lib/registry",
    "certs": "/certs",
    "config": "/etc/docker/registry",
    "auth": "/auth",
}


@operation()
def require_nfs_backed(path: str, exported: bool):
    """
    Fail the host unless `path` is an export of this host or an NFS mount.

    + path: the registry's data directory
    + exported: whether the path lies in one of this host's NFS exports
    """
    if exported:
        host.noop(f"{path} is exported by this host")
        return
    mounts: dict[str, Any] = dict(cast(Any, host.get_fact)(Mounts) or {})
    best = max(
        (m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")),
        key=len,
        default="/",
    )
    if mounts.get(best, {}).get("type") in ("nfs", "nfs4"):
        host.noop(f"{path} is on the NFS mount {best}")
        return
    yield fail_command(
        f"registry_data_dir {path} is not NFS-backed (it is on {best}, not an NFS mount or an "
        "export of this host): the registry is not started, it would write to the local disk; "
        "mount the export (nfs_client_mounts) or set registry_nfs_backed=false"
    )


class RegistryContainer(FactBase[dict]):
    """
    The registry container: whether it runs and the configuration hash it was created with.

    .. code:: python

        # true|3f2a...
        {"running": True, "hash": "3f2a..."}
    """

    def command(self) -> str:
        return (
            f"docker inspect -f '{{{{.State.Running}}}}|{{{{index .Config.Labels "
            f'"dockyard.hash"}}}}\' {CONTAINER} 2>/dev/null || true'
        )

    def requires_command(self) -> str:
        return "docker"

    @staticmethod
    def default() -> dict:
        return {}

    def process(self, output) -> dict:
        line = " ".join(output).strip()
        if "|" not in line:
            return {}
        running, _, digest = line.partition("|")
        return {"running": running == "true", "hash": digest}


class DockerImagePresent(FactBase[bool]):
    """Whether the engine has an image (``docker image inspect``)."""

    def command(self, image: str) -> str:
        return f"docker image inspect {shlex.quote(image)} >/dev/null 2>&1 && echo yes || echo no"

    def requires_command(self, image: str) -> str:
        return "docker"

    @staticmethod
    def default() -> bool:
        return False

    def process(self, output) -> bool:
        return " ".join(output).strip() == "yes"


@operation()
def registry_container(image: str, archive: Optional[str], run_args: list[str], digest: str):
    """
    Run the registry container; recreate it when its configuration hash changed or it is gone.

    + image: the registry image
    + archive: an image archive on the host to `docker load` when the image is missing
    + run_args: `docker run` arguments before the image
    + digest: hash of everything the container depends on (config, certificate, image)
    """
    current = host.get_fact(RegistryContainer)
    if current.get("running") and current.get("hash") == digest:
        host.noop(f"{CONTAINER} runs with this configuration")
        return
    if not host.get_fact(DockerImagePresent, image=image):
        if archive:
            yield f"docker load -i {shlex.quote(archive)}"
        else:
            yield f"docker pull {shlex.quote(image)}"
    if current:
        yield f"docker rm -f {CONTAINER}"
    args = " ".join(shlex.quote(a) for a in run_args)
    yield (
        f"docker run -d --name {CONTAINER} --restart always --label dockyard.hash={digest} "
        f"{args} {shlex.quote(image)}"
    )


@operation()
def remove_registry_container():
    """Remove the registry container when the bundled core serves instead."""
    if host.get_fact(RegistryContainer):
        yield f"docker rm -f {CONTAINER}"
    else:
        host.noop(f"no {CONTAINER} container")


@operation()
def stop_registry_service():
    """Stop and disable the bundled core's service when a container serves instead."""
    status = host.get_fact(SystemdStatus)
    enabled = host.get_fact(SystemdEnabled)
    unit = "dockyard-registry.service"
    if status.get(unit) or enabled.get(unit):
        yield f"systemctl disable --now {unit}"
    else:
        host.noop(f"{unit} is not running")


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


def _wait_command(port: int, certs_dir: str, config_dir: str) -> str:
    """The deploy's readiness check: `/v2/` answered as a registry over TLS, the certificate
    verified against the fleet CA for this host's name. An open port is not enough: right
    after a restart it may still belong to the dying registry."""
    dns, ips = registry_pki.registry_names()
    args = [
        f"{venv_bin(host.data)}/dockyard",
        "registry",
        "wait",
        f"https://127.0.0.1:{port}",
        "--ca-file",
        f"{certs_dir}/ca.crt",
        "--server-name",
        (dns or ips)[0],
        "--timeout",
        str(REGISTRY_WAIT_SECONDS),
    ]
    if host.data.get("registry_client_certs"):
        args += ["--cert", f"{config_dir}/probe.crt", "--key", f"{config_dir}/probe.key"]
    return shlex.join(args)


def _probe_client_cert(config_dir: str) -> list[Any]:
    """With mutual TLS the readiness check needs a client certificate of the fleet CA."""
    client = pki.ensure_client_cert(pki_dir(), f"probe-{host.name}")
    return [
        files.put(
            name="Push the readiness check's client certificate",
            src=str(client.cert),
            dest=f"{config_dir}/probe.crt",
            mode="0644",
        ),
        files.put(
            name="Push the readiness check's client key (0600)",
            src=str(client.key),
            dest=f"{config_dir}/probe.key",
            mode="0600",
        ),
    ]


@deploy("Run the TLS registry", data_defaults={**DEFAULTS, **TRUST_DEFAULTS})
def configure_registry(restart_on: Optional[list[Any]] = None) -> None:
    """
    Run the bundled registry over TLS with its data on the NFS-backed path.

    + registry_data_dir: data directory (an export here, or an NFS mount)
    + registry_users: htpasswd users (bcrypt); empty for no auth
    + registry_port: port to listen on
    + registry_delete_enabled, registry_client_certs, registry_log_level
    + restart_on: operations (the certificate's) whose change restarts the registry

    Example:

    .. code:: python

        from dockyard_deploys.registry import configure_registry
        configure_registry()
    """
    data_dir = str(host.data.get("registry_data_dir"))
    config_dir = str(host.data.get("registry_config_dir"))
    certs_dir = str(host.data.get("registry_certs_dir") or "/etc/dockyard/registry/certs")
    port = int(host.data.get("registry_port"))
    if not 0 < port < 65536:
        raise DeployError(f"registry_port={port} is not a TCP port")
    exported = nfs_server.exports_for_registry() is not None
    # The registry runs as the anonymous user: what it writes is owned as NFS squashes clients.
    run_user, run_group, _ = nfs_server.anonymous(current_distro())
    if host.data.get("registry_nfs_backed"):
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
    if host.data.get("registry_client_certs"):
        _probe_client_cert(config_dir)
    users = dict(host.data.get("registry_users") or {})
    htpasswd = f"{config_dir}/htpasswd" if users else None
    changed = []
    if htpasswd:
        current = host.get_fact(FileContents, path=htpasswd) or []
        content = htpasswd_content(users, "\n".join(current))
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
    image = str(host.data.get("registry_image") or "dockyard")
    if image != "dockyard":
        _run_container(
            image,
            port,
            data_dir,
            config_dir,
            certs_dir,
            config,
            htpasswd,
            changed,
            restart_on or [],
        )
        return
    remove_registry_container(name=f"Remove the {CONTAINER} container (the core serves)")
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
            delete_enabled=bool(host.data.get("registry_delete_enabled")),
            clientcas=bool(host.data.get("registry_client_certs")),
            htpasswd=htpasswd,
            realm=str(host.data.get("registry_realm")),
            log_level=str(host.data.get("registry_log_level")),
        )
    )
    changed.append(
        files.template(
            name="Write the dockyard-registry systemd unit",
            src=str(TEMPLATES / "dockyard-registry.service.j2"),
            dest="/etc/systemd/system/dockyard-registry.service",
            mode="0644",
            listen=f"0.0.0.0:{port}",
            venv_bin=venv_bin(host.data),
            config=config,
            data_dir=data_dir,
            requires_mounts=not exported,
            service_user=run_user,
            service_group=run_group,
        )
    )
    systemd.daemon_reload(name="Reload systemd units", _if=changed[-1].did_change)
    systemd.service(
        name="Keep the registry running and enabled",
        service="dockyard-registry.service",
        running=True,
        enabled=True,
    )
    restart = systemd.service(
        name="Restart the registry because its configuration or certificate changed",
        service="dockyard-registry.service",
        restarted=True,
        _if=lambda: any(op.did_change() for op in changed + list(restart_on or [])),
    )
    server.shell(
        name=f"Wait until the registry answers /v2/ over TLS on port {port}",
        commands=[_wait_command(port, certs_dir, config_dir)],
        _if=restart.did_change,
    )


def _run_container(
    image: str,
    port: int,
    data_dir: str,
    config_dir: str,
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
        delete_enabled=bool(host.data.get("registry_delete_enabled")),
        clientcas=bool(host.data.get("registry_client_certs")),
        htpasswd=f"{IN_CONTAINER['auth']}/htpasswd" if htpasswd else None,
        realm=str(host.data.get("registry_realm")),
        log_level=str(host.data.get("registry_log_level")),
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
    archive = host.data.get("registry_image_archive")
    if archive:
        local = Path(str(archive)).expanduser()
        if not local.is_file():
            raise DeployError(f"registry_image_archive {local} does not exist on this machine")
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
    for key in ("registry_users",):
        digest.update(repr(sorted((host.data.get(key) or {}).items())).encode())
    digest.update(f"{image}|{port}|{data_dir}|{uid}".encode())
    issued = registry_pki.issue()
    for path in (issued.cert, issued.key):
        digest.update(Path(path).read_bytes())
    run_args = [
        "--user",
        f"{uid}:{uid}",
        "-p",
        f"{port}:5000",
        "-v",
        f"{config}:{IN_CONTAINER['config']}/config.yml:ro",
        "-v",
        f"{certs_dir}:{IN_CONTAINER['certs']}:ro",
        "-v",
        f"{data_dir}:{IN_CONTAINER['data']}",
    ]
    if htpasswd:
        run_args += ["-v", f"{htpasswd}:{IN_CONTAINER['auth']}/htpasswd:ro"]
    created = registry_container(
        name=f"Run the registry container ({image}) on port {port}",
        image=image,
        archive=archive_remote,
        run_args=run_args,
        digest=digest.hexdigest()[:32],
    )
    server.shell(
        name=f"Wait until the registry answers /v2/ over TLS on port {port}",
        commands=[_wait_command(port, certs_dir, config_dir)],
        _if=lambda: created.did_change() or any(op.did_change() for op in changed + restart_on),
    )
