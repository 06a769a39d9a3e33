"""Registry notifications (`notifications.endpoints`) against the real registry on loopback and
a real webhook receiver on loopback: the events and their envelope field by field as CNCF
distribution documents and sends them (notifications.md, notifications/event.go, bridge.go),
delivery through an outage and a restart (at least once, ids kept), the bounded queue, a
hanging endpoint that never slows a push, TLS endpoints, and the configuration's errors."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from dockyard import pki as fleet_pki
from dockyard.registry.config import ConfigError, load_config
from tests.integration.conftest import RegistryServer, free_port
from tests.unit.registry_live import (
    Receiver,
    endpoint,
    sample,
    scrape,
    start_registry,
    wait_until,
)

ENVELOPE = "application/vnd.docker.distribution.events.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z$")
AGENT = "notify-test/1.0"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Client:
    """Requests to the registry with a User-Agent (and credentials, when given)."""

    def __init__(self, server: RegistryServer, user: str = "", password: str = "") -> None:
        self.server = server
        self.headers = {"User-Agent": AGENT}
        if user:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def request(self, method: str, path: str, body: bytes = b"", **headers: str) -> Any:
        return self.server.request(method, path, body or None, {**self.headers, **headers})

    def push_blob(self, repo: str, data: bytes, monolithic: bool = True) -> str:
        """POST ?digest= (monolithic), or POST then PUT with the body."""
        digest = sha256(data)
        if monolithic:
            reply = self.request("POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", data)
        else:
            start = self.request("POST", f"/v2/{repo}/blobs/uploads/")
            assert start.status == 202, start.body[:200]
            reply = self.request("PUT", f"{start.headers['location']}?digest={digest}", data)
        assert reply.status == 201, (reply.status, reply.body[:200])
        return digest

    def push_image(self, repo: str, tag: str, layer: bytes) -> tuple[bytes, str, str]:
        """Config and layer blobs, then the manifest by tag: (manifest, config, layer)."""
        config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        config_digest = self.push_blob(repo, config)
        layer_digest = self.push_blob(repo, layer, monolithic=False)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest,
                        "size": len(layer),
                    }
                ],
            }
        ).encode()
        reply = self.request(
            "PUT", f"/v2/{repo}/manifests/{tag}", manifest, **{"Content-Type": OCI_MANIFEST}
        )
        assert reply.status == 201, (reply.status, reply.body[:200])
        return manifest, config_digest, layer_digest


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def queued_events(queue: Path) -> list[dict[str, Any]]:
    """The events in an endpoint's queue directory (its envelope files, oldest first). The
    registry delivers while this reads: a file listed and then delivered (removed) is no longer
    queued."""
    if not queue.exists():
        return []
    events = []
    for name in sorted(os.listdir(queue)):
        if name.endswith(".json") and not name.startswith("."):
            try:
                events += json.loads((queue / name).read_bytes())["events"]
            except FileNotFoundError:
                continue
    return events


# ---- the events, field by field ---------------------------------------------------------------


def test_events_for_push_pull_mount_and_delete_as_distribution_sends_them(
    tmp_path: Path, receiver: Receiver
) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt.hashpw(b'secret', bcrypt.gensalt(4)).decode()}\n")
    filtered = Receiver().start()
    server = start_registry(
        tmp_path,
        [
            endpoint(
                "all",
                receiver,
                headers={"Authorization": ["Bearer t0ken"], "X-Multi": ["a", "b"]},
            ),
            # distribution's ignoredSink: no pulls, nothing of media type octet-stream (blobs)
            endpoint(
                "filtered",
                filtered,
                ignoredmediatypes=["application/octet-stream"],
                ignore={"actions": ["pull"]},
            ),
            endpoint("off", filtered, disabled=True),
        ],
        extra={"auth.htpasswd": {"realm": "test", "path": str(htpasswd)}},
    )
    try:
        client = Client(server, "alice", "secret")
        manifest, config_digest, layer_digest = client.push_image("team/app", "v1", b"layer!")
        manifest_digest = sha256(manifest)
        assert client.request("GET", "/v2/team/app/manifests/v1").status == 200
        assert client.request("GET", f"/v2/team/app/blobs/{layer_digest}").status == 200
        mount = client.request(
            "POST", f"/v2/other/app/blobs/uploads/?mount={layer_digest}&from=team/app"
        )
        assert mount.status == 201
        assert client.request("DELETE", f"/v2/team/app/manifests/{manifest_digest}").status == 202
        assert client.request("DELETE", f"/v2/other/app/blobs/{layer_digest}").status == 202
        # not events: a failed request, a listing
        assert client.request("GET", "/v2/team/app/manifests/nope").status == 404
        assert client.request("GET", "/v2/team/app/tags/list").status == 200

        wait_until("8 events delivered", lambda: len(receiver.delivered()) >= 8)
        wait_until("3 filtered events", lambda: len(filtered.delivered()) >= 3)
    finally:
        server.stop()
        filtered.stop()
    events = receiver.delivered()
    assert len(events) == 8

    # the POST: envelope media type, the endpoint's headers (each value of a list sent)
    attempt = receiver.attempts[0]
    assert attempt.headers["content-type"] == [ENVELOPE]
    assert attempt.headers["authorization"] == ["Bearer t0ken"]
    assert attempt.headers["x-multi"] == ["a", "b"]
    assert set(attempt.envelope) == {"events"}

    base = f"http://{server.address}"
    octet = "application/octet-stream"
    config_size = len(json.dumps({"architecture": "amd64", "os": "linux"}))
    expected = [
        # blob pushes: octet-stream, size and length, the blob's URL (no tag)
        ("push", "POST", {
            "mediaType": octet, "size": config_size, "digest": config_digest,
            "length": config_size, "repository": "team/app",
            "url": f"{base}/v2/team/app/blobs/{config_digest}",
        }),
        ("push", "PUT", {
            "mediaType": octet, "size": 6, "digest": layer_digest, "length": 6,
            "repository": "team/app", "url": f"{base}/v2/team/app/blobs/{layer_digest}",
        }),
        # a manifest push by tag: its media type, the URL by digest, the tag
        ("push", "PUT", {
            "mediaType": OCI_MANIFEST, "size": len(manifest), "digest": manifest_digest,
            "length": len(manifest), "repository": "team/app",
            "url": f"{base}/v2/team/app/manifests/{manifest_digest}", "tag": "v1",
        }),
        ("pull", "GET", {
            "mediaType": OCI_MANIFEST, "size": len(manifest), "digest": manifest_digest,
            "length": len(manifest), "repository": "team/app",
            "url": f"{base}/v2/team/app/manifests/{manifest_digest}", "tag": "v1",
        }),
        ("pull", "GET", {
            "mediaType": octet, "size": 6, "digest": layer_digest, "length": 6,
            "repository": "team/app", "url": f"{base}/v2/team/app/blobs/{layer_digest}",
        }),
        # a cross-repository mount: the blob in its new repository, and where it came from
        ("mount", "POST", {
            "mediaType": octet, "size": 6, "digest": layer_digest, "length": 6,
            "repository": "other/app", "fromRepository": "team/app",
            "url": f"{base}/v2/other/app/blobs/{layer_digest}",
        }),
        # deletes: only the digest and the repository
        ("delete", "DELETE", {"digest": manifest_digest, "repository": "team/app"}),
        ("delete", "DELETE", {"digest": layer_digest, "repository": "other/app"}),
    ]  # fmt: skip
    instance = events[0]["source"]["instanceID"]
    assert UUID.match(instance)
    assert len(expected) == len(events)
    for event, (action, method, target) in zip(events, expected):
        assert set(event) == {"id", "timestamp", "action", "target", "request", "actor", "source"}
        assert UUID.match(event["id"]), event["id"]
        assert TIMESTAMP.match(event["timestamp"]), event["timestamp"]
        assert event["action"] == action
        assert event["target"] == target, (action, event["target"])
        request = event["request"]
        assert set(request) == {"id", "addr", "host", "method", "useragent"}
        assert UUID.match(request["id"])
        assert re.match(r"^127\.0\.0\.1:\d+$", request["addr"]), request["addr"]
        assert request["host"] == server.address
        assert request["method"] == method
        assert request["useragent"] == AGENT
        assert event["actor"] == {"name": "alice"}
        assert event["source"] == {
            "addr": f"{socket.gethostname()}:{server.port}",
            "instanceID": instance,
        }
    assert len({e["id"] for e in events}) == 8
    assert len({e["request"]["id"] for e in events}) == 8  # one request each

    # the filtered endpoint: no pulls, no blob (octet-stream) events; the disabled one: nothing
    got = [(e["action"], e["target"].get("mediaType"), e["target"]["repository"]) for e in
           filtered.delivered()]  # fmt: skip
    assert got == [
        ("push", OCI_MANIFEST, "team/app"),
        ("delete", None, "team/app"),
        ("delete", None, "other/app"),
    ]
    assert not (tmp_path / "queue" / "off").exists()


def test_head_requests_are_pulls_and_a_deleted_tag_names_the_tag(
    tmp_path: Path, receiver: Receiver
) -> None:
    """distribution serves HEAD through the same Get/ServeBlob its listener wraps: a HEAD of a
    manifest or blob is a pull event too. Deleting a tag tells the tag (distribution 3's
    TagDeleted: repository and tag)."""
    server = start_registry(tmp_path, [endpoint("all", receiver)])
    try:
        client = Client(server)
        manifest, _config, layer = client.push_image("r", "t", b"x")
        assert client.request("HEAD", "/v2/r/manifests/t").status == 200
        assert client.request("HEAD", f"/v2/r/blobs/{layer}").status == 200
        assert client.request("DELETE", "/v2/r/manifests/t").status == 202
        wait_until("6 events", lambda: len(receiver.delivered()) >= 6)
    finally:
        server.stop()
    events = receiver.delivered()
    assert [(e["action"], e["request"]["method"]) for e in events[3:]] == [
        ("pull", "HEAD"),
        ("pull", "HEAD"),
        ("delete", "DELETE"),
    ]
    assert events[3]["target"]["tag"] == "t"
    assert events[3]["target"]["digest"] == sha256(manifest)
    assert events[4]["target"]["digest"] == layer
    assert events[5]["target"] == {"repository": "r", "tag": "t"}
    assert events[5]["actor"] == {}  # no auth configured


# ---- delivery: outage, restart, bound, a hanging endpoint, TLS -------------------------------


def test_an_outage_then_recovery_delivers_every_event_keeping_its_id(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.mode = "fail"
    debug = free_port()
    server = start_registry(tmp_path, [endpoint("hook", receiver)], debug_port=debug)
    try:
        client = Client(server)
        digests = [client.push_blob("outage/repo", f"blob {i}".encode()) for i in range(6)]
        # every push is answered while the endpoint refuses; its events wait in the queue
        wait_until("a refused delivery", lambda: receiver.refused())
        samples = wait_until(
            "failures counted",
            lambda: (
                (s := scrape(debug))
                and sample(s, "registry_notifications_failures_total", endpoint="hook") >= 2
                and s
            ),
        )
        assert sample(samples, "registry_notifications_delivered_total", endpoint="hook") == 0
        wait_until(
            "all 6 events queued",
            lambda: sample(scrape(debug), "registry_notifications_pending", endpoint="hook") == 6,
        )
        receiver.mode = "ok"
        wait_until("6 events delivered", lambda: len(receiver.delivered()) >= 6)
        wait_until("the queue emptied", lambda: queued_events(tmp_path / "queue" / "hook") == [])
        samples = scrape(debug)
    finally:
        server.stop()
    delivered = receiver.delivered()
    assert sorted(e["target"]["digest"] for e in delivered) == sorted(digests)
    ids = [e["id"] for e in delivered]
    assert len(set(ids)) == len(ids) == 6, "an event was accepted twice or lost"
    # events sent during the outage came again, each with its id and content unchanged
    refused = receiver.refused()
    by_id = {e["id"]: e for e in delivered}
    assert refused and all(by_id[e["id"]] == e for e in refused)
    assert sample(samples, "registry_notifications_delivered_total", endpoint="hook") == 6
    assert sample(samples, "registry_notifications_events_total", endpoint="hook") == 6
    assert sample(samples, "registry_notifications_pending", endpoint="hook") == 0
    assert sample(samples, "registry_notifications_dropped_total", endpoint="hook") == 0


def test_queued_events_survive_a_restart(tmp_path: Path, receiver: Receiver) -> None:
    receiver.mode = "fail"
    queue = tmp_path / "queue" / "hook"
    server = start_registry(tmp_path, [endpoint("hook", receiver, backoff="1h", threshold=1)])
    try:
        client = Client(server)
        digests = [client.push_blob("restart/repo", f"kept {i}".encode()) for i in range(3)]
        before = wait_until(
            "3 events on disk", lambda: len(queued_events(queue)) == 3 and queued_events(queue)
        )
        server.stop(signal.SIGKILL)  # no chance to flush anything more: what is on disk counts
        assert queued_events(queue) == before
        receiver.mode = "ok"
        server.start()
        wait_until("3 events delivered", lambda: len(receiver.delivered()) >= 3)
        after = client.push_blob("restart/repo", b"after the restart")
        wait_until("4 events delivered", lambda: len(receiver.delivered()) >= 4)
    finally:
        server.stop()
    delivered = receiver.delivered()
    assert delivered[:3] == before  # same events, same ids, oldest first
    assert [e["target"]["digest"] for e in delivered] == [*digests, after]
    # the new process is another instance of the registry
    assert delivered[3]["source"]["instanceID"] != before[0]["source"]["instanceID"]
    assert len(delivered) == 4


def test_a_full_queue_drops_new_events_and_says_so(tmp_path: Path, receiver: Receiver) -> None:
    receiver.mode = "fail"
    queue = tmp_path / "queue" / "hook"
    debug = free_port()
    server = start_registry(
        tmp_path,
        [endpoint("hook", receiver, threshold=1, backoff="1h")],
        max_queue=3,
        debug_port=debug,
    )
    try:
        client = Client(server)
        for i in range(5):
            client.push_blob("full/repo", f"event {i}".encode())  # every push succeeds
        # Drops are counted when an event is refused, queued events once written: wait for both
        # (an event accepted before a drop can reach the disk after it).
        samples = wait_until(
            "2 events dropped and 3 queued",
            lambda: (
                (s := scrape(debug))
                and sample(s, "registry_notifications_dropped_total", endpoint="hook") == 2
                and sample(s, "registry_notifications_events_total", endpoint="hook") == 3
                and s
            ),
        )
        assert sample(samples, "registry_notifications_pending", endpoint="hook") == 3
        assert len(queued_events(queue)) == 3
    finally:
        server.stop()
    assert server.log_path is not None
    log = server.log_path.read_text()
    assert "endpoint hook: queue full (3 events, notifications.dockyard.maxqueue)" in log
    assert log.count("queue full") == 1  # said once, not per event


def test_a_hanging_endpoint_never_holds_up_a_push(tmp_path: Path, receiver: Receiver) -> None:
    receiver.mode = "hang"
    server = start_registry(tmp_path, [endpoint("slow", receiver, timeout="60s")])
    try:
        client = Client(server)
        first = client.push_blob("slow/repo", b"first")
        wait_until("the endpoint to hold the first delivery", receiver.holding.is_set)
        manifest, _config, _layer = client.push_image("slow/repo", "v1", b"layer")
        assert client.request("GET", "/v2/slow/repo/manifests/v1").status == 200
        assert receiver.attempts == []  # the first POST is still held meanwhile
        receiver.release.set()
        wait_until("5 events delivered", lambda: len(receiver.delivered()) >= 5)
    finally:
        server.stop()
    delivered = receiver.delivered()
    assert delivered[0]["target"]["digest"] == first
    assert [e["action"] for e in delivered] == ["push", "push", "push", "push", "pull"]
    assert delivered[3]["target"]["digest"] == sha256(manifest)


def test_delivery_to_a_tls_endpoint_with_a_ca_file(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    fleet_pki.ensure_server_cert(pki, "server", ["localhost"], ["127.0.0.1"])
    receiver = Receiver().start()
    assert receiver.server is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
    receiver.server.socket = context.wrap_socket(receiver.server.socket, server_side=True)
    url = receiver.url.replace("http://", "https://")
    server = start_registry(
        tmp_path,
        [{"name": "tls", "url": url, "timeout": "5s"}],
        extra={
            "notifications.dockyard": {
                "queuedirectory": str(tmp_path / "queue"),
                "cafile": str(pki / "ca.crt"),
            }
        },
    )
    try:
        digest = Client(server).push_blob("tls/repo", b"over tls")
        wait_until("the event over TLS", receiver.delivered)
    finally:
        server.stop()
        receiver.stop()
    assert [e["target"]["digest"] for e in receiver.delivered()] == [digest]


# ---- configuration -----------------------------------------------------------------------------

BASE = "version: 0.1\nstorage: {filesystem: {rootdirectory: /srv/r}}\n"


ONE = "{endpoints: [{name: a, url: 'http://h/e', %s}]}"


@pytest.mark.parametrize(
    ("notifications", "message"),
    [
        ("{endpoints: {name: a}}", "notifications.endpoints: {'name': 'a'} must be a list"),
        ("{endpoints: [{url: 'http://h/e'}]}", "endpoints[0].name: None is not valid"),
        ("{endpoints: [{name: 'a b', url: 'http://h/e'}]}", "name: 'a b' is not valid; valid: 1"),
        (
            "{endpoints: [{name: a, url: 'ftp://h/e'}]}",
            "url: 'ftp://h/e' is not valid; valid: an http:// or https:// URL",
        ),
        ("{endpoints: [{name: a, url: 'http://h:99999/e'}]}", "has an invalid port"),
        (ONE % "timeout: fast", "notifications.endpoints[0].timeout: 'fast' is not a duration"),
        (ONE % "threshold: -1", "threshold: -1 must be a whole number of at least 0"),
        (ONE % "backoff: 1y", "backoff: '1y' is not a duration"),
        (ONE % "headers: {X-A: 1}", "headers.X-A: 1 must be a list of strings"),
        (
            ONE % "ignore: {actions: [push, pul]}",
            "ignore.actions: 'pul' is not valid; valid: push, pull, delete, mount",
        ),
        (
            ONE % "ignore: {kinds: [x]}",
            "ignore: {'kinds': ['x']} is not valid; valid: mediatypes, actions",
        ),
        (ONE % "disabled: maybe", "disabled: 'maybe' is not a boolean"),
        (
            "{endpoints: [{name: a, url: 'http://h/e'}, {name: a, url: 'http://h/f'}]}",
            "the name 'a' is used twice",
        ),
        ("{dockyard: {maxqueue: 0}}", "dockyard.maxqueue: 0 must be a whole number of at least 1"),
        (
            "{dockyard: {queuedirectory: queue}}",
            "notifications.dockyard.queuedirectory: 'queue' must be an absolute path",
        ),
    ],
)
def test_invalid_notifications_are_named(notifications: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(text=BASE + f"notifications: {notifications}\n", environ={})
    assert message in str(caught.value)


def test_endpoint_defaults_are_distributions() -> None:
    warnings: list[str] = []
    config = load_config(
        text=BASE + "notifications:\n  endpoints:\n    - {name: a, url: 'https://h/e', timeout: 0, "
        "ignoredmediatypes: [x/y], ignore: {mediatypes: [z/w]}, color: red}\n",
        environ={},
        warn=warnings.append,
    )
    (e,) = config.notifications.endpoints
    assert (e.timeout, e.threshold, e.backoff, e.disabled) == (1.0, 10, 1.0, False)
    assert e.ignored_mediatypes == ["x/y", "z/w"]
    assert config.notifications.queue_directory == "/var/lib/dockyard/notifications"
    assert config.notifications.max_queue == 10_000
    assert warnings == ["unknown configuration key notifications.endpoints[0].color (ignored)"]


def test_a_full_queue_says_so_once_when_accepted_events_reach_the_disk_late(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Events accepted before a drop are written after it (the writer lags): writing them does
    not end the episode, the queue is still full, so the next drop says nothing new."""
    from dockyard.registry.config import NotificationEndpoint
    from dockyard.registry.notifications import EndpointQueue

    queue = EndpointQueue(
        NotificationEndpoint("hook", "https://127.0.0.1:9/"), str(tmp_path), 3, None
    )
    events = [{"id": str(i), "action": "push", "target": {"mediaType": "x"}} for i in range(5)]
    with caplog.at_level("WARNING"):
        for event in events[:4]:  # no writer yet: 3 held in memory, the 4th refused
            queue.offer(event)
        queue.start(deliver=False)
        try:
            wait_until("3 events written", lambda: queue.stats.queued == 3)
            queue.offer(events[4])  # the queue (on disk now) is still full
            wait_until("2 events dropped", lambda: queue.stats.dropped == 2)
        finally:
            queue.stop(5)
    assert queue.depth() == 3
    said = [r.getMessage() for r in caplog.records if "queue full" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith("notifications: endpoint hook: queue full (3 events")
