"""Every custom pyinfra operation of dockyard, where none of pyinfra's own fit: daemon.json written
safely (validate, reload or restart, verify, roll back), the data root's backing store, fstab
lines, NFS mounts, the registry's guard, container and service, files of the control machine's
PKI, Docker named volumes with drift detection, release images pulled by digest, and failing one
host with a clear reason. Each reads facts when it runs, calls `host.noop` when nothing changes,
shows content diffs with `--diff`, and changes nothing on the control machine unless operations
execute (never in `--dry`). Each has JSON specs in tests/operations/specs."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Generator
from io import StringIO
from pathlib import Path
from typing import Any, Optional, cast

from pyinfra import host, logger, state
from pyinfra.api import (
    FileUploadCommand,
    FunctionCommand,
    HiddenValue,
    OperationValueError,
    QuoteString,
    StringCommand,
    operation,
)
from pyinfra.api.output import format_text
from pyinfra.context import ctx_state
from pyinfra.facts.files import File, FileContents
from pyinfra.facts.server import Mounts
from pyinfra.facts.systemd import SystemdEnabled, SystemdStatus
from pyinfra.operations import files
from pyinfra.operations.util.docker import handle_docker
from pyinfra.operations.util.files import generate_color_diff

from dockyard import pki
from dockyard_deploys import wheelhouse as wheels
from dockyard_deploys.facts import (
    BlockDevice,
    DockerEngine,
    DockerImagePresent,
    DockerNamedVolumes,
    DockerVolumeUsers,
    FileDigests,
    JsonFile,
    KernelNfs,
    RegistryContainer,
)

# Seconds the engine gets to answer `docker info` after a restart before it is rolled back.
ENGINE_READY_TIMEOUT = 60


def fail_command(message: str) -> StringCommand:
    """A command that fails this host with `message` on stderr (other hosts go on)."""
    return StringCommand(f"echo {shlex.quote('dockyard: ' + message)} >&2; exit 1")


def render_json(config: dict[str, Any]) -> str:
    """daemon.json as dockyard writes it: sorted keys, two-space indent, final newline."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def merge_config(current: dict[str, Any], keys: dict[str, Any]) -> dict[str, Any]:
    """Keys set by hand are kept; managed keys are set, and removed where their value is None."""
    merged = dict(current)
    for key, value in keys.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


# daemon.json keys dockerd applies when it reloads its configuration on SIGHUP (`systemctl
# reload docker`), as dockerd's reference documents ("Configuration reload behavior") and moby's
# daemon/reload.go lists them: a change to these keys alone is applied by a reload, which stops
# no container, and verified in `docker info`. Any other change restarts the engine.
RELOADABLE_KEYS: tuple[str, ...] = ("insecure-registries", "registry-mirrors", "live-restore")
# Seconds a reload gets to show its new values in `docker info` before the engine is restarted.
ENGINE_RELOAD_TIMEOUT = 10
# `docker info` templates: the registries the engine treats as insecure, and its mirrors, one a
# line.
_INSECURE_TEMPLATE = (
    '{{range $k, $v := .RegistryConfig.IndexConfigs}}{{if not $v.Secure}}{{$k}}{{"\\n"}}'
    '{{end}}{{end}}{{range .RegistryConfig.InsecureRegistryCIDRs}}{{.}}{{"\\n"}}{{end}}'
)
_MIRRORS_TEMPLATE = '{{range .RegistryConfig.Mirrors}}{{.}}{{"\\n"}}{{end}}'


def _registry_name(entry: str) -> str:
    """An insecure-registries entry as `docker info` lists it: no scheme, no trailing slash."""
    for scheme in ("http://", "https://"):
        if entry.startswith(scheme):
            entry = entry[len(scheme) :]
    return entry.rstrip("/")


def _listed(var: str, items: list[str], present: bool) -> list[str]:
    q = shlex.quote
    neg = "" if present else "! "
    return [f"{neg}printf '%s\\n' \"${var}\" | grep -qxF -- {q(i)} || return 1" for i in items]


