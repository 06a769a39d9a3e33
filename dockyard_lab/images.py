"""Lab base images: Debian root filesystems made with debootstrap, customised to boot systemd with
sshd in a container, imported into the local Docker engine and cached by a hash of their recipe."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from dockyard_lab import defaults
from dockyard_lab.docker import DockerError, docker, docker_ok

# Runs once at every boot, before sshd: host keys unique to each lab host (the image carries none),
# and loop device nodes so a host can mount a loop-file backing store (docker_storage_device).
_INIT_SCRIPT = """#!/bin/sh
set -e
ssh-keygen -A
for i in $(seq 0 63); do
  [ -e /dev/loop$i ] || mknod -m 0660 /dev/loop$i b 7 $i
done
"""

_INIT_UNIT = """[Unit]
Description=dockyard lab host first steps (ssh host keys, loop devices)
DefaultDependencies=no
Wants=local-fs-pre.target
Before=local-fs-pre.target ssh.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/dockyard-lab-init
RemainAfterExit=yes

[Install]
WantedBy=sysinit.target
"""

# Units that make no sense in a container and would only slow the boot or fail it.
_MASKED_UNITS = (
    "getty@tty1.service",
    "console-getty.service",
    "serial-getty@.service",
    "systemd-udevd.service",
    "systemd-udev-trigger.service",
    "systemd-remount-fs.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
)


def debian_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt sources use (deb822 or one-line format)."""
    candidates = sorted(sources.glob("sources.list.d/*.sources")) + [sources / "sources.list"]
    for path in candidates:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for match in re.finditer(r"(?m)^URIs:\s*(\S+)", text):
            if match.group(1).rstrip("/").endswith("/debian"):
                return match.group(1).rstrip("/")
        for match in re.finditer(r"(?m)^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", text):
            if match.group(1).rstrip("/").endswith("/debian"):
                return match.group(1).rstrip("/")
    return defaults.DEBIAN_MIRROR


def recipe(suite: str, mirror: str) -> dict[str, object]:
    """Everything that determines an image's content; its hash names the cached image."""
    return {
        "suite": suite,
        "variant": "minbase",
        "include": list(defaults.LAB_INCLUDE),
        "mirror": mirror,
        "init": _INIT_SCRIPT,
        "unit": _INIT_UNIT,
        "masked": list(_MASKED_UNITS),
        "version": defaults.LAB_RECIPE_VERSION,
    }


def image_ref(suite: str, mirror: str) -> str:
    digest = hashlib.sha256(json.dumps(recipe(suite, mirror), sort_keys=True).encode()).hexdigest()
    return f"{defaults.LAB_IMAGE_REPO}:{suite}-{digest[:12]}"


def install_boot_unit(root: Path, name: str, script: str, unit: str, masked: Iterable[str]) -> None:
    """In an image tree: `script` as /usr/local/sbin/<name>, its `unit` as <name>.service wanted
    by sysinit.target, and each of `masked` masked (linked to /dev/null)."""
    path = root / "usr/local/sbin" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True, exist_ok=True)
    (unit_dir / f"{name}.service").write_text(unit)
    wants = unit_dir / "sysinit.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / f"{name}.service"
    if not link.is_symlink():
        link.symlink_to(f"/etc/systemd/system/{name}.service")
    for masked_unit in masked:
        target = unit_dir / masked_unit
        if target.exists() or target.is_symlink():
            target.unlink()
        target.symlink_to("/dev/null")


def _customise(root: Path) -> None:
    for key in root.glob("etc/ssh/ssh_host_*"):
        key.unlink()
    install_boot_unit(root, "dockyard-lab-init", _INIT_SCRIPT, _INIT_UNIT, _MASKED_UNITS)
    # Root logs in with the lab key only (PermitRootLogin prohibit-password is Debian's default).
    (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    # An empty machine-id makes systemd generate a distinct one on each host's first boot.
    (root / "etc/machine-id").write_text("")


def ensure_image(suite: str, *, log=print) -> str:  # type: ignore[no-untyped-def]
    """Return the image for `suite`, building it with debootstrap when it is not cached."""
    if suite not in defaults.LAB_RELEASES:
        raise ValueError(
            f"unknown lab release {suite!r}; valid: {', '.join(defaults.LAB_RELEASES)}"
        )
    mirror = debian_mirror()
    ref = image_ref(suite, mirror)
    if docker_ok("image", "inspect", ref):
        log(f"    image {ref}: cached")
        return ref
    if shutil.which("debootstrap") is None:
        raise DockerError("debootstrap is not installed (apt-get install -y debootstrap)")
    log(f"    image {ref}: building with debootstrap from {mirror} (about a minute)")
    with tempfile.TemporaryDirectory(prefix=f"dockyard-lab-{suite}-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "root"
        cmd = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(defaults.LAB_INCLUDE)}",
            suite,
            str(root),
            mirror,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
            raise DockerError(f"debootstrap {suite} failed (exit {proc.returncode}):\n{tail}")
        _customise(root)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        imported = subprocess.run(
            ["docker", "import", "--change", 'CMD ["/sbin/init"]', "-", ref],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            check=False,
        )
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise DockerError(f"docker import of {ref} failed: {imported.stderr.strip()}")
    docker("image", "inspect", ref)
    return ref


if __name__ == "__main__":  # pragma: no cover - manual use
    for name in sys.argv[1:] or list(defaults.LAB_RELEASES):
        print(ensure_image(name))


# Tag of the registry image the lab builds from Debian's docker-registry (CNCF distribution).
REGISTRY_IMAGE = "dockyard-lab/registry:2"


def build_registry_archive(dest: Path, log=print) -> str:  # type: ignore[no-untyped-def]
    """A `docker save` archive of a registry:2-compatible image (Debian's docker-registry binary
    and the libraries it needs), for fleets without Docker Hub; returns the image tag."""
    binary = shutil.which("docker-registry")
    if binary is None:
        raise DockerError("docker-registry is not installed (apt-get install -y docker-registry)")
    with tempfile.TemporaryDirectory(prefix="dockyard-registry-image-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        files = [binary]
        ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False)
        files += re.findall(r"(/\S+\.so[.\d]*)", ldd.stdout)
        for source in files:
            target = root / ("bin/registry" if source == binary else source.lstrip("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        for directory in ("var/lib/registry", "etc/docker/registry", "tmp"):
            (root / directory).mkdir(parents=True, exist_ok=True)
        os.chmod(root / "tmp", 0o1777)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            [
                "docker",
                "import",
                "--change",
                'ENTRYPOINT ["/bin/registry"]',
                "--change",
                'CMD ["serve", "/etc/docker/registry/config.yml"]',
                "--change",
                "EXPOSE 5000",
                "--change",
                'VOLUME ["/var/lib/registry"]',
                "-",
                REGISTRY_IMAGE,
            ],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            check=False,
        )
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise DockerError(f"docker import of {REGISTRY_IMAGE} failed: {imported.stderr}")
    docker("save", "-o", str(dest), REGISTRY_IMAGE)
    log(f"    {REGISTRY_IMAGE} saved to {dest}")
    return REGISTRY_IMAGE
