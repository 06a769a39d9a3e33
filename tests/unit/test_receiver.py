"""`dockyard receive` on loopback: a real receiver (real TLS with a test CA from dockyard.pki) and
real HTTP clients. Unauthenticated, oversized, malformed and mistyped requests are refused and
trigger nothing; a slow or idle client (no handshake, or headers then silence) holds no one else
up and is cut off at its deadline; a push of the configured repository and tag runs the command
once with its placeholders filled, a duplicate id or another repository, tag or action runs
nothing, and pushes during a run are coalesced into one run of the newest digest. Every refusal
is sent with a body that would trigger if the check were gone. Then the real registry's own
notifications, over TLS, drive the receiver."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from dockyard import pki as fleet_pki
from dockyard import receiver as rcv

ENVELOPE = "application/vnd.docker.distribution.events.v1+json"
MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
TOKEN = "test-token-0123456789abcdef"
REPO, TAG = "dockyard/release", "staging"

# The command the receiver runs: appends its argv as one JSON line to LOG; while the file HOLD
# exists it waits (so a test can keep a run going), at most 20 s.
RECORDER = """\
import json, os, sys, time
log, hold = sys.argv[1], sys.argv[2]
with open(log, "a") as f:
    f.write(json.dumps(sys.argv[3:]) + "\\n")
deadline = time.time() + 20
while os.path.exists(hold) and time.time() < deadline:
    time.sleep(0.05)
