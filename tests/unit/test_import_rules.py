"""The import rules of docs/ARCHITECTURE.md, checked on the source with `ast`: the core
(`dockyard/`, what every host installs) never imports the deploys, the lab or pyinfra; the deploys
and the lab use only the core's public API (the modules below, no `_private` names) and the
deploys never need the lab. Each rule also runs on planted violations, so it is known to fail."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The core's public API for code outside the core: these modules, their names without a
# leading underscore. A deploy that needs something else asks for it to be made public here.
CORE_PUBLIC_API: frozenset[str] = frozenset(
    {
        "dockyard",  # __version__, and the package directory the host wheel is built from
        "dockyard.cli",  # main: the control machine's `dockyard` hands every command but rollout
        "dockyard.pki",  # the fleet CA and certificates (the CA stays on the control machine)
        "dockyard.registry.auth",  # BCRYPT_PASSWORD_MAX: htpasswd users the registry accepts
        # parse_endpoints, ENDPOINT_KEYS, ConfigError: registry_notifications checked by the
        # registry's own rules; NOTIFICATIONS_QUEUE_DIRECTORY, the queues' default home
        "dockyard.registry.config",
    }
)
# Top-level packages the core must never import: it runs on hosts, which have none of them.
FORBIDDEN_IN_CORE: frozenset[str] = frozenset({"dockyard_deploys", "dockyard_lab", "pyinfra"})


def _modules(package_dir: Path) -> Iterator[tuple[Path, str, ast.Module]]:
    """(path, dotted module name, tree) for every module of a package directory."""
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield path, ".".join(parts), ast.parse(path.read_text(encoding="utf-8"), str(path))


def _imports(module: str, path: Path, tree: ast.Module) -> Iterator[tuple[int, str, str | None]]:
    """(line, absolute module, imported name or None) for every import in a module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                yield node.lineno, base, alias.name


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def core_violations(core_dir: Path) -> list[str]:
    """Imports of the deploys, the lab or pyinfra anywhere in the core."""
    found = []
    for path, module, tree in _modules(core_dir):
        for line, target, _ in _imports(module, path, tree):
            if target.split(".")[0] in FORBIDDEN_IN_CORE:
                found.append(f"{path.name}:{line}: the core imports {target}")
    return found


def public_api_violations(package_dir: Path, core_dir: Path) -> list[str]:
    """Uses of the core outside its public API: modules not in CORE_PUBLIC_API, `_private` names
    imported or reached as attributes of a core module."""
    core_modules = {module for _, module, _ in _modules(core_dir)}
    found = []
    for path, module, tree in _modules(package_dir):
        bound: dict[str, str] = {}  # local name -> core module it refers to
        for line, target, name in _imports(module, path, tree):
            if target.split(".")[0] != "dockyard":
                continue
            where = f"{path.name}:{line}"
            full = f"{target}.{name}" if name else target
            if name and full in core_modules:  # `from dockyard import pki` imports a module
                target, name = full, None
            if any(_private(part) for part in target.split(".")):
                found.append(f"{where}: private core module {target}")
            elif target not in CORE_PUBLIC_API:
                found.append(f"{where}: {target} is not in the core's public API")
            elif name and _private(name):
                found.append(f"{where}: private name {target}.{name}")
            if name is None:
                bound[full.rsplit(".", 1)[-1] if "." in full else full] = target
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and _private(node.attr)
            ):
                found.append(
                    f"{path.name}:{node.lineno}: private name {bound[node.value.id]}.{node.attr}"
                )
    return found


def lab_violations(package_dir: Path) -> list[str]:
    """Imports of the lab (test tooling) from the deploys, which users run without it."""
    found = []
    for path, module, tree in _modules(package_dir):
        for line, target, _ in _imports(module, path, tree):
            if target.split(".")[0] == "dockyard_lab":
                found.append(f"{path.name}:{line}: the deploys import {target}")
    return found


def test_the_core_never_imports_the_deploys_the_lab_or_pyinfra() -> None:
    assert core_violations(ROOT / "dockyard") == []


@pytest.mark.parametrize("package", ["dockyard_deploys", "dockyard_lab"])
def test_the_deploys_and_the_lab_use_only_the_cores_public_api(package: str) -> None:
    assert public_api_violations(ROOT / package, ROOT / "dockyard") == []


def test_the_deploys_never_need_the_lab() -> None:
    assert lab_violations(ROOT / "dockyard_deploys") == []


def test_the_public_api_modules_exist() -> None:
    core = {module for _, module, _ in _modules(ROOT / "dockyard")}
    assert CORE_PUBLIC_API <= core


def _plant(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_planted_violations_are_found(tmp_path: Path) -> None:
    """Every rule fails on a tree that breaks it (and names the line)."""
    _plant(
        tmp_path,
        {
            "dockyard/__init__.py": "__version__ = '0'\n",
            "dockyard/pki.py": "def _key(): ...\ndef issue(): ...\n",
            "dockyard/registry/__init__.py": "",
            "dockyard/registry/store.py": "from ..pki import issue\nfrom . import auth\n",
            "dockyard/registry/auth.py": "X = 1\n",
            "dockyard/registry/app.py": "import pyinfra.api\nfrom dockyard_deploys import common\n",
            "dockyard_deploys/__init__.py": "",
            "dockyard_deploys/a.py": (
                "from dockyard import pki\n"
                "from dockyard.registry import store\n"  # not public
                "from dockyard.pki import _key\n"  # private name
                "import dockyard.registry.auth as auth\n"  # fine
                "from dockyard_lab import fleet\n"  # the deploys need no lab
                "pki._key()\n"  # private attribute
            ),
        },
    )
    core = core_violations(tmp_path / "dockyard")
    assert [v.split(":")[0] for v in core] == ["app.py", "app.py"]
    public = public_api_violations(tmp_path / "dockyard_deploys", tmp_path / "dockyard")
    assert public == [
        "a.py:2: dockyard.registry.store is not in the core's public API",
        "a.py:3: private name dockyard.pki._key",
        "a.py:6: private name dockyard.pki._key",
    ]
    assert lab_violations(tmp_path / "dockyard_deploys") == [
        "a.py:5: the deploys import dockyard_lab"
    ]