def reload_check(current: dict[str, Any], wanted: dict[str, Any]) -> Optional[str]:
    """Shell that succeeds once `docker info` shows every changed key's new value, when only
    `RELOADABLE_KEYS` change from `current` to `wanted`; None when the change needs a restart."""
    changed = sorted(k for k in {*current, *wanted} if current.get(k) != wanted.get(k))
    if not changed or any(k not in RELOADABLE_KEYS for k in changed):
        return None
    q = shlex.quote
    lines: list[str] = []
    for key, template, norm in (
        ("insecure-registries", _INSECURE_TEMPLATE, _registry_name),
        ("registry-mirrors", _MIRRORS_TEMPLATE, lambda m: m.rstrip("/") + "/"),
    ):
        if key not in changed:
            continue
        old, new = current.get(key) or [], wanted.get(key) or []
        if not isinstance(old, list) or not isinstance(new, list):
            return None
        want = [norm(str(e)) for e in new]
        gone = [norm(str(e)) for e in old if norm(str(e)) not in want]
        if key == "insecure-registries":
            # A CIDR may be listed in a normalised form, or stay covered by a default range.
            gone = [e for e in gone if "/" not in e]
        var = "ins" if key == "insecure-registries" else "mir"
        lines.append(f"{var}=$(docker info --format {q(template)} 2>/dev/null) || return 1")
        lines += _listed(var, want, True) + _listed(var, gone, False)
    if "live-restore" in changed:
        value = wanted.get("live-restore", False)
        if not isinstance(value, bool):
            return None
        lines.append(
            "[ \"$(docker info --format '{{.LiveRestoreEnabled}}' 2>/dev/null)\" = "
            f"{str(value).lower()} ] || return 1"
        )
    return "\n".join(lines + ["return 0"])


# Run on the host by `daemon_json`; @TOKENS@ are filled in (shell-quoted) by `apply_script`.
_APPLY_SCRIPT = """set -u
cfg=@CFG@; new=@NEW@; bak=@BAK@; want=@WANT@; reload=@RELOAD@
if dockerd --help 2>&1 | grep -q -- '--validate'; then
  if ! out=$(dockerd --validate --config-file "$new" 2>&1); then
    rm -f "$new"
    echo "dockyard: dockerd --validate rejected the new $cfg, nothing changed: $out" >&2
    exit 1
  fi
fi
had=0; if [ -f "$cfg" ]; then cp -p "$cfg" "$bak"; had=1; fi
chmod 0644 "$new"; mv -f "$new" "$cfg"
start() {
  got=
  systemctl reset-failed docker.service docker.socket >/dev/null 2>&1
  systemctl restart docker.service >/dev/null 2>&1 || return 1
  i=0
  while [ $i -lt @TIMEOUT@ ]; do
    got=$(docker info --format '{{.Driver}}' 2>/dev/null) && break
    sleep 1; i=$((i + 1))
  done
  [ "$got" = "$want" ]
}
reloaded() {
@CHECK@
}
reload() {
  if [ "$(systemctl show -p CanReload docker.service 2>/dev/null)" = CanReload=yes ]; then
    systemctl reload docker.service >/dev/null 2>&1 || return 1
  else
    pid=$(systemctl show -p MainPID docker.service 2>/dev/null); pid=${pid#MainPID=}
    if [ -z "$pid" ] || [ "$pid" = 0 ]; then pid=$(pidof dockerd) || return 1; fi
    kill -HUP $pid || return 1
  fi
  i=0
  while [ $i -lt @RELOAD_TIMEOUT@ ]; do
    if [ "$(docker info --format '{{.Driver}}' 2>/dev/null)" = "$want" ] && reloaded; then
      return 0
    fi
    sleep 1; i=$((i + 1))
  done
  return 1
}
if [ "$reload" = 1 ]; then
  if reload; then
    echo "reloaded the engine (no restart): the new settings are in effect, storage driver $want"
    exit 0
  fi
  echo "the engine did not show the reloaded settings; restarting it"
fi
if start; then
  echo "storage driver $want is running"
  exit 0
fi
first=${got:-nothing}
why=$(journalctl -u docker.service --no-pager -n 80 -o cat 2>/dev/null \\
  | grep -E 'failed to start daemon|level=(error|fatal)' | tail -n 1)
if [ $had -eq 1 ]; then mv -f "$bak" "$cfg"; else rm -f "$cfg"; fi
if start || docker info >/dev/null 2>&1; then
  now=$(docker info --format '{{.Driver}}' 2>/dev/null)
  echo "dockyard: the engine did not come up with storage driver $want (got $first)." \\
    "Restored the previous $cfg; the engine runs again on ${now:-?}. Engine said: ${why:-?}" >&2
else
  echo "dockyard: the engine came up neither with $want nor on the restored $cfg;" \\
    "see 'journalctl -u docker'. Engine said: ${why:-?}" >&2
fi
exit 1
"""


