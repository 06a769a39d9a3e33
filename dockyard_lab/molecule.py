"""molecule's delegated driver over the lab (control machine only): `python -m
dockyard_lab.molecule create|converge|verify|destroy` is the one command each thin playbook of
`molecule/<scenario>/` runs. create brings the lab up (`dockyard-lab up`, plus the arguments in
DOCKYARD_LAB_UP_ARGS) and writes, from `dockyard-lab status --json`, molecule's instance config
and an Ansible inventory of the lab hosts with strict host-key checking; converge runs the deploy
as users run it (`pyinfra --json inventory/lab.py deploy.py -y`), passes pyinfra's log through and
prints one JSON object whose `changed` (pyinfra's totals: operations that changed something) the
playbook turns into the task's `changed`, so molecule's idempotence step works unchanged; verify
runs the scenario's testinfra checks with pytest; destroy brings the lab down."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The venv's bin directory: pyinfra and pytest are this interpreter's.
BIN = Path(sys.executable).parent
# The Ansible inventory create writes into molecule's inventory directory (molecule keeps files
# it did not write there, and gives the directory to every ansible-playbook run).
INVENTORY_NAME = "dockyard-lab.yml"
# The lab's known_hosts, linked into molecule's ephemeral directory for molecule.yml's
# `driver.ssh_connection_options` (which cannot run code, only read the environment).
KNOWN_HOSTS_LINK = "known_hosts"
# Bound on one pyinfra run (a first deploy installs the engine on every host from Debian).
CONVERGE_TIMEOUT = 1800


def _env_path(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"dockyard_lab.molecule: {name} is not set (run this through molecule)")
    return Path(value)


def _project() -> Path:
    return Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY") or Path.cwd())


def lab(*args: str, capture: bool = False) -> str:
    """Run `dockyard-lab ARGS` with this interpreter; its output passes through unless captured."""
    proc = subprocess.run(
        [sys.executable, "-m", "dockyard_lab.cli", *args],
        stdout=subprocess.PIPE if capture else None,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"dockyard_lab.molecule: `dockyard-lab {' '.join(args)}` failed")
    return proc.stdout or ""


def lab_hosts() -> list[dict[str, Any]]:
    """The running lab's hosts, as `dockyard-lab status --json` lists them."""
    hosts: list[dict[str, Any]] = json.loads(lab("status", "--json", capture=True))
    return [h for h in hosts if h["state"] == "running"]


def ssh_options(known_hosts: str) -> list[str]:
    """ssh options for a lab host: its key must be the one in the lab's known_hosts (no
    trust on first use, no key from an agent or ~/.ssh, no password prompt); a connection
    whose host went away (a rebooted VM) ends within 15 s rather than hanging a multiplexed
    session."""
    return [
        f"-o UserKnownHostsFile={known_hosts}",
        "-o StrictHostKeyChecking=yes",
        "-o IdentitiesOnly=yes",
        "-o BatchMode=yes",
        "-o ServerAliveInterval=5",
        "-o ServerAliveCountMax=3",
    ]


def ssh_control_path(user: str, address: str, known_hosts: str) -> str:
    """A control socket for ssh multiplexing to one lab host (testinfra opens it with
    ControlMaster=auto and keeps it 60 s): a new ssh connection to an emulated VM costs seconds
    (key exchange and host-key signature under software emulation: 6-8 s on a loaded machine,
    under 1 s through the socket). Keyed by user, address and known_hosts file, so a check with
    another known_hosts never reuses a connection whose host key was verified against this
    one; short, for the socket path limit; in a directory only root can enter."""
    digest = hashlib.sha256(f"{user}@{address} {known_hosts}".encode()).hexdigest()[:16]
    directory = Path(tempfile.gettempdir()) / f"dockyard-ssh-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    if directory.stat().st_uid != os.getuid() or directory.stat().st_mode & 0o077:
        raise PermissionError(f"{directory} is not a private directory of this user")
    return str(directory / digest)


