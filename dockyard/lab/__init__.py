"""The local lab: a fleet of real systemd hosts as containers on the local Docker engine, reached
over ssh exactly like production hosts (see `dockyard lab --help`)."""

from __future__ import annotations

from dockyard.lab.fleet import LabHost, down, status, up

__all__ = ["LabHost", "down", "status", "up"]
