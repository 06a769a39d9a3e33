"""Fakes to run dockyard's operations and deploys without a connection.

`FakeHost` runs one operation's generator: facts are canned outputs processed by the real fact
classes (or already processed values), noops and log lines are recorded. `prepare_fleet` runs
`@deploy` functions through pyinfra's own State and Inventory, on hosts that hold only the data
a user would set, with facts answered from a table: the operations and their commands are those
pyinfra would run. No lab data and no network."""

from __future__ import annotations

import importlib
import logging
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from io import StringIO
from types import SimpleNamespace
from typing import Any, Callable

import pyinfra
import pyinfra.facts.files
import pyinfra.facts.server
import pyinfra.facts.systemd
from pyinfra.api import Config, FactBase, FileUploadCommand, Inventory, State
from pyinfra.api.host import Host
from pyinfra.api.state import StateStage
from pyinfra.context import ctx_config, ctx_host, ctx_inventory, ctx_state

import dockyard_deploys.facts


def fact_classes() -> dict[str, type]:
    """Every fact class a spec may name: dockyard's and the pyinfra ones the deploys use."""
    out: dict[str, type] = {}
    for module in (
        pyinfra.facts.files,
        pyinfra.facts.server,
        pyinfra.facts.systemd,
        dockyard_deploys.facts,
    ):
        for name, value in vars(module).items():
            if isinstance(value, type) and issubclass(value, FactBase) and value is not FactBase:
                out[name] = value
    return out


def answer_fact(cls: type, raw: Any, kwargs: dict[str, Any]) -> Any:
    """A fact's value from a canned answer: a dict is already processed (facts whose parsing needs
    other facts, like Mounts), a callable gets the fact's arguments, lines are processed by the
    real class, None is the fact's default."""
    if callable(raw) and not isinstance(raw, type):
        raw = raw(kwargs)
    if isinstance(raw, dict):
        return raw.get("__value__", raw) if "__value__" in raw else raw
    if raw is None:
        return cls().default()  # type: ignore[attr-defined]
    if isinstance(raw, str):
        raw = raw.splitlines()
    return cls().process(raw)  # type: ignore[attr-defined]


class _Data(dict):
    def __getattr__(self, key: str) -> Any:
        return self.get(key)


class FakeHost:
    """Answers get_fact from {FactClass or its name: answer (see `answer_fact`)}; a fact not given
    answers its default."""

    def __init__(
        self,
        facts: dict[Any, Any],
        data: dict[str, Any] | None = None,
        name: str = "fakehost",
        groups: list[str] | None = None,
    ) -> None:
        self.facts = {k if isinstance(k, str) else k.__name__: v for k, v in facts.items()}
        self.data = _Data(data or {})
        self.noops: list[str] = []
        self.logs: list[str] = []
        self.name = name
        self.print_prefix = f"[{name}] "
        self.groups: list[str] = list(groups or [])
        self.current_op_global_arguments: dict[str, Any] = {}

    def get_fact(self, cls: type, *args: Any, **kwargs: Any) -> Any:
        if cls.__name__ not in self.facts:
            return cls().default()  # type: ignore[attr-defined]
        return answer_fact(cls, self.facts[cls.__name__], kwargs)

    def noop(self, description: str) -> None:
        self.noops.append(description)

    def log(self, message: str, log_func: Any = None) -> None:
        self.logs.append(message)

    def get_temp_filename(self, *args: Any, **kwargs: Any) -> str:
        return "/tmp/pyinfra-temp"


class FakeInventory:
    def __init__(self, groups: dict[str, list[FakeHost]]) -> None:
        self.groups = groups

    def get_group(self, name: str, default: Any = None) -> Any:
        return self.groups.get(name, default)

    def __iter__(self) -> Iterator[FakeHost]:
        seen: list[FakeHost] = []
        for hosts in self.groups.values():
            seen += [h for h in hosts if h not in seen]
        return iter(seen)


@contextmanager
def as_current(
    fake: FakeHost,
    inventory: FakeInventory | None = None,
    executing: bool = False,
    diff: bool = False,
) -> Iterator[FakeHost]:
    """Make `fake` pyinfra's current host (and a state that is or is not executing)."""
    fake_state = SimpleNamespace(
        is_executing=executing, config=SimpleNamespace(DIFF=diff), cwd=None
    )
    with ExitStack() as stack:
        stack.enter_context(ctx_host.use(fake))
        stack.enter_context(ctx_state.use(fake_state))
        stack.enter_context(ctx_inventory.use(inventory or FakeInventory({})))
        yield fake


