"""A fake pyinfra host for running custom operations' generators without a connection: facts are
canned outputs processed by the real fact classes; noop messages are recorded."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyinfra.context import ctx_host


class FakeHost:
    """Answers get_fact from {FactClass: raw output lines, a callable(kwargs) -> lines, or an
    already processed value (a dict: facts whose parsing needs other facts, like Mounts)}."""

    def __init__(self, facts: dict[type, Any], data: dict[str, Any] | None = None) -> None:
        self.facts = facts
        self.data = data or {}
        self.noops: list[str] = []
        self.name = "fakehost"
        self.print_prefix = "[fakehost] "
        self.groups: list[str] = []

    def get_fact(self, cls: type, *args: Any, **kwargs: Any) -> Any:
        raw = self.facts[cls]
        if isinstance(raw, dict):
            return raw
        lines = raw(kwargs) if callable(raw) else raw
        if lines is None:
            return cls().default()  # type: ignore[attr-defined]
        return cls().process(lines)  # type: ignore[attr-defined]

    def noop(self, description: str) -> None:
        self.noops.append(description)


@contextmanager
def as_current(fake: FakeHost) -> Iterator[FakeHost]:
    with ctx_host.use(fake):
        yield fake
