"""Lab end to end for push to staging: the registry host sends its events (configured by
inventory/lab.py from the first deploy) to `dockyard receive` on the control machine, bound to
the lab network's gateway with a certificate from the lab's fleet CA; a push of
dockyard/release:staging from the control machine then leads, by itself, to the staging hosts
pulling the new digest (the rollout's release gate checks it) while no other Docker host pulls
it, an unauthenticated POST is refused, and the receiver's log names the trigger. Then the
receiver as a systemd service on one container host (its command observable there): active, TLS
with the fleet CA, 401 without the token, a trigger that runs, and a second deploy with no change.
Traffic goes only to the lab's hosts and the control machine's own address on the lab network."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import io
import json
import platform
import secrets
import signal
import socket
import ssl
import subprocess
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from dockyard import pki as fleet_pki
from tests.fleet.conftest import BIN, ENV, ROOT, STATE, lab_inventory, run_deploy

pytestmark = pytest.mark.lab

REPOSITORY, TAG = "dockyard/release", "staging"
# inventory/lab.py: the receiver's port on the gateway, and how many hosts are staging.
RECEIVER_PORT = 9443
STAGING_HOSTS = 2
# Bound on the whole loop: the event's delivery, the staging rollout (deploy and gates).
LOOP_TIMEOUT = 480
ENVELOPE = "application/vnd.docker.distribution.events.v1+json"
MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def _lab_name() -> str:
    return ENV["DOCKYARD_LAB_NAME"]


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def gateway(lab: list[dict[str, Any]]) -> str:
    """The control machine's address on the lab network (its Docker network's gateway)."""
    out = subprocess.run(
        [
            "docker",
            "network",
            "inspect",
            _lab_name(),
            "--format",
            "{{(index .IPAM.Config 0).Gateway}}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out, "the lab network has no gateway"
    return out


@pytest.fixture(scope="module")
def pki_dir() -> Path:
    return STATE / f"{_lab_name()}-pki"


@pytest.fixture(scope="module")
def token(first_deploy: Any) -> str:
    """The token inventory/lab.py made for the registry's endpoint (in the lab's state dir)."""
    return (STATE / f"{_lab_name()}.receiver-token").read_text().strip()


def _staging(lab: list[dict[str, Any]]) -> list[str]:
    """inventory/lab.py's staging group: the first container Docker hosts that are neither the
    storage nor the registry host."""
    return [
        h["name"]
        for h in lab
        if h["kind"] == "container"
        and "docker_hosts" in h["groups"]
        and not {"storage", "registry"} & set(h["groups"])
    ][:STAGING_HOSTS]


def push_release(endpoint: str, password: str, ca: Path) -> str:
    """A tiny image with new content (so a new digest), pushed from the control machine as
    dockyard/release:staging over TLS with basic auth; returns the manifest's digest."""
    context = ssl.create_default_context(cafile=str(ca))
    auth = base64.b64encode(f"fleet:{password}".encode()).decode()
    base = f"https://{endpoint}/v2/{REPOSITORY}"

    def call(method: str, url: str, data: Optional[bytes] = None, kind: str = "") -> Any:
        headers = {"Authorization": f"Basic {auth}"}
        if kind:
            headers["Content-Type"] = kind
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, context=context, timeout=60) as answer:
                return answer.status, answer.headers
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers

    content = f"release {uuid.uuid4()}\n".encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        member = tarfile.TarInfo("release.txt")
        member.size, member.mode = len(content), 0o644
        tar.addfile(member, io.BytesIO(content))
    layer = gzip.compress(raw.getvalue(), mtime=0)
    machine = platform.machine()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [_sha(raw.getvalue())]},
        }
    ).encode()
    for blob in (layer, config):
        status, headers = call("POST", f"{base}/blobs/uploads/", b"")
        assert status == 202, status
        location = urllib.parse.urljoin(f"https://{endpoint}/", headers["Location"])
        sep = "&" if "?" in location else "?"
        status, _ = call(
            "PUT", f"{location}{sep}digest={_sha(blob)}", blob, "application/octet-stream"
        )
        assert status == 201, status
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": len(config),
                "digest": _sha(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "size": len(layer),
                    "digest": _sha(layer),
                }
            ],
        }
    ).encode()
    status, _ = call("PUT", f"{base}/manifests/{TAG}", manifest, MANIFEST)
    assert status == 201, status
    return _sha(manifest)