def apply_script(
    path: str, staged: str, expect_driver: str, timeout: int, check: Optional[str] = None
) -> str:
    """Shell run on the host: validate the staged file, swap it in, restart, verify, roll back.

    With `check` (from `reload_check`) the engine is reloaded instead (`systemctl reload`, or
    SIGHUP to dockerd where the unit has no reload action) and `check` must pass within
    ENGINE_RELOAD_TIMEOUT; if it does not, the engine is restarted as without it. The engine is
    never left down: if it does not come back with `expect_driver`, the previous file is
    restored, the engine restarted on it, and the script exits 1 with the reason.
    """
    q = shlex.quote
    return (
        _APPLY_SCRIPT.replace("@CFG@", q(path))
        .replace("@NEW@", q(staged))
        .replace("@BAK@", q(path + ".dockyard-prev"))
        .replace("@WANT@", q(expect_driver))
        .replace("@RELOAD@", "1" if check else "0")
        .replace("@RELOAD_TIMEOUT@", str(ENGINE_RELOAD_TIMEOUT))
        .replace("@TIMEOUT@", str(int(timeout)))
        .replace("@CHECK@", check or "return 1")
    )


def _diff_wanted() -> bool:
    """Whether the run shows content diffs (`pyinfra … --diff`)."""
    return ctx_state.isset() and bool(state.config.DIFF)


def _executing() -> bool:
    """Whether operations run now (not while pyinfra prepares, detects changes or does `--dry`):
    the only time a deploy may change anything on the control machine."""
    return ctx_state.isset() and bool(state.is_executing)


def show_diff(path: str, current: Optional[list[str]], desired: str) -> None:
    """Print the content diff of `path` as `files.put` does with `--diff`."""
    if not _diff_wanted():
        return
    verb = "modify" if current is not None else "create"
    host.log(f"Will {verb} {format_text(path, bold=True)}", logger.info)
    for line in generate_color_diff(
        [line + "\n" for line in current or []], desired.splitlines(keepends=True)
    ):
        logger.info("  %s", line)
    logger.info("")


@operation()
def daemon_json(
    path: str = "/etc/docker/daemon.json",
    options: Optional[dict[str, Any]] = None,
    stage_only: bool = False,
):
    """
    Merge every concern's keys and ``options`` into daemon.json, validate, restart the engine only
    on change (reload it when only ``RELOADABLE_KEYS`` change on a running engine, and verify the
    new values in ``docker info``), verify the storage driver it reports and roll back to the
    previous file when it does not come up.

    + path: the daemon configuration file
    + options: free-form keys (``docker_daemon_options``); a key a concern manages must agree
      with it, or the host fails naming both
    + stage_only: only decide and upload the new file beside it (``PATH.dockyard-new``), no
      validation or restart: the step that runs on every host at once before a ``_serial``
      ``daemon_json`` gated on its ``did_change``, so hosts with nothing to do are not read
      again one after another
    Keys set by hand in the file are kept. The contributors are ``docker_daemon.CONTRIBUTORS``,
    asked when the operation runs (after the engine is installed); when one refuses (the
    storage configuration), nothing is written and the host fails with the reason.

    .. code:: python

        daemon_json(path="/etc/docker/daemon.json", options={"log-driver": "journald"})
    """
    from dockyard_deploys.docker_daemon import DaemonConfigRefused, desired_config

    current = host.get_fact(JsonFile, path=path)
    if current["error"]:
        yield fail_command(
            f"{path} is not valid JSON ({current['error']}); it was left as it is — "
            "fix or remove it, then deploy again"
        )
        return
    try:
        merged, driver = desired_config(current["content"] or {}, dict(options or {}))
    except DaemonConfigRefused as exc:
        yield fail_command(str(exc))
        return
    engine = host.get_fact(DockerEngine)
    healthy = bool(engine and engine["running"] and engine["driver"] == driver)
    if current["exists"] and merged == current["content"] and healthy:
        host.noop(f"{path} is up to date and the engine runs {driver}")
        return
    content = render_json(merged)
    if not stage_only and not (current["exists"] and merged == current["content"]):
        show_diff(
            path, host.get_fact(FileContents, path=path) if current["exists"] else None, content
        )
    staged = f"{path}.dockyard-new"
    # Only reloadable keys changed on a healthy engine: reload it, no container stops.
    check = (
        reload_check(current["content"] or {}, merged) if current["exists"] and healthy else None
    )
    yield StringCommand(f"mkdir -p {shlex.quote(path.rsplit('/', 1)[0] or '/')}")
    yield FileUploadCommand(StringIO(content), staged)
    if not stage_only:
        yield StringCommand(apply_script(path, staged, driver, ENGINE_READY_TIMEOUT, check))


