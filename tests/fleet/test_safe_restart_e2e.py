"""Lab end to end for safe engine restarts: with `live-restore` on (dockyard's default), a
container keeps running — same process, same start time — while a daemon.json change that needs
a restart (a `log-opts` value through `docker_daemon_options`) restarts dockerd, and again when
the change is taken out (the keys set to null); a change of `registry-mirrors` alone reloads
dockerd (same pid) and shows in `docker info`. Runs on one overlay2 host and leaves daemon.json
as the first deploy wrote it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.fleet.conftest import DeployRun, run_deploy

pytestmark = pytest.mark.lab

NAME = "dockyard-test-sleeper"
IMAGE = "dockyard-test/sleep:1"
CONFIG = "/etc/docker/daemon.json"
LOG_OPTS = {"max-size": "11m"}
MIRROR = "https://mirror.dockyard-test.invalid/"
# Takes the test's keys out of daemon.json again.
BACK = "docker_daemon_options=" + json.dumps({"log-opts": None, "registry-mirrors": None})


def _tiny_image(host: Any) -> str:
    """An image of the host's own sh and sleep with their libraries (no registry in the lab)."""
    host.check_output(
        "set -e; d=$(mktemp -d); for f in /bin/sh /bin/sleep; do "
        "for x in $f $(ldd $(readlink -f $f) | grep -o '/[^ ]*'); do "
        'mkdir -p "$d$(dirname $x)"; cp -L "$x" "$d$x"; done; done; '
        f"tar -C $d -c . | docker import - {IMAGE} >/dev/null; rm -rf $d"
    )
    return IMAGE


def _ok(run: DeployRun) -> None:
    assert run.returncode == 0, run.failures()
    assert run.results["failed_hosts"] == []


def _dockerd_pid(host: Any) -> str:
    pid = str(host.check_output("systemctl show -p MainPID --value docker.service")).strip()
    assert pid not in ("", "0"), pid
    return pid


def _container(host: Any) -> tuple[str, str, str]:
    """(running, pid, start time) of the test container."""
    out = host.check_output(
        "docker inspect -f '{{.State.Running}} {{.State.Pid}} {{.State.StartedAt}}' " + NAME
    )
    running, pid, started = str(out).split()
    return running, pid, started


def _config(host: Any) -> dict[str, Any]:
    return dict(json.loads(host.file(CONFIG).content_string))


def test_a_running_container_survives_a_daemon_json_change(
    hosts: dict[str, Any], overlay_host: str, first_deploy: DeployRun
) -> None:
    _ok(first_deploy)
    host = hosts[overlay_host]
    limit = ("--limit", overlay_host)
    original = _config(host)
    assert original["live-restore"] is True, original
    assert host.check_output("docker info --format '{{.LiveRestoreEnabled}}'") == "true"
    try:
        host.check_output(f"docker run -d --name {NAME} {_tiny_image(host)} /bin/sleep infinity")
        before = _container(host)
        assert before[0] == "true", before

        # A restart-requiring change: dockerd is restarted, the container is not.
        engine = _dockerd_pid(host)
        options = "docker_daemon_options=" + json.dumps({"log-opts": LOG_OPTS})
        _ok(run_deploy(*limit, "--data", options))
        assert _config(host) == {**original, "log-opts": LOG_OPTS}
        restarted = _dockerd_pid(host)
        assert restarted != engine, "the engine was not restarted"
        assert _container(host) == before, "the container did not survive the engine restart"

        # A registry-mirrors change alone: dockerd reloads (same pid) and shows the mirror.
        options = "docker_daemon_options=" + json.dumps(
            {"log-opts": LOG_OPTS, "registry-mirrors": [MIRROR]}
        )
        _ok(run_deploy(*limit, "--data", options))
        assert _config(host)["registry-mirrors"] == [MIRROR]
        assert _dockerd_pid(host) == restarted, "a mirrors-only change restarted the engine"
        mirrors = host.check_output("docker info --format '{{json .RegistryConfig.Mirrors}}'")
        assert json.loads(mirrors) == [MIRROR]
        assert _container(host) == before

        # Deployed back to the first deploy's file (keys once written are kept unless set to
        # null): restarted again, the container still runs.
        _ok(run_deploy(*limit, "--data", BACK))
        assert _config(host) == original
        assert _dockerd_pid(host) != restarted
        assert _container(host) == before
    finally:
        host.run(f"docker rm -f {NAME}; docker rmi {IMAGE}")
        if _config(host) != original:
            run_deploy(*limit, "--data", BACK)
