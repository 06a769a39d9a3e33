"""The local lab: a fleet of real systemd hosts as containers on the local Docker engine, reached
over ssh exactly like production hosts (see `dockyard-lab --help`). Test tooling for the control
machine: it uses the core's public API and is never part of what hosts install."""

from __future__ import annotations

from dockyard_lab.fleet import LabHost, down, status, up

__all__ = ["LabHost", "down", "status", "up"]