def post(address: str, ca: Path, token: Optional[str], body: bytes) -> int:
    """POST an envelope to a receiver (TLS verified with the fleet CA); its status."""
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection(address, RECEIVER_PORT, context=context, timeout=15)
    headers = {"Content-Type": ENVELOPE}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request("POST", "/events", body=body, headers=headers)
        answer = connection.getresponse()
        answer.read()
        return answer.status
    finally:
        connection.close()


def envelope(repository: str, tag: str, digest: str, registry: str) -> bytes:
    event = {
        "id": str(uuid.uuid4()),
        "action": "push",
        "target": {
            "mediaType": MANIFEST,
            "digest": digest,
            "repository": repository,
            "tag": tag,
            "url": f"https://{registry}/v2/{repository}/manifests/{digest}",
        },
    }
    return json.dumps({"events": [event]}).encode()


def _wait_listening(address: str, port: int, proc: Optional[subprocess.Popen[str]] = None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the receiver exited with {proc.returncode}")
        try:
            with socket.create_connection((address, port), timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"nothing listens on {address}:{port}")


@pytest.fixture(scope="module")
def control_receiver(
    tmp_path_factory: pytest.TempPathFactory,
    gateway: str,
    pki_dir: Path,
    token: str,
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """`dockyard receive` on the control machine, on the gateway address, its command the
    staging rollout of the lab; (process, log file)."""
    work = tmp_path_factory.mktemp("receiver")
    issued = fleet_pki.ensure_server_cert(pki_dir, "receiver-control-machine", [], [gateway])
    token_file = work / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    config = work / "receiver.json"
    config.write_text(
        json.dumps(
            {
                "listen": gateway,
                "port": RECEIVER_PORT,
                "tls": {"certificate": str(issued.cert), "key": str(issued.key)},
                "token_file": str(token_file),
                "rules": [{"repository": REPOSITORY, "tags": [TAG]}],
                "command": [
                    str(BIN / "dockyard"),
                    "rollout",
                    "inventory/lab.py",
                    "deploy.py",
                    "--group",
                    "staging",
                    "--data",
                    'docker_release_images=["{image}"]',
                ],
                "workdir": str(ROOT),
            }
        )
    )
    log = work / "receiver.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "dockyard"), "receive", "--config", str(config)],
            cwd=ROOT,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    try:
        _wait_listening(gateway, RECEIVER_PORT, proc)
        yield proc, log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _has(host: Any, ref: str) -> bool:
    return bool(host.run(f"docker image inspect {ref}").rc == 0)


def test_a_push_to_the_fleet_registry_rolls_out_to_staging(
    lab: list[dict[str, Any]],
    hosts: dict[str, Any],
    endpoint: str,
    password: str,
    pki_dir: Path,
    gateway: str,
    token: str,
    control_receiver: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, log = control_receiver
    staging = _staging(lab)
    assert len(staging) == STAGING_HOSTS, lab
    others = [h["name"] for h in lab if "docker_hosts" in h["groups"] and h["name"] not in staging]
    ca = pki_dir / "ca.crt"
    # Refused without the token (and with a wrong one): nothing is triggered.
    fake = envelope(REPOSITORY, TAG, _sha(b"not pushed"), endpoint)
    assert post(gateway, ca, None, fake) == 401
    assert post(gateway, ca, "wrong-" + secrets.token_hex(12), fake) == 401

    started = time.monotonic()
    digest = push_release(endpoint, password, ca)
    ref = f"{endpoint}/{REPOSITORY}@{digest}"
    deadline = started + LOOP_TIMEOUT
    try:
        while time.monotonic() < deadline:
            text = log.read_text()
            if f"digest {digest}" in text and "exit " in text.split(f"digest {digest}", 1)[1]:
                break
            assert proc.poll() is None, f"the receiver exited:\n{text[-3000:]}"
            time.sleep(5)
        text = log.read_text()
        assert all(_has(hosts[name], ref) for name in staging), text[-4000:]
    finally:
        took = time.monotonic() - started
        print(f"push to staging: {took:.0f} s from the push to the rollout's end")
    # The log names the trigger (repository, tag, digest, the command) and its exit code.
    trigger = next(line for line in text.splitlines() if "trigger: push of" in line)
    assert f"{REPOSITORY}:{TAG} digest {digest}" in trigger and "--group staging" in trigger
    assert f'docker_release_images=["{ref}"]' in trigger
    assert "exit 0 after" in text
    assert "refused an event POST from" in text and "nothing triggered" in text
    # No other Docker host pulled it.
    for name in others:
        assert not _has(hosts[name], ref), name
    for name in staging:  # the hosts as the deploy left them
        hosts[name].run(f"docker image rm {ref}")


# ---- the systemd service on a host -------------------------------------------------------------

TRIGGERED = "/var/lib/dockyard/receiver/triggered"


@pytest.fixture(scope="module")
def service_host(lab: list[dict[str, Any]], btrfs_host: str) -> dict[str, Any]:
    """A container Docker host that is neither storage, registry nor the btrfs host."""
    return next(
        h
        for h in lab
        if h["kind"] == "container"
        and h["name"] != btrfs_host
        and not {"storage", "registry"} & set(h["groups"])
    )


def test_the_receiver_as_a_systemd_service(
    tmp_path: Path,
    hosts: dict[str, Any],
    service_host: dict[str, Any],
    pki_dir: Path,
) -> None:
    name, address = service_host["name"], service_host["address"]
    token = secrets.token_urlsafe(24)
    extra = {
        "receiver_token": token,
        "receiver_rules": [{"repository": REPOSITORY, "tags": [TAG]}],
        "receiver_command": ["sh", "-c", f'echo "$1" >> {TRIGGERED}', "sh", "{image}"],
    }
    # inventory/lab.py with this host in the receiver group and the receiver's data.
    inventory = lab_inventory(tmp_path, {name: extra}, join={"receiver": [name]})
    host = hosts[name]
    ca = pki_dir / "ca.crt"
    try:
        started = time.monotonic()
        first = run_deploy("--limit", name, inventory=inventory)
        assert first.returncode == 0, first.failures()
        assert host.service("dockyard-receiver.service").is_running
        assert host.service("dockyard-receiver.service").is_enabled
        for path, mode in (
            ("/etc/dockyard/receiver/token", 0o600),
            ("/etc/dockyard/receiver/receiver.key", 0o600),
        ):
            assert host.file(path).mode == mode, path
        # TLS verified with the fleet CA, for the host's address (the certificate's IP SAN).
        _wait_listening(address, RECEIVER_PORT)
        context = ssl.create_default_context(cafile=str(ca))
        with socket.create_connection((address, RECEIVER_PORT), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=address) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        digest = _sha(secrets.token_bytes(16))
        body = envelope(REPOSITORY, TAG, digest, "reg.lab:5443")
        assert post(address, ca, None, body) == 401
        assert post(address, ca, "wrong-" + token, body) == 401
        assert not host.file(TRIGGERED).exists
        assert post(address, ca, token, body) == 200
        deadline = time.monotonic() + 20
        while not host.file(TRIGGERED).exists and time.monotonic() < deadline:
            time.sleep(0.5)
        assert host.file(TRIGGERED).content_string == f"reg.lab:5443/{REPOSITORY}@{digest}\n"
        logged = host.run("journalctl -u dockyard-receiver.service --no-pager").stdout
        assert "refused an event POST from" in logged and f"digest {digest}" in logged
        # A second deploy changes nothing.
        second = run_deploy("--limit", name, inventory=inventory)
        assert second.returncode == 0, second.failures()
        assert second.changed_ops() == [], second.changed_ops()
        print(f"receiver service: {time.monotonic() - started:.0f} s for both deploys and checks")
    finally:
        host.run(
            "systemctl disable --now dockyard-receiver.service; "
            "rm -f /etc/systemd/system/dockyard-receiver.service; systemctl daemon-reload; "
            "rm -rf /etc/dockyard/receiver /var/lib/dockyard/receiver"
        )