def instance_config(hosts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """molecule's instance config (the delegated driver's keys) for the lab hosts."""
    return [
        {
            "instance": h["name"],
            "address": h["address"],
            "user": h["ssh_user"],
            "port": 22,
            "identity_file": h["ssh_key"],
        }
        for h in hosts
    ]


def ansible_inventory(hosts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """An Ansible inventory of the lab hosts in their groups, reached over ssh with strict
    host-key checking against the lab's known_hosts."""
    members: dict[str, dict[str, Any]] = {}
    for h in hosts:
        for group in h["groups"]:
            members.setdefault(group, {"hosts": {}})["hosts"][h["name"]] = None
    return {
        "all": {
            "hosts": {
                h["name"]: {
                    "ansible_host": h["address"],
                    "ansible_user": h["ssh_user"],
                    "ansible_port": 22,
                    "ansible_ssh_private_key_file": h["ssh_key"],
                    "ansible_ssh_common_args": " ".join(ssh_options(h["ssh_known_hosts"])),
                    "ansible_python_interpreter": "/usr/bin/python3",
                }
                for h in hosts
            },
            "children": members,
        }
    }


def _write(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    path.chmod(0o600)


def create() -> int:
    """`dockyard-lab up` (a running lab is kept as it is), then molecule's instance config, the
    inventory and the known_hosts link."""
    lab("up", *shlex.split(os.environ.get("DOCKYARD_LAB_UP_ARGS", "")))
    hosts = lab_hosts()
    if not hosts:
        raise SystemExit("dockyard_lab.molecule: `dockyard-lab up` left no running host")
    ephemeral = _env_path("MOLECULE_EPHEMERAL_DIRECTORY")
    # JSON is YAML: molecule and Ansible read these as YAML.
    _write(_env_path("MOLECULE_INSTANCE_CONFIG"), json.dumps(instance_config(hosts), indent=2))
    _write(ephemeral / "inventory" / INVENTORY_NAME, json.dumps(ansible_inventory(hosts), indent=2))
    link = ephemeral / KNOWN_HOSTS_LINK
    link.unlink(missing_ok=True)
    link.symlink_to(hosts[0]["ssh_known_hosts"])
    print(f"--> molecule instances: {', '.join(h['name'] for h in hosts)}")
    return 0


def converge(extra: Sequence[str] = ()) -> int:
    """The deploy, as users run it; pyinfra's log on stderr, then one JSON object on stdout:
    `changed` (pyinfra's `success` total: operations that changed something), its totals, and
    the names of the operations that changed. Exits with pyinfra's code."""
    command = [str(BIN / "pyinfra"), "--json", "inventory/lab.py", "deploy.py", "-y", *extra]
    print(f"--> {shlex.join(command)}", file=sys.stderr, flush=True)
    proc = subprocess.run(
        command,
        cwd=_project(),
        stdout=subprocess.PIPE,
        text=True,
        timeout=CONVERGE_TIMEOUT,
        check=False,
    )
    results: dict[str, Any] = {}
    if proc.stdout.strip():
        results = json.loads(proc.stdout).get("results") or {}
    totals: dict[str, int] = results.get("totals", {})
    changed_ops = [op["name"] for op in results.get("operations", []) if op.get("success")]
    summary = {
        "changed": totals.get("success", 0) > 0,
        "returncode": proc.returncode,
        "totals": totals,
        "changed_operations": changed_ops,
    }
    print(json.dumps(summary, indent=1))
    return proc.returncode


def verify(tests: Sequence[str] = ()) -> int:
    """The scenario's testinfra checks (`$MOLECULE_SCENARIO_DIRECTORY/tests`) with pytest."""
    paths = list(tests) or [str(_env_path("MOLECULE_SCENARIO_DIRECTORY") / "tests")]
    command = [str(BIN / "python"), "-m", "pytest", "-p", "no:cacheprovider", "-v", *paths]
    return subprocess.run(command, cwd=_project(), check=False).returncode


def destroy() -> int:
    """`dockyard-lab down`, then no instances left in molecule's files."""
    lab("down")
    config = os.environ.get("MOLECULE_INSTANCE_CONFIG")
    if config:
        _write(Path(config), "[]\n")
    ephemeral = os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY")
    if ephemeral:
        (Path(ephemeral) / "inventory" / INVENTORY_NAME).unlink(missing_ok=True)
        (Path(ephemeral) / KNOWN_HOSTS_LINK).unlink(missing_ok=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("create", "converge", "verify", "destroy"):
        print(
            "usage: python -m dockyard_lab.molecule create|converge [PYINFRA ARGS]|"
            "verify [TESTS]|destroy",
            file=sys.stderr,
        )
        return 2
    step, rest = args[0], args[1:]
    if step == "create":
        return create()
    if step == "converge":
        return converge(rest)
    if step == "verify":
        return verify(rest)
    return destroy()


if __name__ == "__main__":
    sys.exit(main())
