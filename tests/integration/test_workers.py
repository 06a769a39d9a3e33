"""dockyard's registry as several processes on one port (`--workers`): uploads that move between
workers finish with the right digest (and a wrong one is still refused), a killed registry takes
its workers along and can start again on the same port at once, a dead worker stops the
registry with a non-zero exit, SIGTERM stops all of them cleanly, and a bad count is refused."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dockyard.registry import paths as p
from tests.integration.conftest import (
    BIN,
    START_TIMEOUT,
    RegistryServer,
    location_path,
    make_server,
    patch_chunks,
    sha256,
    with_digest,
)

# Seconds allowed for processes to go away after a signal.
EXIT_TIMEOUT = 10.0


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def workers_of(server: RegistryServer, count: int) -> list[int]:
    """The `count` forked workers of a started registry (the port accepts as soon as the first
    process listens, which is before it forks: wait for them)."""
    assert server.process is not None
    deadline = time.monotonic() + EXIT_TIMEOUT
    while len(found := children_of(server.process.pid)) < count:
        assert time.monotonic() < deadline, f"{len(found)} workers forked, expected {count}"
        time.sleep(0.05)
    assert len(found) == count, found
    return found


def catching_sigterm(pids: list[int]) -> None:
    """Wait until every process has its SIGTERM handler (the event loop is up)."""
    deadline = time.monotonic() + EXIT_TIMEOUT
    for pid in pids:
        while True:
            status = Path(f"/proc/{pid}/status").read_text()
            caught = int(status.split("SigCgt:")[1].split()[0], 16)
            if caught & (1 << (signal.SIGTERM - 1)):
                break
            assert time.monotonic() < deadline, f"{pid} never caught SIGTERM"
            time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + EXIT_TIMEOUT
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def chunked_upload(server: RegistryServer, repo: str, data: bytes, digest: str) -> int:
    """POST, three PATCHes and the PUT, each on a new connection (so on any worker)."""
    start = server.request("POST", f"/v2/{repo}/blobs/uploads/")
    assert start.status == 202
    location = location_path(start.headers["location"])
    location = patch_chunks(server, location, data, len(data) // 3 + 1)
    return server.request("PUT", with_digest(location, digest)).status


def test_uploads_moving_between_workers(tmp_path: Path) -> None:
    server = make_server("dockyard", tmp_path / "w", serve_args=["--workers", "3"])
    try:
        workers_of(server, 2)  # the first process serves too
        for i in range(12):
            data = hashlib.sha256(str(i).encode()).digest() * (10_000 + i)
            assert chunked_upload(server, "workers/blobs", data, sha256(data)) == 201
            got = server.request("GET", f"/v2/workers/blobs/blobs/{sha256(data)}")
            assert got.status == 200 and got.body == data
        wrong = sha256(b"something else")
        status = chunked_upload(server, "workers/blobs", b"x" * 90_000, wrong)
        assert status == 400
        assert server.request("HEAD", f"/v2/workers/blobs/blobs/{wrong}").status == 404
    finally:
        server.stop()


def test_killed_registry_takes_its_workers_along(tmp_path: Path) -> None:
    server = make_server("dockyard", tmp_path / "k", serve_args=["--workers", "2"])
    workers = workers_of(server, 1)
    server.stop(signal.SIGKILL)
    assert wait_gone(workers) == []
    server.start()  # same port, right away
    try:
        assert server.request("GET", "/v2/").status == 200
    finally:
        server.stop()


def test_a_dead_worker_stops_the_registry(tmp_path: Path) -> None:
    server = make_server("dockyard", tmp_path / "d", serve_args=["--workers", "2"])
    assert server.process is not None and server.log_path is not None
    (worker,) = workers_of(server, 1)
    os.kill(worker, signal.SIGKILL)
    assert server.process.wait(timeout=EXIT_TIMEOUT) == 1
    assert f"worker {worker} exited (signal 9)" in server.log_path.read_text()


def test_sigterm_stops_every_worker(tmp_path: Path) -> None:
    server = make_server("dockyard", tmp_path / "t", serve_args=["--workers", "3"])
    assert server.process is not None
    workers = workers_of(server, 2)
    catching_sigterm([server.process.pid, *workers])
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=EXIT_TIMEOUT) == 0
    assert wait_gone(workers) == []


def test_bad_worker_count_is_refused(tmp_path: Path) -> None:
    server = make_server("dockyard", tmp_path / "b", start=False)
    for bad in ("0", "65"):
        run = subprocess.run(
            [
                str(BIN / "dockyard"),
                "registry",
                "serve",
                "--config",
                str(server.config_path),
                "--workers",
                bad,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode == 1
        assert f"--workers {bad}: must be between 1 and 64" in run.stderr


def test_digest_states_of_uploads_gone_elsewhere_are_dropped(tmp_path: Path) -> None:
    """Two processes on one root: what one finishes, the other forgets (no slow leak)."""
    from dockyard.registry.driver import FilesystemDriver
    from dockyard.registry.store import Registry

    first = Registry(FilesystemDriver(str(tmp_path)))
    second = Registry(FilesystemDriver(str(tmp_path)))
    data = b"layer" * 1000
    kept = first.start_upload("forget/me")
    moved = first.start_upload("forget/me")
    for status in (kept, moved):
        with first.append_upload("forget/me", status.upload_id) as appender:
            appender.write(data)
    second.finish_upload("forget/me", moved.upload_id, p.parse_digest(sha256(data)))
    assert first.forget_gone_uploads() == 1
    assert first.forget_gone_uploads() == 0
    with first.append_upload("forget/me", kept.upload_id) as appender:  # still usable
        appender.write(b"more")
    digest = p.parse_digest(sha256(data + b"more"))
    assert first.finish_upload("forget/me", kept.upload_id, digest) == digest


def _hold_port(port: int) -> socket.socket:
    """A listener that never accepts, as a killed registry's dying worker is: a client's
    connect to it succeeds (the kernel queues it) and is reset when the socket closes."""
    return socket.create_server(("127.0.0.1", port))


def test_start_waits_for_a_predecessor_that_still_holds_the_port(tmp_path: Path) -> None:
    """The restart race of issue 15, made deterministic: the port is held for 1.5 s after the
    new registry starts. start() must return only once the new registry serves, so the first
    request is answered (a TCP-connect readiness check returned at once, and the request was
    reset when the holder closed)."""
    server = make_server("dockyard", tmp_path / "held", start=False, serve_args=["--workers", "2"])
    holder = _hold_port(server.port)
    released = threading.Event()

    def release() -> None:
        time.sleep(1.5)
        released.set()
        holder.close()

    thread = threading.Thread(target=release)
    thread.start()
    try:
        server.start()
        assert released.is_set(), "start() returned while another process held the port"
        assert server.request("GET", "/v2/").status == 200
        assert server.log_path is not None
        assert "is still held" in server.log_path.read_text()
    finally:
        thread.join()
        server.stop()


def test_ready_is_told_only_once_the_port_is_ours(tmp_path: Path) -> None:
    """Under systemd (Type=notify) READY=1 is what `systemctl restart` waits for: it must not
    be sent while a predecessor's socket still listens."""
    server = make_server("dockyard", tmp_path / "notify", start=False)
    holder = _hold_port(server.port)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"dockyard-test-{os.getpid()}-notify"
    notify.bind("\0" + name)
    proc = subprocess.Popen(
        server.command(),
        env={**os.environ, "NOTIFY_SOCKET": "@" + name},
        stderr=subprocess.DEVNULL,
    )
    try:
        notify.settimeout(1.5)
        with pytest.raises(TimeoutError):
            notify.recv(4096)
        assert proc.poll() is None
        holder.close()
        notify.settimeout(START_TIMEOUT)
        message = notify.recv(4096).decode()
        assert "READY=1" in message.split("\n") and f"MAINPID={proc.pid}" in message
        assert server.request("GET", "/v2/").status == 200
    finally:
        holder.close()
        notify.close()
        proc.terminate()
        proc.wait(timeout=EXIT_TIMEOUT)


def test_a_port_that_stays_held_is_a_clear_error(tmp_path: Path) -> None:
    server = make_server("dockyard", tmp_path / "busy", start=False)
    holder = _hold_port(server.port)
    try:
        proc = subprocess.run(server.command(), capture_output=True, text=True, timeout=60)
    finally:
        holder.close()
    assert proc.returncode == 1
    assert f"http.addr 127.0.0.1:{server.port} is in use by another process" in proc.stderr
    assert "Traceback" not in proc.stderr