def failure(command: str) -> str:
    """What a failing command (`fail_command`) prints on stderr, run by sh as on a host."""
    proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=False)
    assert proc.returncode == 1, (command, proc.returncode)
    return proc.stderr.strip()


def render_command(command: Any) -> str:
    """A command as specs write it: shell text, or `upload <dest>` (+ content when in memory)."""
    if isinstance(command, FileUploadCommand):
        if isinstance(command.src, StringIO):
            return f"upload {command.dest}\n{command.src.getvalue()}"
        return f"upload {command.src} -> {command.dest}"
    return str(command)


# --- whole deploys ------------------------------------------------------------------------------


@dataclass
class FleetHost:
    name: str
    groups: list[str]
    data: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedOp:
    names: list[str]
    host: Host
    generator: Callable[[], Iterator[Any]]
    state: State
    op_hash: str = ""

    @property
    def name(self) -> str:
        return ", ".join(sorted(self.names))

    @property
    def execution_arguments(self) -> dict[str, Any]:
        """How pyinfra executes the operation on every host (`_serial`, `_parallel`,
        `_run_once`), from the state's shared operation meta."""
        return dict(self.state.op_meta[self.op_hash].global_arguments)

    def commands(self) -> list[str]:
        with ctx_state.use(self.state), ctx_host.use(self.host):
            with ctx_inventory.use(self.state.inventory):
                return [render_command(c) for c in self.generator()]


@dataclass
class PreparedFleet:
    state: State
    hosts: dict[str, Host]
    # (host name, operation hash) -> the operation's name on that host (pyinfra's own meta
    # unites the names of every host's operation from one call)
    op_names: dict[tuple[str, str], list[str]]

    def ops(self, host_name: str) -> list[PreparedOp]:
        host = self.hosts[host_name]
        out = []
        for op_hash in self.state.get_op_order():
            data = self.state.ops[host].get(op_hash)
            if data is not None:
                names = self.op_names[(host_name, op_hash)]
                out.append(PreparedOp(names, host, data.command_generator, self.state, op_hash))
        return out

    def op(self, host_name: str, starts: str) -> PreparedOp:
        found = [o for o in self.ops(host_name) if o.name.startswith(starts)]
        assert found, f"no operation {starts!r} on {host_name}: {self.names(host_name)}"
        return found[0]

    def names(self, host_name: str) -> list[str]:
        return [o.name for o in self.ops(host_name)]


def prepare_fleet(
    hosts: list[FleetHost],
    deploy: Callable[[Any], None],
    monkeypatch: Any,
    diff: bool = False,
) -> PreparedFleet:
    """Run `deploy(host)` for every host as pyinfra prepares a run (facts from the table,
    changes detected), returning what it would do."""
    by_name = {h.name: h for h in hosts}
    group_names = sorted({g for h in hosts for g in h.groups})
    inventory = Inventory(
        ([h.name for h in hosts], {}),
        **{
            g: ([(h.name, h.data) for h in hosts if g in h.groups], {})  # type: ignore[misc]
            for g in group_names
        },
    )
    config = Config()
    config.DIFF = diff
    state = State(inventory=inventory, config=config, check_for_changes=True)
    state.set_stage(StateStage.Prepare)

    def get_fact(self: Host, cls: Any, *args: Any, **kwargs: Any) -> Any:
        facts = by_name[self.name].facts
        name = cls.__name__
        if name not in facts:
            return cls().default()
        return answer_fact(cls, facts[name], kwargs)

    monkeypatch.setattr(Host, "get_fact", get_fact)
    op_names: dict[tuple[str, str], list[str]] = {}
    # (the module, not `pyinfra.api.operation`, the decorator of the same name)
    operation_module = importlib.import_module("pyinfra.api.operation")
    solve = operation_module.solve_operation_consistency

    def recording_solve(names: Any, state: State, host: Host) -> Any:
        op_order, op_hash = solve(names, state, host)
        op_names[(host.name, op_hash)] = sorted(names)
        return op_order, op_hash

    monkeypatch.setattr(operation_module, "solve_operation_consistency", recording_solve)
    # As `pyinfra inventory deploy.py` does: an operation is keyed by the lines that called it
    # (not by its position on each host), so the execution arguments it shares across hosts
    # (`_serial`) belong to that one call.
    monkeypatch.setattr(pyinfra, "is_cli", True)
    logging.getLogger("pyinfra").setLevel(logging.INFO)
    with ctx_state.use(state), ctx_inventory.use(inventory), ctx_config.use(config):
        for host in inventory:
            with ctx_host.use(host):
                deploy(host)
    return PreparedFleet(state, {h.name: h for h in inventory}, op_names)
