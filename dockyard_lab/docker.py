"""Thin wrapper over the docker CLI for the lab: one place that runs it and turns failures into
`DockerError` with docker's own message."""

from __future__ import annotations

import subprocess


class DockerError(RuntimeError):
    """The docker CLI failed, or the engine is not reachable."""


def docker(*args: str, input_text: str | None = None) -> str:
    """Run `docker ARGS`, return its stdout; raise DockerError naming the command on failure."""
    try:
        proc = subprocess.run(
            ["docker", *args], input=input_text, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise DockerError("the docker CLI is not installed (run `make engine`)") from exc
    if proc.returncode != 0:
        raise DockerError(f"docker {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def docker_ok(*args: str) -> bool:
    """True when `docker ARGS` exits 0 (used for existence checks)."""
    try:
        return subprocess.run(["docker", *args], capture_output=True, check=False).returncode == 0
    except FileNotFoundError:
        return False