@operation()
def fstab_entry(mountpoint: str, line: str, path: str = "/etc/fstab"):
    """
    One fstab line per mount point: replaced when it differs, added when missing, never
    duplicated; the change is shown with ``--diff``.

    + mountpoint: the mount point the line is for (its second field)
    + line: the whole fstab line
    + path: the fstab file

    .. code:: python

        fstab_entry(mountpoint="/var/lib/docker",
                    line="/srv/d.img /var/lib/docker btrfs defaults,loop 0 0")
    """
    current = host.get_fact(FileContents, path=path) or []
    matching = [i for i, text in enumerate(current) if _fstab_target(text) == mountpoint]
    if len(matching) == 1 and current[matching[0]] == line:
        host.noop(f"{path} mounts {mountpoint} as wanted")
        return
    desired = [text for i, text in enumerate(current) if i not in matching[1:]]
    if matching:
        desired[matching[0]] = line
    else:
        desired.append(line)
    if not matching:
        # files.line shows its own diff when it replaces a line, none when it appends one.
        show_diff(path, current, "".join(text + "\n" for text in desired))
    yield from files.line._inner(
        path=path,
        line=rf"^\S+\s+{re.escape(mountpoint)}\s+.*$",
        replace=line,
        extended_regex=True,
    )


def _fstab_target(text: str) -> Optional[str]:
    fields = text.split()
    if len(fields) < 2 or fields[0].startswith("#"):
        return None
    return fields[1]


_MKFS: dict[str, str] = {
    # ftype=1 gives overlay2 the d_type support it needs on xfs.
    "xfs": "mkfs.xfs -q -n ftype=1",
    "btrfs": "mkfs.btrfs -q",
}


@operation()
def data_root_device(device: str, fstype: str, mountpoint: str, size: Optional[str] = None):
    """
    Give the Docker data root a dedicated filesystem: create the loop file when asked, make the
    filesystem only on an empty device, stop the engine and mount the device (fstab is separate).

    + device: block device, or a path for a loop file
    + fstype: ``xfs`` or ``btrfs``
    + mountpoint: the engine's data root
    + size: size of the sparse loop file to create when it is missing ("4G")

    .. code:: python

        data_root_device(device="/srv/docker.img", fstype="btrfs",
                         mountpoint="/var/lib/docker", size="4G")
    """
    state = host.get_fact(BlockDevice, device=device)
    if state["exists"] and mountpoint in state["mountpoints"]:
        host.noop(f"{device} ({state['fstype']}) is mounted at {mountpoint}")
        return
    if state["exists"] and state["fstype"] and state["fstype"] != fstype:
        yield fail_command(
            f"{device} holds a {state['fstype']} filesystem and is never reformatted "
            f"(wanted {fstype})"
        )
        return
    q = shlex.quote
    if not state["exists"]:
        if size is None:
            yield fail_command(f"{device} does not exist")
            return
        yield StringCommand(f"mkdir -p $(dirname {q(device)}) && truncate -s {q(size)} {q(device)}")
    if not state["fstype"]:
        # Probe again on the host right before formatting: never format a filesystem.
        yield StringCommand(
            f"if blkid -p {q(device)} >/dev/null 2>&1; then echo 'dockyard: {device} holds a "
            f"filesystem now, not formatting it' >&2; exit 1; fi; {_MKFS[fstype]} {q(device)}"
        )
    yield StringCommand(
        "systemctl stop docker.socket docker.service >/dev/null 2>&1 || true; "
        f"mkdir -p {q(mountpoint)} && mount {q(mountpoint)}"
    )


@operation()
def storage_driver_check():
    """
    Decide the storage driver from facts when the operation runs, print it with the reason, and
    fail the host with a clear error when it cannot take the requested configuration.

    .. code:: python

        storage_driver_check(name="Choose the Docker storage driver")
    """
    from dockyard_deploys.docker_storage import StorageRefused, current_plan

    try:
        plan = current_plan()
    except StorageRefused as exc:
        yield fail_command(str(exc))
        return
    host.noop(f"storage driver {plan.driver} ({plan.reason})")


