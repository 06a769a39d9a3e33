"""Packaging: the wheel hosts get holds the `dockyard` core alone (never the deploys or the lab),
made from the installed package; and dockyard used as a library — its wheel installed into a
fresh venv that cannot see this checkout — imports the deploys, ships their templates, and runs
a user's own pyinfra deploy (`--dry`: nothing built, nothing created)."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import tomllib

import dockyard
from dockyard_deploys import dockyard_core

ROOT = Path(__file__).resolve().parents[2]
VERSION = dockyard.__version__
DIST_INFO = f"dockyard-{VERSION}.dist-info"


def _wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_host_wheel_holds_only_the_core(tmp_path: Path) -> None:
    wheel = dockyard_core.build_core_wheel(tmp_path)
    names = _wheel_names(wheel)
    assert wheel.name == f"dockyard-{VERSION}-py3-none-any.whl"
    assert {name.split("/")[0] for name in names} == {"dockyard", DIST_INFO}
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    core = {
        f"dockyard/{p.relative_to(ROOT / 'dockyard').as_posix()}"
        for p in (ROOT / "dockyard").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert core <= set(names)  # every module of the core, e.g. dockyard/cli.py
    assert "dockyard/cli.py" in names


def test_host_wheel_metadata_script_and_record(tmp_path: Path) -> None:
    wheel = dockyard_core.build_core_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        meta = archive.read(f"{DIST_INFO}/METADATA").decode()
        requires = [ln.split(": ", 1)[1] for ln in meta.splitlines() if ln.startswith("Requires-")]
        assert requires[1:] == list(dockyard_core.REQUIREMENTS)  # after Requires-Python
        entry_points = archive.read(f"{DIST_INFO}/entry_points.txt").decode()
        assert "dockyard = dockyard.cli:main" in entry_points
        assert "dockyard_lab" not in entry_points
        rows = archive.read(f"{DIST_INFO}/RECORD").decode().splitlines()
        for row in rows:
            name, digest, size = row.rsplit(",", 2)
            if name == f"{DIST_INFO}/RECORD":
                continue
            data = archive.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert (digest, int(size)) == (f"sha256={expected.decode()}", len(data))
        assert {row.split(",")[0] for row in rows} == set(archive.namelist())


def test_host_wheel_is_reproducible(tmp_path: Path) -> None:
    first = dockyard_core.build_core_wheel(tmp_path / "a").read_bytes()
    assert dockyard_core.build_core_wheel(tmp_path / "b").read_bytes() == first


def test_host_requirements_are_pyprojects_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert list(dockyard_core.REQUIREMENTS) == project["dependencies"]
    # the control machine's `dockyard` adds `rollout`; hosts' wheel keeps the core's entry point
    assert project["scripts"]["dockyard"] == "dockyard_deploys.cli:main"


def test_wheelhouse_path_creates_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = dockyard_core.wheelhouse_path("3.11", "x86_64", str(cache))
    assert path.parent == cache and path.name.startswith("py3.11-x86_64-")
    assert not dockyard_core.wheelhouse_ready("3.11", "x86_64", str(cache))
    assert not cache.exists()


# --- library use: dockyard installed from its wheel in a user's own pyinfra project ---------

USER_DEPLOY = '''\
"""A user's own pyinfra project using dockyard's deploys from the installed package."""
from dockyard_deploys.dockyard_core import install_dockyard_core
from dockyard_deploys.docker_storage import configure_docker_storage  # noqa: F401

install_dockyard_core()
'''

CHECK_INSTALLED = """\
import json, sys
from pathlib import Path
import jinja2
import dockyard, dockyard_deploys
from dockyard_deploys import dockyard_core, nfs_server, registry
from dockyard_deploys.docker_storage import configure_docker_storage
templates = sorted(p.name for p in Path(registry.TEMPLATES).glob("*.j2"))
env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(nfs_server.TEMPLATES)))
for name in templates:
    env.get_template(name)  # every template parses
exports = env.get_template("exports.j2").render(
    exports=[{"path": "/srv/a", "clients": ["10.0.0.0/24"], "options": "rw"}]
)
wheel = dockyard_core.build_core_wheel(Path(sys.argv[1]))
import zipfile
print(json.dumps({
    "dockyard": dockyard.__file__,
    "deploys": dockyard_deploys.__file__,
    "templates": templates,
    "exports": exports,
    "deploy": configure_docker_storage.__name__,
    "host_wheel": sorted({n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}),
}))
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr}"
    return proc.stdout if proc.stdout.strip() else proc.stderr  # pyinfra logs to stderr


@pytest.fixture(scope="session")
def installed_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (no system site-packages) with dockyard[deploy] installed offline from its
    wheel, built from a copy of the project, and the dependencies' wheels fetched by pip once."""
    work = tmp_path_factory.mktemp("packaging")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in ("dockyard", "dockyard_deploys", "dockyard_lab"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    dist, wheels = work / "dist", work / "wheels"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--quiet", "--no-deps", "-w", str(dist), str(src)], work)
    (wheel,) = dist.glob("dockyard-*.whl")
    _run([*pip, "download", "--quiet", "-d", str(wheels), f"{wheel}[deploy]"], work)
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    _run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(dist)]
        + ["--find-links", str(wheels), "dockyard[deploy]"],
        work,
    )
    return env_dir


@pytest.mark.packaging
def test_installed_package_imports_the_deploys_and_ships_the_templates(
    installed_venv: Path, tmp_path: Path
) -> None:
    import json

    project = tmp_path / "user-project"
    project.mkdir()
    (project / "check.py").write_text(CHECK_INSTALLED)
    out = _run([str(installed_venv / "bin/python"), "check.py", str(tmp_path / "host")], project)
    found = json.loads(out)
    site = str(installed_venv / "lib")
    assert found["dockyard"].startswith(site) and found["deploys"].startswith(site)
    assert found["templates"] == sorted(
        p.name for p in (ROOT / "dockyard_deploys/templates").iterdir()
    )
    assert found["exports"].splitlines()[-1] == "/srv/a 10.0.0.0/24(rw)"
    assert found["deploy"] == "configure_docker_storage"
    # the host wheel made from the installed package holds the core alone
    assert found["host_wheel"] == ["dockyard", DIST_INFO]
    assert (installed_venv / "bin/dockyard-lab").exists()


@pytest.mark.packaging
def test_a_users_pyinfra_project_runs_the_installed_deploys_dry(
    installed_venv: Path, tmp_path: Path
) -> None:
    """`pyinfra @local deploy.py --dry` in a project outside the checkout: the deploy is
    defined from the installed package and the (uncached) wheelhouse is not built."""
    project = tmp_path / "user-project"
    project.mkdir()
    (project / "deploy.py").write_text(USER_DEPLOY)
    cache = tmp_path / "wheelhouse-cache"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = _run(
        [str(installed_venv / "bin/pyinfra"), "@local", "deploy.py", "--dry"]
        + ["--data", f"dockyard_core_cache={cache}"],
        project,
        env=env,
    )
    assert "the dockyard wheelhouse for Python" in out and "never with --dry" in out, out
    assert not cache.exists()
