"""One generic runner for every custom operation's JSON specs, as pyinfra's own tests run theirs:
`specs/operations/<operation>.json` holds cases of arguments, host data, groups, inventory and
fake facts (recorded output, or processed values), and the commands the operation yields, its
noop, the message a failing command prints, and what it logs. `$PKI` in a spec is a fresh
control-machine PKI directory (`pki_setup` issues into it first); an operation that is not
executing must leave it as it was."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dockyard import pki as dockyard_pki
from dockyard_deploys import operations
from tests.operations.fakes import FakeHost, FakeInventory, as_current, failure, render_command

SPECS = Path(__file__).parent / "specs" / "operations"
CASES = [
    (path.stem, case)
    for path in sorted(SPECS.glob("*.json"))
    for case in json.loads(path.read_text())
]


def test_every_custom_operation_has_specs() -> None:
    ops = {
        name
        for name, value in vars(operations).items()
        if callable(getattr(value, "_inner", None)) and value.__module__ == operations.__name__
    }
    assert ops == {path.stem for path in SPECS.glob("*.json")}


def _fill(value: Any, pki: str) -> Any:
    text = json.dumps(value).replace("$PKI", pki)
    return json.loads(text)


def _matches(expected: str, actual: str) -> bool:
    if expected.endswith("..."):
        return actual.startswith(expected[:-3])
    return expected == actual


@pytest.mark.parametrize(("op_name", "case"), CASES, ids=[f"{n}: {c['id']}" for n, c in CASES])
def test_operation_spec(
    op_name: str, case: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = str(tmp_path / "pki")
    case = _fill(case, pki)
    fake = FakeHost(case.get("facts", {}), case.get("data", {}), groups=case.get("groups", []))
    inventory = FakeInventory(
        {
            group: [FakeHost({}, h.get("data", {}), name=h["name"]) for h in hosts]
            for group, hosts in case.get("inventory", {}).items()
        }
    )
    for item in case.get("pki_setup", []):
        if item["kind"] == "ca":
            dockyard_pki.ensure_ca(pki)
        else:
            dockyard_pki.ensure_server_cert(pki, item["leaf"], item["dns"], [])
    before = {p.name: p.read_bytes() for p in Path(pki).glob("*")} if Path(pki).exists() else {}
    op = getattr(operations, op_name)
    with caplog.at_level("INFO"):
        with as_current(fake, inventory, case.get("executing", False), case.get("diff", False)):
            commands = [render_command(c) for c in op._inner(**case.get("args", {}))]
    if "fails" in case:
        assert len(commands) == 1, commands
        assert case["fails"] in failure(commands[0])
    else:
        expected = case.get("commands", [])
        assert len(commands) == len(expected), commands
        for want, got in zip(expected, commands):
            assert _matches(want, got), (want, got)
    if "noop" in case:
        assert any(case["noop"] in n for n in fake.noops), fake.noops
    else:
        assert not fake.noops or commands, fake.noops
    for text in case.get("logs", []):
        assert text in caplog.text + "\n".join(fake.logs), text
    if not case.get("executing"):
        after = {p.name: p.read_bytes() for p in Path(pki).glob("*")} if Path(pki).exists() else {}
        assert after == before, "a prepared operation changed the control machine's PKI"
    if "pki_files" in case:
        present = sorted(p.name for p in Path(pki).glob("*")) if Path(pki).exists() else []
        assert present == case["pki_files"]


@pytest.mark.parametrize("kind", ["server", "client"])
def test_a_leaf_pki_file_must_name_its_part(kind: str, tmp_path: Path) -> None:
    """Left to a default, a leaf's part pushed the certificate where the key belongs."""
    from pyinfra.api import OperationValueError

    with pytest.raises(OperationValueError, match="part 'cert' or 'key'"):
        list(operations.pki_file._inner(pki_dir=str(tmp_path), kind=kind, leaf="x", dest="/d"))