"""


def digest_of(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def push_event(
    repository: str = REPO,
    tag: str = TAG,
    digest: Optional[str] = None,
    action: str = "push",
    media: str = MANIFEST,
    event_id: Optional[str] = None,
) -> dict[str, Any]:
    digest = digest or digest_of(str(uuid.uuid4()))
    return {
        "id": event_id or str(uuid.uuid4()),
        "timestamp": "2026-01-01T00:00:00.000000000Z",
        "action": action,
        "target": {
            "mediaType": media,
            "size": 528,
            "digest": digest,
            "length": 528,
            "repository": repository,
            "url": f"https://registry.lab:5443/v2/{repository}/manifests/{digest}",
            "tag": tag,
        },
        "request": {"id": "r", "addr": "10.0.0.9:4711", "host": "registry.lab:5443"},
        "actor": {"name": "fleet"},
        "source": {"addr": "registry:5443", "instanceID": "i"},
    }


def envelope(*events: dict[str, Any]) -> bytes:
    return json.dumps({"events": list(events)}).encode()


class Live:
    """A receiver started on loopback with the recorder as its command."""

    def __init__(self, tmp: Path, **config: Any) -> None:
        self.tmp = tmp
        pki = tmp / "pki"
        fleet_pki.ensure_server_cert(pki, "receiver", ["localhost"], ["127.0.0.1"])
        self.ca = str(pki / "ca.crt")
        token_file = tmp / "token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        self.log = tmp / "runs.jsonl"
        self.hold = tmp / "hold"
        doc: dict[str, Any] = {
            "listen": "127.0.0.1",
            "port": 0,
            "tls": {"certificate": str(pki / "receiver.crt"), "key": str(pki / "receiver.key")},
            "token_file": str(token_file),
            "rules": [{"repository": REPO, "tags": [TAG]}],
            "command": [
                sys.executable,
                "-c",
                RECORDER,
                str(self.log),
                str(self.hold),
                "{repository}",
                "{tag}",
                "{digest}",
                "{image}",
                "{event_id}",
            ],
            **config,
        }
        self.config = rcv.parse_config(doc)
        self.receiver = rcv.Receiver.from_config(self.config)
        self.host, self.port = self.receiver.start()
        self.context = ssl.create_default_context(cafile=self.ca)

    def connection(self, timeout: float = 10) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.context, timeout=timeout
        )

    def post(
        self,
        body: bytes,
        token: Optional[str] = TOKEN,
        media: str = ENVELOPE,
        path: str = "/events",
        method: str = "POST",
        headers: Optional[dict[str, str]] = None,
    ) -> tuple[int, dict[str, Any]]:
        connection = self.connection()
        try:
            sent = {"Content-Type": media, **(headers or {})}
            if token is not None:
                sent["Authorization"] = f"Bearer {token}"
            connection.request(method, path, body=body, headers=sent)
            answer = connection.getresponse()
            text = answer.read()
        finally:
            connection.close()
        try:
            return answer.status, json.loads(text) if text else {}
        except ValueError:
            return answer.status, {"raw": text.decode(errors="replace")}

    def runs(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def idle(self, timeout: float = 20) -> None:
        assert self.receiver.dispatcher.wait_idle(timeout), "the worker did not finish"

    def stop(self) -> None:
        self.receiver.stop()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    server = Live(tmp_path)
    yield server
    if server.hold.exists():
        server.hold.unlink()
    server.stop()


# ---- triggering --------------------------------------------------------------------------------


def test_a_push_of_the_configured_repository_and_tag_runs_the_command_once(live: Live) -> None:
    event = push_event()
    status, answer = live.post(envelope(event))
    assert status == 200, answer
    assert answer["triggered"] == [event["id"]]
    live.idle()
    digest = event["target"]["digest"]
    assert live.runs() == [[REPO, TAG, digest, f"registry.lab:5443/{REPO}@{digest}", event["id"]]]
    code = live.receiver.dispatcher.finished[-1][1]
    assert code == 0


def test_the_trigger_and_its_exit_code_are_logged(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    event = push_event()
    with caplog.at_level(logging.INFO, logger="dockyard.receiver"):
        assert live.post(envelope(event))[0] == 200
        live.idle()
    digest = event["target"]["digest"]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("trigger:"))
    for part in (REPO, TAG, digest, event["id"], sys.executable, f"{REPO}@{digest}"):
        assert part in line, (part, line)
    assert any(
        "exit 0 after" in r.getMessage() and digest in r.getMessage() for r in caplog.records
    )


def test_a_duplicate_event_id_runs_nothing(live: Live) -> None:
    event = push_event()
    assert live.post(envelope(event))[0] == 200
    live.idle()
    status, answer = live.post(envelope(event))  # the registry delivers at least once
    assert status == 200 and answer["duplicates"] == 1 and answer["triggered"] == []
    live.idle()
    assert len(live.runs()) == 1


@pytest.mark.parametrize(
    "event",
    [
        push_event(repository="dockyard/other"),
        push_event(tag="production"),
        push_event(action="pull"),
        push_event(action="delete"),
        push_event(media="application/octet-stream"),  # a blob push of the same repository
        push_event(digest="sha256:not-a-digest"),
    ],
    ids=["repository", "tag", "pull", "delete", "blob", "bad-digest"],
)
def test_events_that_do_not_match_run_nothing(live: Live, event: dict[str, Any]) -> None:
    status, answer = live.post(envelope(event))
    assert status == 200 and answer["ignored"] == 1 and answer["triggered"] == []
    live.idle()
    assert live.runs() == []


def test_pushes_during_a_run_are_coalesced_into_one_run_of_the_newest_digest(live: Live) -> None:
    live.hold.write_text("hold")
    first, second, third = push_event(), push_event(), push_event()
    assert live.post(envelope(first))[0] == 200
    deadline = time.monotonic() + 10
    while not live.runs() and time.monotonic() < deadline:  # the first run has started
        time.sleep(0.05)
    assert len(live.runs()) == 1
    assert live.post(envelope(second))[0] == 200
    assert live.post(envelope(third))[0] == 200
    live.hold.unlink()
    live.idle()
    digests = [run[2] for run in live.runs()]
    assert digests == [first["target"]["digest"], third["target"]["digest"]]


def test_an_envelope_answers_at_once_while_a_command_runs(live: Live) -> None:
    live.hold.write_text("hold")
    assert live.post(envelope(push_event()))[0] == 200
    started = time.monotonic()
    assert live.post(envelope(push_event()))[0] == 200
    assert time.monotonic() - started < 2
    live.hold.unlink()


# ---- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789abcdef", TOKEN + "x", ""])
def test_an_unauthenticated_event_is_refused_logged_and_runs_nothing(
    live: Live, token: Optional[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="dockyard.receiver"):
        status, answer = live.post(envelope(push_event()), token=token)
    assert status == 401, answer
    live.idle()
    assert live.runs() == []
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused and "127.0.0.1:" in refused[0] and "nothing triggered" in refused[0]


def test_another_scheme_with_the_token_is_refused(live: Live) -> None:
    status, _ = live.post(
        envelope(push_event()), token=None, headers={"Authorization": f"Basic {TOKEN}"}
    )
    assert status == 401
    live.idle()
    assert live.runs() == []


def test_an_oversized_body_is_refused_before_it_is_read(tmp_path: Path) -> None:
    live = Live(tmp_path, max_body=4096)
    try:
        body = envelope(push_event(), *[push_event(repository="pad/ding") for _ in range(20)])
        assert len(body) > 4096
        status, answer = live.post(body)
        assert status == 413 and "4096" in answer["message"]
        live.idle()
        assert live.runs() == []
    finally:
        live.stop()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"events": [', "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b'{"event": []}', "not an event envelope"),
        (b'{"events": ["push"]}', "events[0] is not an object"),
        (b'{"events": [{"action": "push"}]}', "events[0] has no id"),
    ],
)
def test_a_malformed_body_is_refused_naming_the_problem(
    live: Live, body: bytes, message: str
) -> None:
    status, answer = live.post(body)
    assert status == 400 and message in answer["message"], answer
    assert "Traceback" not in json.dumps(answer)


def test_a_wrong_media_type_is_refused(live: Live) -> None:
    status, answer = live.post(envelope(push_event()), media="text/plain")
    assert status == 400 and "text/plain" in answer["message"]
    live.idle()
    assert live.runs() == []


def test_the_distribution_3_media_type_and_parameters_are_accepted(live: Live) -> None:
    media = "application/vnd.docker.distribution.events.v2+json; charset=utf-8"
    assert live.post(envelope(push_event()), media=media)[0] == 200


def test_only_post_to_the_events_path(live: Live) -> None:
    body = envelope(push_event())
    assert live.post(body, path="/other")[0] == 404
    assert live.post(body, method="PUT")[0] == 405
    assert live.post(b"", method="GET")[0] == 405
    live.idle()
    assert live.runs() == []


def _tls_socket(live: Live) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", live.port), timeout=10)
    return live.context.wrap_socket(raw, server_hostname="127.0.0.1")


def _answer(sock: ssl.SSLSocket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (OSError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    return data


def test_a_body_without_content_length_is_refused(live: Live) -> None:
    body = envelope(push_event())
    sock = _tls_socket(live)
    try:
        sock.sendall(
            b"POST /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nContent-Type: "
            + ENVELOPE.encode()
            + b"\r\n\r\n"
            + body
        )
        assert _answer(sock).startswith(b"HTTP/1.0 411")
    finally:
        sock.close()
    live.idle()
    assert live.runs() == []


# ---- slow and idle clients ---------------------------------------------------------------------


def test_a_client_stalled_after_its_headers_blocks_no_one_and_is_cut_off(tmp_path: Path) -> None:
    live = Live(tmp_path, request_deadline=2.0, read_timeout=5.0)
    slow = _tls_socket(live)
    try:
        slow.sendall(
            b"POST /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nContent-Type: "
            + ENVELOPE.encode()
            + b"\r\nContent-Length: 500\r\n\r\n"
        )
        time.sleep(0.2)
        started = time.monotonic()
        status, _ = live.post(envelope(push_event()))
        assert status == 200 and time.monotonic() - started < 2
        # The stalled one is cut off at its deadline (2 s), well before its read timeout (5 s).
        slow.settimeout(10)
        answered = _answer(slow)
        assert time.monotonic() - started < 4.5
        assert not answered.startswith(b"HTTP/1.0 200")
    finally:
        slow.close()
        live.stop()


def test_a_client_that_never_handshakes_blocks_no_one(live: Live) -> None:
    idle = socket.create_connection(("127.0.0.1", live.port), timeout=10)
    try:
        time.sleep(0.2)
        started = time.monotonic()
        assert live.post(envelope(push_event()))[0] == 200
        assert time.monotonic() - started < 2
    finally:
        idle.close()


def test_connections_over_the_bound_are_closed_not_queued(tmp_path: Path) -> None:
    live = Live(tmp_path, max_connections=2, request_deadline=1.5)
    idle = [socket.create_connection(("127.0.0.1", live.port), timeout=10) for _ in range(2)]
    try:
        time.sleep(0.3)
        with pytest.raises((OSError, ssl.SSLError, http.client.HTTPException)):
            live.post(envelope(push_event()))
        # The idle ones are cut off at their deadline: their threads are free again.
        time.sleep(2.0)
        assert live.post(envelope(push_event()))[0] == 200
    finally:
        for sock in idle:
            sock.close()
        live.stop()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_only_tls_1_2_and_up(live: Live) -> None:
    context = ssl.create_default_context(cafile=live.ca)
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, OSError)):
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as raw:
            context.wrap_socket(raw, server_hostname="127.0.0.1")


# ---- configuration -----------------------------------------------------------------------------


def _doc(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "tls": {"certificate": "/c.crt", "key": "/c.key"},
        "token_file": str(tmp_path / "token"),
        "rules": [{"repository": REPO, "tags": [TAG]}],
        "command": ["dockyard", "rollout", "inv.py", "deploy.py", "--data", 'x=["{image}"]'],
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"command": "dockyard rollout inv.py deploy.py"}, "argv, never a shell string"),
        ({"command": ["echo", "{secret}"]}, "names {secret}"),
        ({"command": ["echo", "{image!r}"]}, "names {image}"),
        ({"command": []}, "a non-empty list"),
        ({"rules": [{"repository": "Bad Name", "tags": ["x"]}]}, "rules[0].repository"),
        ({"rules": [{"repository": REPO, "tags": []}]}, "rules[0].tags"),
        ({"rules": []}, "rules=[] is not valid"),
        ({"tls": None}, "the receiver serves TLS only"),
        ({"path": "events"}, "an absolute URL path"),
        ({"max_body": 0}, "max_body=0 is not valid"),
        ({"shell": True}, "unknown key shell"),
        ({"registry": "-x:1"}, "host[:port]"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(rcv.ReceiverConfigError) as info:
        rcv.parse_config(_doc(tmp_path, **changes))
    assert message in str(info.value)


def test_a_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    path.chmod(0o644)
    with pytest.raises(rcv.ReceiverConfigError, match="it must be 0600"):
        rcv.read_token(str(path))
    path.chmod(0o600)
    assert rcv.read_token(str(path)) == TOKEN
    path.write_text("short")
    with pytest.raises(rcv.ReceiverConfigError, match="at least 16"):
        rcv.read_token(str(path))


def test_placeholders_with_literal_braces(tmp_path: Path) -> None:
    config = rcv.parse_config(_doc(tmp_path, command=["echo", '{{"image": "{image}"}}']))
    trigger = rcv.Trigger(REPO, TAG, digest_of("x"), "id", "r:5443")
    assert trigger.argv(config.command) == [
        "echo",
        f'{{"image": "r:5443/{REPO}@{digest_of("x")}"}}',
    ]


def test_the_cli_checks_the_config_and_says_what_is_wrong(tmp_path: Path) -> None:
    config = tmp_path / "receiver.json"
    config.write_text(json.dumps(_doc(tmp_path, command="rm -rf /")))
    proc = subprocess.run(
        [sys.executable, "-m", "dockyard.cli", "receive", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "dockyard receive: error: command=" in proc.stderr and "Traceback" not in proc.stderr


def test_the_cli_check_reads_yaml_token_and_tls(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    fleet_pki.ensure_server_cert(pki, "receiver", ["localhost"], [])
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    config = tmp_path / "receiver.yml"
    config.write_text(
        f"tls: {{certificate: {pki}/receiver.crt, key: {pki}/receiver.key}}\n"
        f"token_file: {token}\n"
        f"rules: [{{repository: {REPO}, tags: [{TAG}]}}]\n"
        "command: [echo, '{image}']\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dockyard.cli", "receive", "--config", str(config), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_the_control_machines_dockyard_hands_receive_to_the_core(tmp_path: Path) -> None:
    from dockyard_deploys import cli as control_cli

    config = tmp_path / "missing.json"
    assert control_cli.main(["receive", "--config", str(config)]) == 2


# ---- the real registry's notifications drive it ------------------------------------------------


def test_the_registrys_own_notifications_over_tls_trigger_the_command(tmp_path: Path) -> None:
    from tests.unit.registry_live import start_registry
    from tests.unit.test_registry_notifications import Client

    live = Live(tmp_path / "receiver")
    registry = start_registry(
        tmp_path / "registry",
        [
            {
                "name": "receiver",
                "url": f"https://localhost:{live.port}/events",
                "timeout": "5s",
                "headers": {"Authorization": [f"Bearer {TOKEN}"]},
            }
        ],
        extra={
            "notifications.dockyard": {
                "queuedirectory": str(tmp_path / "queue"),
                "cafile": live.ca,
            }
        },
    )
    try:
        manifest, _, _ = Client(registry).push_image(REPO, TAG, b"release layer")
        Client(registry).push_image("dockyard/other", TAG, b"other layer")
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        deadline = time.monotonic() + 30
        while not live.runs() and time.monotonic() < deadline:
            time.sleep(0.1)
        live.idle()
    finally:
        registry.stop()
        live.stop()
    runs = live.runs()
    assert len(runs) == 1, runs
    assert runs[0][:3] == [REPO, TAG, digest]
    assert runs[0][3].endswith(f"/{REPO}@{digest}")
