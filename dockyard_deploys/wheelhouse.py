"""The wheelhouse hosts install the core from, built on the control machine: a wheel of the
`dockyard` core package alone, made from the installed package wherever it lives, plus binary
wheels of its dependencies for one Python version and architecture, cached by a hash of its
inputs. Only the `sync_wheelhouse` operation calls `build_wheelhouse`, while operations execute."""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from pathlib import Path

from pyinfra.api import DeployError

import dockyard

# What the core needs at run time (pyproject's dependencies), as pip requirement strings.
REQUIREMENTS: tuple[str, ...] = (
    "pyyaml>=6,<7",
    "cryptography>=42,<47",
    "aiohttp>=3.9,<4",
    "bcrypt>=4,<6",
    "prometheus_client>=0.17,<1",
)
# The installer in every wheelhouse: hosts run pip from its wheel (`python pip-X.whl/pip`, as
# pip documents for bootstrapping) into a venv made `--without-pip`. ensurepip would install and
# byte-compile pip into each venv first: 88 s of 89 s creating the venv on an emulated lab VM.
INSTALLER = "pip>=23.1"
# manylinux tags accepted when downloading binary wheels for hosts (glibc 2.17 and newer).
PLATFORMS: tuple[str, ...] = (
    "manylinux2014",
    "manylinux_2_17",
    "manylinux_2_28",
    "manylinux_2_31",
    "manylinux_2_34",
)
# The core's console script on hosts (the control machine's `dockyard` in pyproject's
# [project.scripts] is dockyard_deploys.cli:main, which adds `rollout` and hands the rest here).
CORE_ENTRY_POINTS = "[console_scripts]\ndockyard = dockyard.cli:main\n"
# Bumped whenever build_core_wheel writes something else, so cached wheelhouses are rebuilt.
CORE_WHEEL_FORMAT = 1
# A fixed timestamp for every wheel member: the same core makes the same wheel, byte for byte.
_WHEEL_DATE = (1980, 1, 1, 0, 0, 0)
_BUILD_LOCK = threading.Lock()


def core_package_dir() -> Path:
    """The directory of the `dockyard` core package this control machine imports: a source
    checkout, an editable install or site-packages of a user's own pyinfra project alike."""
    return Path(dockyard.__file__).resolve().parent


def _core_files(core: Path) -> list[Path]:
    """Every file of the core package (sources and package data), no bytecode."""
    return sorted(
        path
        for path in core.rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and path.suffix not in (".pyc", ".pyo")
    )