@operation()
def ordering_point(reason: str):
    """
    A step every host of the run takes at the same point of deploy.py; it changes nothing.

    pyinfra merges the hosts' operation lists in order, one operation at a time on every host:
    what one host does before this step therefore runs before what any host does after it.
    deploy.py uses it so that the storage hosts export before any host mounts.

    + reason: what this step orders (printed as its no-change message)

    .. code:: python

        ordering_point(reason="the storage hosts have exported")
    """
    host.noop(reason)
    yield from ()


@operation()
def mount_now(path: str):
    """
    Mount an fstab entry now when the kernel has an NFS client; say so when it has none.

    + path: the mount point (as in /etc/fstab)

    .. code:: python

        mount_now(path="/mnt/registry")
    """
    mounts = host.get_fact(Mounts)
    if path in mounts:
        host.noop(f"{path} is mounted")
        return
    if not host.get_fact(KernelNfs)["client"]:
        logger.warning(
            f"{host.print_prefix}the kernel has no NFS client: only /etc/fstab was written for "
            f"{path} (it mounts at boot on a kernel with NFS)"
        )
        host.noop(f"{path}: fstab written, not mounted (no NFS client in the kernel)")
        return
    yield f"mount {path} || {{ echo 'dockyard: mounting {path} failed' >&2; exit 1; }}"


