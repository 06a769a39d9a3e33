"""Custom pyinfra operations where none of pyinfra's own fit: writing daemon.json safely (validate,
restart, verify, roll back), giving the data root a backing store, and failing one host with a
clear reason. Each reads facts when it runs and calls `host.noop` when nothing changes."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from io import StringIO
from typing import Any, Optional

from pyinfra import host
from pyinfra.api import FileUploadCommand, StringCommand, operation

from dockyard_deploys.facts import BlockDevice, DockerEngine, JsonFile

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


# Run on the host by `daemon_json`; @TOKENS@ are filled in (shell-quoted) by `apply_script`.
_APPLY_SCRIPT = """set -u
cfg=@CFG@; new=@NEW@; bak=@BAK@; want=@WANT@
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


def apply_script(path: str, staged: str, expect_driver: str, timeout: int) -> str:
    """Shell run on the host: validate the staged file, swap it in, restart, verify, roll back.

    The engine is never left down: if it does not come back with `expect_driver`, the previous
    file is restored, the engine restarted on it, and the script exits 1 with the reason.
    """
    q = shlex.quote
    return (
        _APPLY_SCRIPT.replace("@CFG@", q(path))
        .replace("@NEW@", q(staged))
        .replace("@BAK@", q(path + ".dockyard-prev"))
        .replace("@WANT@", q(expect_driver))
        .replace("@TIMEOUT@", str(int(timeout)))
    )


@operation()
def daemon_json(
    keys: Callable[[dict[str, Any]], dict[str, Any]],
    path: str = "/etc/docker/daemon.json",
):
    """
    Merge managed keys into daemon.json, validate, restart the engine only on change, verify the
    storage driver it reports and roll back to the previous file when it does not come up.

    + keys: given the current content, returns the managed keys (None removes a key); called
      when the operation runs. Their "storage-driver" is what `docker info` must report
      afterwards; without one (the storage configuration was refused) nothing is written.
    + path: the daemon configuration file

    .. code:: python

        daemon_json(keys=lambda current: {"storage-driver": "overlay2"})
    """
    current = host.get_fact(JsonFile, path=path)
    if current["error"]:
        yield fail_command(
            f"{path} is not valid JSON ({current['error']}); it was left as it is — "
            "fix or remove it, then deploy again"
        )
        return
    wanted = keys(current["content"] or {})
    driver = wanted.get("storage-driver")
    if not driver:
        host.noop(f"{path} left as it is: the storage configuration was refused")
        return
    merged = merge_config(current["content"] or {}, wanted)
    engine = host.get_fact(DockerEngine)
    healthy = bool(engine and engine["running"] and engine["driver"] == driver)
    if current["exists"] and merged == current["content"] and healthy:
        host.noop(f"{path} is up to date and the engine runs {driver}")
        return
    staged = f"{path}.dockyard-new"
    yield StringCommand(f"mkdir -p {shlex.quote(path.rsplit('/', 1)[0] or '/')}")
    yield FileUploadCommand(StringIO(render_json(merged)), staged)
    yield StringCommand(apply_script(path, staged, driver, ENGINE_READY_TIMEOUT))


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