@functools.cache
def _source_hash() -> str:
    """A hash of what goes into a wheelhouse: the core's files, version and requirements."""
    core = core_package_dir()
    hasher = hashlib.sha256()
    hasher.update(f"{dockyard.__version__}\n{CORE_WHEEL_FORMAT}\n".encode())
    for path in _core_files(core):
        hasher.update(str(path.relative_to(core)).encode())
        hasher.update(path.read_bytes())
    hasher.update("\n".join((*REQUIREMENTS, INSTALLER)).encode())
    return hasher.hexdigest()[:16]


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def build_core_wheel(dest: Path) -> Path:
    """Write the wheel hosts install: the `dockyard` package alone (never the deploys or the lab)
    with the core's metadata and `dockyard` console script, made from the installed package
    directory without a build backend, reproducibly. Returns the wheel's path in `dest`."""
    version = dockyard.__version__
    core = core_package_dir()
    dist_info = f"dockyard-{version}.dist-info"
    metadata = "".join(
        [
            "Metadata-Version: 2.1\n",
            "Name: dockyard\n",
            f"Version: {version}\n",
            "Summary: the dockyard core: layer store and registry (installed on fleet hosts)\n",
            "Requires-Python: >=3.9\n",
            *(f"Requires-Dist: {req}\n" for req in REQUIREMENTS),
        ]
    )
    members: list[tuple[str, bytes]] = [
        (f"dockyard/{path.relative_to(core).as_posix()}", path.read_bytes())
        for path in _core_files(core)
    ]
    members += [
        (f"{dist_info}/METADATA", metadata.encode()),
        (
            f"{dist_info}/WHEEL",
            b"Wheel-Version: 1.0\nGenerator: dockyard_deploys.dockyard_core\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n",
        ),
        (f"{dist_info}/entry_points.txt", CORE_ENTRY_POINTS.encode()),
        (f"{dist_info}/top_level.txt", b"dockyard\n"),
    ]
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in members)
    members.append((f"{dist_info}/RECORD", f"{record}{dist_info}/RECORD,,\n".encode()))
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / f"dockyard-{version}-py3-none-any.whl"
    partial = wheel.with_name(wheel.name + ".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=_WHEEL_DATE)
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    os.replace(partial, wheel)
    return wheel


def wheelhouse_path(version: str, machine: str, cache: str) -> Path:
    """Where the wheelhouse for Python `version` on `machine` is cached (nothing is created)."""
    return Path(cache).expanduser() / f"py{version}-{machine}-{_source_hash()}"


def wheelhouse_ready(version: str, machine: str, cache: str) -> bool:
    return (wheelhouse_path(version, machine, cache) / ".complete").exists()


# Digests of complete wheelhouses by path: a complete one never changes (its name holds the
# source hash), so the files are hashed once per run, not once per host.
_DIGESTS: dict[str, dict[str, str]] = {}


def wheelhouse_digests(version: str, machine: str, cache: str) -> dict[str, str]:
    """sha256 by file name of a built wheelhouse (what a host's copy must hold); empty when it
    is not built."""
    target = wheelhouse_path(version, machine, cache)
    if not (target / ".complete").exists():
        return {}
    if str(target) not in _DIGESTS:
        _DIGESTS[str(target)] = {
            path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(target.iterdir())
            if path.is_file() and not path.name.startswith(".")
        }
    return dict(_DIGESTS[str(target)])


def wheelhouse_archive_path(version: str, machine: str, cache: str) -> Path:
    """Where the wheelhouse's one-file archive is cached (nothing is created)."""
    target = wheelhouse_path(version, machine, cache)
    return target.with_name(target.name + ".tar")


def wheelhouse_archive(version: str, machine: str, cache: str) -> Path:
    """The built wheelhouse as one uncompressed tar (wheels are compressed already), made once:
    hosts get one upload instead of one per wheel. Members are the wheels by name, sorted,
    owned by root, mode 0644, dated 0: the same wheelhouse makes the same archive."""
    target = wheelhouse_path(version, machine, cache)
    if not (target / ".complete").exists():
        raise DeployError(f"the dockyard wheelhouse {target} is not built")
    archive = wheelhouse_archive_path(version, machine, cache)
    with _BUILD_LOCK:
        if archive.exists():
            return archive
        # a name of its own: another run on this control machine may be writing one too
        fd, partial = tempfile.mkstemp(prefix=f".{archive.name}.", dir=archive.parent)
        os.close(fd)
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(wheelhouse_digests(version, machine, cache)):
                data = (target / name).read_bytes()
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                tar.addfile(info, io.BytesIO(data))
        os.replace(partial, archive)
        return archive


def build_wheelhouse(version: str, machine: str, cache: str) -> Path:
    """Wheels for Python `version` on `machine`, built once per source hash."""
    target = wheelhouse_path(version, machine, cache)
    with _BUILD_LOCK:
        if (target / ".complete").exists():
            return target
        work = target.with_name(target.name + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        platforms = [arg for tag in PLATFORMS for arg in ("--platform", f"{tag}_{machine}")]
        download = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--python-version",
            version,
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(work),
        ]
        _pip([*download, *REQUIREMENTS, INSTALLER], version, machine)
        build_core_wheel(work)
        # pip evaluates dependency markers (python_version < "3.11") for the running Python,
        # not the target: add what the target's markers ask for until nothing is missing.
        for _ in range(5):
            missing = _missing_marker_requirements(work, version, machine)
            if not missing:
                break
            _pip([*download, *missing], version, machine)
        (work / ".complete").write_text("ok\n")
        # an archive of an earlier build of this source hash would hold other wheels (a newer
        # dependency release since): hosts would never match the digests
        wheelhouse_archive_path(version, machine, cache).unlink(missing_ok=True)
        _DIGESTS.pop(str(target), None)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(work, target)
        return target


def _pip(cmd: list[str], version: str, machine: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DeployError(
            f"building the dockyard wheelhouse for Python {version} ({machine}) failed: "
            f"{proc.stderr.strip()[-800:]}"
        )


def _missing_marker_requirements(work: Path, version: str, machine: str) -> list[str]:
    """Requirements of the wheels in `work` whose markers hold on the target but that no wheel
    in `work` provides."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    env.update(
        python_version=version,
        python_full_version=f"{version}.0",
        platform_machine=machine,
        sys_platform="linux",
        platform_system="Linux",
        implementation_name="cpython",
        platform_python_implementation="CPython",
    )
    present = set()
    requires: list[Requirement] = []
    for wheel in work.glob("*.whl"):
        present.add(canonicalize_name(wheel.name.split("-")[0]))
        with zipfile.ZipFile(wheel) as archive:
            meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            for line in archive.read(meta).decode("utf-8", "replace").splitlines():
                if line.startswith("Requires-Dist:"):
                    requires.append(Requirement(line.split(":", 1)[1].strip()))
    missing = []
    for req in requires:
        if req.marker is None or "extra" in str(req.marker):
            continue
        if req.marker.evaluate(env) and canonicalize_name(req.name) not in present:
            missing.append(str(req).split(";")[0].strip())
    return sorted(set(missing))