@operation()
def require_nfs_backed(path: str, exported: bool):
    """
    Fail the host unless `path` is an export of this host or on an NFS mount.

    + path: the registry's data directory
    + exported: whether the path lies in one of this host's NFS exports (only hosts in the
      ``storage`` group export)

    .. code:: python

        require_nfs_backed(path="/mnt/registry", exported=False)
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


REGISTRY_CONTAINER = "dockyard-registry"


@operation()
def registry_container(
    image: str,
    archive: Optional[str],
    run_args: list[str],
    digest: str,
    local_files: Optional[list[str]] = None,
):
    """
    Run the registry container; recreate it when its configuration hash changed or it is gone.

    + image: the registry image
    + archive: an image archive on the host to `docker load` when the image is missing
    + run_args: `docker run` arguments before the image
    + digest: hash of what the container depends on (config, users, image, port)
    + local_files: control-machine files (certificate, key) hashed into the label when the
      operation runs — after they were issued, never in a dry run

    .. code:: python

        registry_container(image="registry:2", archive=None, run_args=["-p", "5443:5000"],
                           digest="3f2a...")
    """
    hasher = hashlib.sha256(digest.encode())
    for local in local_files or []:
        source = Path(local).expanduser()
        hasher.update(source.read_bytes() if source.is_file() else b"(missing)")
    label = hasher.hexdigest()[:32]
    current = host.get_fact(RegistryContainer)
    if current and current["running"] and current["hash"] == label:
        host.noop(f"{REGISTRY_CONTAINER} runs with this configuration")
        return
    if not host.get_fact(DockerImagePresent, image=image):
        if archive:
            yield f"docker load -i {shlex.quote(archive)}"
        else:
            yield f"docker pull {shlex.quote(image)}"
    if current:
        yield f"docker rm -f {REGISTRY_CONTAINER}"
    args = " ".join(shlex.quote(a) for a in run_args)
    yield (
        f"docker run -d --name {REGISTRY_CONTAINER} --restart always "
        f"--label dockyard.hash={label} {args} {shlex.quote(image)}"
    )


@operation()
def remove_registry_container():
    """
    Remove the registry container when the bundled core serves instead.

    .. code:: python

        remove_registry_container()
    """
    if host.get_fact(RegistryContainer):
        yield f"docker rm -f {REGISTRY_CONTAINER}"
    else:
        host.noop(f"no {REGISTRY_CONTAINER} container")


@operation()
def stop_registry_service():
    """
    Stop and disable the bundled core's service when a container serves instead.

    .. code:: python

        stop_registry_service()
    """
    status = host.get_fact(SystemdStatus)
    enabled = host.get_fact(SystemdEnabled)
    unit = "dockyard-registry.service"
    if status.get(unit) or enabled.get(unit):
        yield f"systemctl disable --now {unit}"
    else:
        host.noop(f"{unit} is not running")


def pki_pending(pki_dir: str, kind: str, leaf: str, dns: list[str], ips: list[str]) -> str:
    """Why the control machine's PKI would create or issue something for this file ("" when it
    is there and valid), by `dockyard.pki`'s own rules, read-only: for change detection and
    `--dry`."""
    if kind == "ca":
        return pki.pending(pki_dir)
    return pki.pending(pki_dir, leaf, dns, ips, server=kind == "server")


def pki_source(pki_dir: str, kind: str, leaf: str, part: str) -> Path:
    """The control-machine file a PKI upload sends."""
    base = Path(pki_dir).expanduser()
    if kind == "ca":
        return base / "ca.crt"
    return base / f"{leaf}.{'crt' if part == 'cert' else 'key'}"


@operation()
def pki_file(
    pki_dir: str,
    kind: str,
    dest: str,
    leaf: str = "",
    part: Optional[str] = None,
    dns: Optional[list[str]] = None,
    ips: Optional[list[str]] = None,
    user: Optional[str] = None,
    group: Optional[str] = None,
    mode: str = "0644",
):
    """
    Upload a file of the fleet PKI kept on the control machine (the CA's key never leaves it).
    The CA is created and the certificate issued (or reissued: missing, expiring, names changed,
    another CA) only when operations execute; while pyinfra prepares or runs ``--dry`` nothing
    is created: the run says what would be issued.

    + pki_dir: control-machine PKI directory
    + kind: ``ca`` (its certificate), ``server`` or ``client`` (a leaf certificate)
    + dest: path on the host
    + leaf: the leaf certificate's name (``registry-<host>``, ``client-<host>``)
    + part: ``cert`` or ``key`` of a leaf (required for a leaf)
    + dns, ips: a server certificate's subjectAltNames
    + user, group, mode: of the file on the host

    .. code:: python

        pki_file(pki_dir="~/.local/share/dockyard/pki", kind="ca",
                 dest="/etc/docker/certs.d/reg:5443/ca.crt", mode="0444")
    """
    # A leaf's part is always named: a default would push the certificate where the key
    # belongs (it did, for client certificates) and nothing would say so until a TLS handshake.
    if kind == "ca" and part in (None, "cert"):
        part = "cert"
    elif kind not in ("server", "client") or part not in ("cert", "key"):
        raise OperationValueError(
            f"pki_file: kind={kind!r} part={part!r} is not valid; valid: kind 'ca' (part "
            "omitted or 'cert'), or kind 'server'/'client' with part 'cert' or 'key'"
        )
    dns, ips = list(dns or []), list(ips or [])
    source = pki_source(pki_dir, kind, leaf, part)
    if _executing():
        if kind == "ca":
            pki.ensure_ca(pki_dir)
        elif kind == "server":
            pki.ensure_server_cert(pki_dir, leaf, dns, ips)
        else:
            pki.ensure_client_cert(pki_dir, leaf)
    else:
        pending = pki_pending(pki_dir, kind, leaf, dns, ips)
        if pending:
            what = "create the fleet CA" if kind == "ca" else f"issue {leaf}.crt ({pending})"
            host.log(
                f"would {what} in {pki_dir} on this machine and push {source.name} to {dest} "
                "(nothing is created before operations run)",
                logger.info,
            )
            yield FileUploadCommand(str(source), dest)
            return
    yield from files.put._inner(src=str(source), dest=dest, user=user, group=group, mode=mode)


# A release image: REGISTRY[:PORT]/REPOSITORY@sha256:<hex> (the registry part is a host: it has
# a dot or a port, or is localhost, as docker reads references).
_RELEASE_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
RELEASE_IMAGE = re.compile(
    r"^(?P<registry>(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+|localhost|[A-Za-z0-9-]+(?=:)|"
    r"\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?)"
    rf"/{_RELEASE_COMPONENT}(?:/{_RELEASE_COMPONENT})*@sha256:[0-9a-f]{{64}}$"
)


def release_pull_command(
    image: str, user: Optional[str] = None, password: Optional[str] = None
) -> StringCommand:
    """`docker pull IMAGE`, logged in first (when `user` is given) with a throwaway
    DOCKER_CONFIG: no credentials stay on the host, the password is masked in pyinfra's
    output and reaches docker on stdin through `printf` (a shell builtin: no process shows it)."""
    match = RELEASE_IMAGE.match(image)
    if not match:
        raise OperationValueError(
            f"{image!r} is not a release image; valid: REGISTRY[:PORT]/REPOSITORY@sha256:<hex>"
        )
    registry, ref = match.group("registry"), shlex.quote(image)
    bits: list[Any] = [
        'd=$(mktemp -d) || exit 1; trap \'rm -rf "$d"\' EXIT; export DOCKER_CONFIG="$d"\n'
    ]
    if user:
        bits += [
            "printf '%s'",
            HiddenValue(shlex.quote(password or "")),
            f"| docker login --username {shlex.quote(user)} --password-stdin "
            f'{shlex.quote(registry)} >/dev/null 2>"$d/err" || '
            + "{ echo "
            + shlex.quote(f"dockyard: docker login {registry} as {user} failed:")
            + ' "$(tail -n 2 "$d/err")" >&2; exit 1; }\n',
        ]
    bits.append(
        f'docker pull -q {ref} >/dev/null 2>"$d/err" || '
        + "{ echo "
        + shlex.quote(f"dockyard: docker pull {image} failed:")
        + ' "$(tail -n 2 "$d/err")" >&2; exit 1; }'
    )
    return StringCommand(*bits)


@operation()
def docker_release_image(image: str, user: Optional[str] = None, password: Optional[str] = None):
    """
    Pull a release image by digest unless the engine has it already (``docker image inspect``
    of the digest reference), logged in as ``user`` with a throwaway ``DOCKER_CONFIG``.

    + image: ``REGISTRY[:PORT]/REPOSITORY@sha256:<hex>`` (a digest: what is pulled never moves)
    + user: registry user to log in as first (None: no login)
    + password: its password (masked in pyinfra's output)

    .. code:: python

        docker_release_image(
            name="Pull the release image",
            image="registry-01:5443/team/app@sha256:3f2a…",
            user="fleet", password="…",
        )
    """
    command = release_pull_command(image, user, password)
    if host.get_fact(DockerImagePresent, image=image):
        host.noop(f"the engine has {image}")
        return
    yield command


@operation()
def core_venv(path: str, python: str = "python3"):
    """
    Create the venv the core is installed into, without pip: the install runs pip from the
    wheelhouse's own pip wheel (ensurepip would install and byte-compile pip into the venv
    first, 88 of the 89 s creating it took on an emulated lab VM). An existing venv is kept,
    pip or not.

    + path: the venv's directory
    + python: the interpreter that makes it

    Example:

    .. code:: python

        core_venv(name="Create the venv /opt/dockyard/venv", path="/opt/dockyard/venv")
    """
    # bin/activate, as pyinfra's own venv operation checks (bin/python is a symlink: File is
    # false for it)
    if host.get_fact(File, path=f"{path}/bin/activate"):
        host.noop(f"the venv {path} exists")
        return
    yield StringCommand(python, "-m", "venv", "--without-pip", QuoteString(path))


@operation()
def sync_wheelhouse(
    version: str, machine: str, cache: str, dest: str
) -> Generator[Any, None, None]:
    """
    Sync the control machine's wheelhouse for Python `version` on `machine` to `dest`, building
    it first if it is not cached. The build happens only while operations execute: change
    detection (and so `pyinfra --dry`) reports a change and creates nothing on the control machine.

    + version: the host's Python version (``3.11``)
    + machine: the host's architecture (``x86_64``)
    + cache: control-machine cache of wheelhouses
    + dest: directory on the host

    Example:

    .. code:: python

        sync_wheelhouse(
            name="Push the dockyard wheelhouse",
            version="3.11", machine="x86_64",
            cache="~/.cache/dockyard/wheelhouse", dest="/opt/dockyard/wheelhouse",
        )
    """
    if not wheels.wheelhouse_ready(version, machine, cache):
        if not state.is_executing:
            # Only iterated to detect a change: this command never runs.
            yield FunctionCommand(wheels.build_wheelhouse, (version, machine, cache), {})
            return
        wheels.build_wheelhouse(version, machine, cache)
    local = wheels.wheelhouse_digests(version, machine, cache)
    if local and host.get_fact(FileDigests, path=dest) == local:
        host.noop(f"{dest} holds the wheelhouse ({len(local)} files, sha256 checked)")
        return
    # One upload of the whole wheelhouse (a tar), unpacked beside `dest` and swapped in: a
    # host never holds half of one, and a wheel that is no longer in it goes with the old copy.
    archive = (
        wheels.wheelhouse_archive(version, machine, cache)
        if state.is_executing
        else wheels.wheelhouse_archive_path(version, machine, cache)
    )
    quoted = shlex.quote(dest)
    parent = shlex.quote(str(Path(dest).parent))
    yield StringCommand(f"mkdir -p {parent}")
    yield FileUploadCommand(str(archive), f"{dest}.tar")
    yield StringCommand(
        f"rm -rf {quoted}.new && mkdir -m 0755 {quoted}.new && "
        f"tar -xf {quoted}.tar -C {quoted}.new --no-same-owner && rm -f {quoted}.tar && "
        f"rm -rf {quoted}.old && {{ ! test -e {quoted} || mv {quoted} {quoted}.old; }} && "
        f"mv {quoted}.new {quoted} && rm -rf {quoted}.old"
    )


def volume_drift(
    current: dict[str, Any], driver: str, options: dict[str, str], labels: dict[str, str]
) -> list[str]:
    """What differs between an existing volume and the declared one, one phrase per difference
    (empty: nothing drifted)."""
    out = []
    if current["driver"] != driver:
        out.append(f"driver {current['driver']!r} → {driver!r}")
    for what, have, want in (
        ("option", current["options"], options),
        ("label", current["labels"], labels),
    ):
        for key in sorted(set(have) | set(want)):
            if have.get(key) != want.get(key):
                was = repr(have[key]) if key in have else "unset"
                now = repr(want[key]) if key in want else "unset"
                out.append(f"{what} {key} {was} → {now}")
    return out


def _keeps_data_inside(current: dict[str, Any]) -> bool:
    """Whether a volume's data lives in the volume itself (a plain local volume under the data
    root), so that removing the volume deletes it; NFS, bind and other device-backed volumes
    keep their data elsewhere."""
    return current["driver"] == "local" and "device" not in current["options"]


@operation()
def docker_volume(
    volume: str,
    driver: str = "local",
    options: Optional[dict[str, str]] = None,
    labels: Optional[dict[str, str]] = None,
    present: bool = True,
):
    """
    A Docker named volume with exactly these driver options and labels. Docker cannot change a
    volume's options, so a volume that drifted is recreated — only when no container (running
    or stopped) uses it and its data does not live in the volume itself; otherwise the host
    fails naming the volume, the drift and the containers. Removed only with ``present=False``,
    and only when no container uses it.

    + volume: the volume's name
    + driver: the volume driver (``local``)
    + options: driver options (``--opt``), e.g. the local driver's ``type``, ``o``, ``device``
    + labels: the volume's labels
    + present: ``False`` removes the volume

    .. code:: python

        docker_volume(
            name="Docker volume wp_content",
            volume="wp_content",
            options={"type": "nfs", "o": "addr=nfs-01,nfsvers=4", "device": ":/srv/exports/wp"},
            labels={"app": "wordpress"},
        )
    """
    options, labels = dict(options or {}), dict(labels or {})
    current = host.get_fact(DockerNamedVolumes).get(volume)
    if not present:
        if current is None:
            host.noop(f"no volume {volume}")
            return
        users = host.get_fact(DockerVolumeUsers, volume=volume)
        if users:
            yield fail_command(
                f"volume {volume} is not removed: containers use it: {', '.join(users)} "
                "(remove them first: docker rm)"
            )
            return
        yield handle_docker(resource="volume", command="remove", volume=volume)
        return
    create = handle_docker(
        resource="volume",
        command="create",
        volume=volume,
        driver=driver,
        labels=[f"{k}={v}" for k, v in sorted(labels.items())],
        options=[f"{k}={v}" for k, v in sorted(options.items())],
        present=True,
    )
    if current is None:
        yield create
        return
    drift = volume_drift(current, driver, options, labels)
    if not drift:
        host.noop(f"volume {volume} has the declared driver, options and labels")
        return
    users = host.get_fact(DockerVolumeUsers, volume=volume)
    if users:
        yield fail_command(
            f"volume {volume} drifted ({'; '.join(drift)}) but is not recreated: containers use "
            f"it: {', '.join(users)} (remove them, deploy again, then recreate them)"
        )
        return
    if _keeps_data_inside(current):
        yield fail_command(
            f"volume {volume} drifted ({'; '.join(drift)}) but is not recreated: its data lives "
            f"in the volume and would be deleted; remove it yourself (docker volume rm {volume}) "
            "and deploy again to recreate it empty"
        )
        return
    yield handle_docker(resource="volume", command="remove", volume=volume)
    yield create
