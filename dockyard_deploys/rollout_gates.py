"""The health gates `dockyard rollout` runs after each wave, as a pyinfra deploy over the
inventory's own connectors (`pyinfra INVENTORY dockyard_deploys.rollout_gates.check_rollout_gates
'[[], {…}]' --limit …`). Each gate is one operation named `dockyard gate <gate>: …` that runs
with `_ignore_errors`, so every gate of a host runs and pyinfra's `--json` results say, per
operation, which hosts failed it (the reason is on stderr, prefixed `dockyard gate <gate>:`).

- `engine` (Docker hosts): docker.service active (where systemd runs), and `docker info` reports
  the storage driver daemon.json sets (else `docker_storage_driver`; unchecked when neither
  names one) and the configured data root (`docker_storage_data_root`, symlinks resolved).
- `registry` (registry hosts): `GET https://<host>:<registry_port>/v2/` verified with the fleet
  CA read from the control machine's `registry_pki_dir` answers 200 or 401, and
  `/debug/health` answers 200 (the bundled registry serves it on the registry port; a registry
  image — CNCF distribution — serves it only on its debug address, which dockyard does not
  configure, and answers every request with 503 when its storage check fails, so `/v2/`
  stands for it). With `registry_client_certs` the check presents the readiness probe's client
  certificate. The canary push (below) belongs to this gate too.
- `pull` (Docker hosts, once the registry is deployed): `docker pull <endpoint>/<canary>`
  through certs.d (the CA file present, the engine not treating the endpoint as insecure), with
  `docker login` first when the registry host has `registry_users` (its first user); a
  throwaway DOCKER_CONFIG keeps no credentials and an image that was not there before is removed.
- `mounts` (hosts with `nfs_client_mounts`): every mount point is a mounted nfs/nfs4
  filesystem where the kernel has an NFS client, else its fstab line is present.
- `release` (Docker hosts with `docker_release_images`, which a staging rollout sets with
  `--data`): the engine has every listed image by its digest (`RepoDigests`).

The canary image is tiny, built and pushed by the core's Python on the registry host with the
standard library alone (one gzip layer holding one file, fixed timestamps: the same digests every
time, so a second push uploads nothing)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, cast

from pyinfra import host
from pyinfra.api import HiddenValue, StringCommand, deploy
from pyinfra.operations import server

from dockyard_deploys import registry_trust, settings
from dockyard_deploys.facts import JsonFile
from dockyard_deploys.receiver import release
from dockyard_deploys.settings import NfsMount

GATES: tuple[str, ...] = ("engine", "registry", "pull", "mounts", "release")
# Every gate operation's name starts with this, then the gate and a colon.
OP_PREFIX = "dockyard gate"
# The canary image the pull gate pulls (pushed to the fleet registry by the rollout).
CANARY_REPOSITORY = "dockyard/rollout-canary"
CANARY_TAG = "1"
# The pyinfra "operation" that runs the gates (a module attribute pyinfra's CLI imports).
GATES_FUNCTION = "dockyard_deploys.rollout_gates.check_rollout_gates"


def op_name(gate: str, text: str) -> str:
    return f"{OP_PREFIX} {gate}: {text}"


def gate_of(name: str) -> Optional[str]:
    """The gate of an operation name (pyinfra may prefix it with the deploy's name)."""
    marker = f"{OP_PREFIX} "
    if marker not in name:
        return None
    gate = name.split(marker, 1)[1].split(":", 1)[0]
    return gate if gate in GATES else None


def _fail(gate: str, message: str) -> str:
    """Shell: the gate's reason on stderr (a double-quoted message may use $vars), exit 1."""
    return f'{{ echo "{OP_PREFIX} {gate}: {message}" >&2; exit 1; }}'


def engine_command(driver: Optional[str], data_root: str) -> str:
    """The engine gate: active, and `docker info` reports `driver` (if any) and `data_root`."""
    root = shlex.quote(data_root)
    lines = [
        "if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then",
        "  state=$(systemctl is-active docker.service 2>/dev/null)",
        '  [ "$state" = active ] || ' + _fail("engine", "docker.service is ${state:-unknown}"),
        "fi",
        "info=$(docker info --format '{{.Driver}}|{{.DockerRootDir}}' 2>/dev/null) || "
        + _fail("engine", "docker info failed: $(docker info 2>&1 >/dev/null | tail -n 2)"),
        f"root=$(readlink -f {root} 2>/dev/null || echo {root})",
        f"want={shlex.quote(driver or '')}",
        "got_driver=${info%%|*}; got_root=${info#*|}",
        '[ -z "$want" ] || [ "$got_driver" = "$want" ] || '
        + _fail("engine", "storage driver is $got_driver, daemon.json sets $want"),
        '[ "$got_root" = "$root" ] || '
        + _fail("engine", "data root is $got_root, configured $root"),
        'echo "engine active: storage driver $got_driver, data root $got_root"',
    ]
    return "\n".join(lines)


def mounts_command(
    mounts: Sequence[NfsMount],
    filesystems: str = "/proc/filesystems",
    mounted: str = "/proc/self/mounts",
    fstab: str = "/etc/fstab",
    modprobe: str = "modprobe",
) -> str:
    """The mounts gate: each mount point a mounted NFS filesystem where the kernel has an NFS
    client (built in or a module, as the deploy's mount_now decides), else its fstab line (the
    file paths are parameters for tests)."""
    lines = [
        "client=no",
        f"grep -qwE 'nfs|nfs4' {shlex.quote(filesystems)} && client=yes",
        f"[ $client = yes ] || {{ {modprobe} -n -q nfs 2>/dev/null && client=yes; }}",
        "bad=0",
    ]
    for mount in mounts:
        path, src, fstype = (shlex.quote(v) for v in (mount.path, mount.src, mount.fstype))
        lines += [
            "if [ $client = yes ]; then",
            f'  awk -v p={path} \'$2 == p && ($3 == "nfs" || $3 == "nfs4") {{f = 1}} '
            f"END {{exit !f}}' {shlex.quote(mounted)} || {{ echo "
            + shlex.quote(f"{OP_PREFIX} mounts: {mount.path} is not a mounted NFS filesystem")
            + " >&2; bad=1; }",
            "else",
            f"  awk -v s={src} -v p={path} -v t={fstype} '$1 == s && $2 == p && $3 == t "
            f"{{f = 1}} END {{exit !f}}' {shlex.quote(fstab)} || {{ echo "
            + shlex.quote(
                f"{OP_PREFIX} mounts: /etc/fstab has no line for {mount.src} on {mount.path} "
                f"({mount.fstype}) and the kernel has no NFS client"
            )
            + " >&2; bad=1; }",
            "fi",
        ]
    lines += [
        "[ $bad = 0 ] || exit 1",
        'if [ $client = yes ]; then echo "NFS mounts mounted"; '
        'else echo "NFS mounts in /etc/fstab (no NFS client in the kernel)"; fi',
    ]
    return "\n".join(lines)


def release_command(images: Sequence[str]) -> str:
    """The release gate: the engine has each image by its digest (in its RepoDigests)."""
    lines = ["bad=0"]
    digests = shlex.quote("{{range .RepoDigests}}{{println .}}{{end}}")
    for image in images:
        ref = shlex.quote(image)
        lines.append(
            f"docker image inspect --format {digests} {ref} 2>/dev/null | grep -Fxq {ref} || "
            + "{ echo "
            + shlex.quote(f"{OP_PREFIX} release: {image} is not on this host")
            + " >&2; bad=1; }"
        )
    lines += [
        "[ $bad = 0 ] || exit 1",
        f"echo {shlex.quote('release images present: ' + ', '.join(images))}",
    ]
    return "\n".join(lines)


# Run by the core's Python on the registry host: GET /v2/ (and /debug/health) with the fleet CA.
REGISTRY_SCRIPT = """\
import ssl, sys, urllib.error, urllib.request
base, ca, cert, key, health = sys.argv[1:6]
def fail(message, *values):
    sys.exit("dockyard gate registry: " + message % values)
try:
    ctx = ssl.create_default_context(cadata=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
except (ssl.SSLError, OSError, ValueError) as exc:
    fail("the fleet CA or the client certificate cannot be used: %s", exc)
def get(path):
    try:
        with urllib.request.urlopen(base + path, context=ctx, timeout=15) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError) as exc:
        fail("GET %s%s: %s", base, path, getattr(exc, "reason", exc))
status = get("/v2/")
if status not in (200, 401):
    fail("GET %s/v2/ answered %d (200 or 401 expected)", base, status)
line = "%s/v2/ answered %d over TLS verified with the fleet CA" % (base, status)
if health == "1":
    status = get("/debug/health")
    if status != 200:
        fail("GET %s/debug/health answered %d (200 expected)", base, status)
    line += ", /debug/health 200"
print(line)
"""

# Run by the core's Python on the registry host: build the canary (deterministic) and push it;
# the password, if any, comes on stdin.
PUSH_SCRIPT = """\
import base64, gzip, hashlib, io, json, platform, ssl, sys, tarfile
import urllib.error, urllib.parse, urllib.request
base, repo, tag, ca, cert, key, user = sys.argv[1:8]
password = sys.stdin.read() if user else ""
try:
    ctx = ssl.create_default_context(cadata=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
except (ssl.SSLError, OSError, ValueError) as exc:
    sys.exit("dockyard gate registry: pushing the canary: the fleet CA or the client "
             "certificate cannot be used: %s" % exc)
auth = {}
if user:
    token = base64.b64encode(("%s:%s" % (user, password)).encode()).decode()
    auth["Authorization"] = "Basic " + token
def call(method, url, data=None, kind=None):
    headers = dict(auth)
    if kind:
        headers["Content-Type"] = kind
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=30) as answer:
            return answer.status, answer.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers
    except (urllib.error.URLError, OSError) as exc:
        sys.exit("dockyard gate registry: pushing the canary: %s %s: %s"
                 % (method, url, getattr(exc, "reason", exc)))
def refused(what, status):
    hint = " (registry_users refused?)" if status == 401 else ""
    sys.exit("dockyard gate registry: pushing the canary: %s answered %d%s" % (what, status, hint))
def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()
content = b"dockyard rollout canary\\n"
tar_bytes = io.BytesIO()
with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.USTAR_FORMAT) as tar:
    member = tarfile.TarInfo("dockyard-canary")
    member.size, member.mode, member.mtime = len(content), 0o644, 0
    tar.addfile(member, io.BytesIO(content))
raw = tar_bytes.getvalue()
gz = io.BytesIO()
with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0) as stream:
    stream.write(raw)
layer = gz.getvalue()
machine = platform.machine()
arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)
config = json.dumps({"architecture": arch, "os": "linux", "config": {},
                     "rootfs": {"type": "layers", "diff_ids": [sha(raw)]}},
                    sort_keys=True, separators=(",", ":")).encode()
repo_url = "%s/v2/%s" % (base, repo)
for blob in (layer, config):
    digest = sha(blob)
    status, _ = call("HEAD", "%s/blobs/%s" % (repo_url, digest))
    if status == 200:
        continue
    status, headers = call("POST", repo_url + "/blobs/uploads/", b"")
    if status != 202:
        refused("POST %s/blobs/uploads/" % repo_url, status)
    location = urllib.parse.urljoin(base + "/", headers["Location"])
    url = location + ("&" if "?" in location else "?") + "digest=" + digest
    status, _ = call("PUT", url, blob, "application/octet-stream")
    if status != 201:
        refused("PUT of blob " + digest, status)
manifest_type = "application/vnd.docker.distribution.manifest.v2+json"
manifest = json.dumps({
    "schemaVersion": 2, "mediaType": manifest_type,
    "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
               "size": len(config), "digest": sha(config)},
    "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "size": len(layer), "digest": sha(layer)}],
}, sort_keys=True).encode()
status, _ = call("PUT", "%s/manifests/%s" % (repo_url, tag), manifest, manifest_type)
if status != 201:
    refused("PUT of manifest %s:%s" % (repo, tag), status)
print("pushed the canary %s:%s (%s)" % (repo, tag, sha(manifest)))
"""


def _python(venv_bin: str) -> str:
    """Shell: $py, the core's Python on the host (the deploy installs it), else python3."""
    py = shlex.quote(f"{venv_bin}/python3")
    return f'py={py}; [ -x "$py" ] || py=python3'


def registry_command(
    venv_bin: str, base: str, ca_pem: str, client: Optional[tuple[str, str]], health: bool
) -> str:
    args = [base, ca_pem, *(client or ("", "")), "1" if health else "0"]
    return "\n".join(
        [
            _python(venv_bin),
            '"$py" -c ' + shlex.quote(REGISTRY_SCRIPT) + " " + shlex.join(args),
        ]
    )


def _password_to(command: str, password: Optional[str]) -> list[Any]:
    """StringCommand bits: `printf` (a shell builtin: no process shows the password) piped into
    `command`, the password masked in pyinfra's output."""
    if password is None:
        return [command + " </dev/null"]
    return ["printf '%s'", HiddenValue(shlex.quote(password)), "|", command]


def push_command(
    venv_bin: str,
    base: str,
    ca_pem: str,
    client: Optional[tuple[str, str]],
    login: Optional[tuple[str, str]],
    repository: str = CANARY_REPOSITORY,
    tag: str = CANARY_TAG,
) -> StringCommand:
    user, password = login if login else ("", None)
    args = [base, repository, tag, ca_pem, *(client or ("", "")), user]
    run = '"$py" -c ' + shlex.quote(PUSH_SCRIPT) + " " + shlex.join(args)
    return StringCommand(_python(venv_bin) + "\n", *_password_to(run, password))


def pull_command(
    endpoint: str,
    reference: str,
    certs_d: bool,
    login: Optional[tuple[str, str]],
) -> StringCommand:
    """The pull gate: through certs.d (when that is the trust mode), logged in with a throwaway
    DOCKER_CONFIG; an image that was not there before is removed again."""
    ref, where = shlex.quote(reference), shlex.quote(endpoint)
    lines = [
        'd=$(mktemp -d) || exit 1; trap \'rm -rf "$d"\' EXIT; export DOCKER_CONFIG="$d"',
        f"ref={ref}",
    ]
    if certs_d:
        ca = shlex.quote(f"/etc/docker/certs.d/{endpoint}/ca.crt")
        index = shlex.quote(
            "{{with index .RegistryConfig.IndexConfigs " + f'"{endpoint}"' + "}}{{.Secure}}{{end}}"
        )
        lines += [
            f"[ -f {ca} ] || " + _fail("pull", f"{ca} is missing: the engine cannot verify it"),
            f'[ "$(docker info --format {index} 2>/dev/null)" != false ] || '
            + _fail("pull", f"the engine still treats {endpoint} as an insecure registry"),
        ]
    bits: list[Any] = ["\n".join(lines) + "\n"]
    if login:
        user = shlex.quote(login[0])
        bits += _password_to(
            f'docker login --username {user} --password-stdin {where} >/dev/null 2>"$d/err"',
            login[1],
        )
        bits.append(
            "|| "
            + _fail("pull", f'docker login {endpoint} as {login[0]} failed: $(tail -n 2 "$d/err")')
            + "\n"
        )
    bits.append(
        "\n".join(
            [
                'had=no; docker image inspect "$ref" >/dev/null 2>&1 && had=yes',
                'docker pull -q "$ref" >/dev/null 2>"$d/err" || '
                + _fail("pull", 'docker pull $ref failed: $(tail -n 2 "$d/err")'),
                '[ $had = yes ] || docker image rm "$ref" >/dev/null 2>&1 || true',
                'echo "pulled $ref"',
            ]
        )
    )
    return StringCommand(*bits)


def _ca_pem() -> str:
    path = Path(settings.pki().pki_dir).expanduser() / "ca.crt"
    try:
        return path.read_text()
    except OSError as exc:
        raise settings.SettingsError(
            f"registry_pki_dir: the fleet CA {path} cannot be read on this machine ({exc}); the "
            "registry gate verifies the registry with it"
        ) from exc


def _login(registry: Any) -> Optional[tuple[str, str]]:
    users = settings.registry(registry).users
    if not users:
        return None
    user = sorted(users)[0]
    return user, users[user]


def _client(registry: Any) -> Optional[tuple[str, str]]:
    reg = settings.registry(registry)
    if not reg.client_certs:
        return None
    return f"{reg.config_dir}/probe.crt", f"{reg.config_dir}/probe.key"


def _address(target: Any) -> str:
    address = str(target.data.get("ssh_hostname") or target.name)
    return f"[{address}]" if ":" in address else address


def canary_reference(endpoint: str) -> str:
    return f"{endpoint}/{CANARY_REPOSITORY}:{CANARY_TAG}"


@deploy("Check the rollout's health gates")
def check_rollout_gates(
    gate_hosts: Sequence[str] = (),
    pull_hosts: Sequence[str] = (),
    push_canary: bool = False,
) -> None:
    """
    Check the health gates of this host (each one operation that fails alone).

    + gate_hosts: hosts whose engine, registry and mounts gates run (the wave)
    + pull_hosts: hosts whose pull gate runs (Docker hosts, once the registry is deployed)
    + push_canary: push the canary image from the fleet's registry host first

    Example:

    .. code:: bash

        pyinfra inventory.py dockyard_deploys.rollout_gates.check_rollout_gates \\
            '[[], {"gate_hosts": ["docker-01"], "pull_hosts": ["docker-01"]}]' --limit docker-01
    """
    gated = host.name in gate_hosts
    venv_bin = settings.core().venv_bin
    if gated and "docker_hosts" in host.groups:
        daemon_json = host.get_fact(JsonFile, path=settings.daemon().config_path)
        content = daemon_json.get("content") or {}
        driver = content.get("storage-driver") or settings.storage().driver
        server.shell(
            name=op_name("engine", "the engine is active with its storage driver and data root"),
            commands=[engine_command(driver, settings.storage().data_root)],
            _ignore_errors=True,
        )
    images = release().images
    if gated and images and "docker_hosts" in host.groups:
        server.shell(
            name=op_name("release", "the release images are on the host by their digest"),
            commands=[release_command(images)],
            _ignore_errors=True,
        )
    mounts = settings.nfs_client().mounts
    if gated and mounts:
        server.shell(
            name=op_name("mounts", "the NFS mounts are present"),
            commands=[mounts_command(mounts)],
            _ignore_errors=True,
        )
    if gated and "registry" in host.groups:
        reg = settings.registry()
        server.shell(
            name=op_name("registry", "the registry answers /v2/ over TLS with the fleet CA"),
            commands=[
                registry_command(
                    venv_bin,
                    f"https://{_address(host)}:{reg.port}",
                    _ca_pem(),
                    _client(host),
                    health=reg.image == "dockyard",
                )
            ],
            _ignore_errors=True,
        )
    registry = registry_trust.registry_host()
    endpoint = registry_trust.registry_endpoint()
    if registry is None or endpoint is None:
        return
    if push_canary and host.name == registry.name:
        server.shell(
            name=op_name("registry", "push the canary image to the fleet registry"),
            commands=cast(
                Any,
                [
                    push_command(
                        venv_bin, f"https://{endpoint}", _ca_pem(), _client(host), _login(host)
                    )
                ],
            ),
            _ignore_errors=True,
        )
    if host.name in pull_hosts and "docker_hosts" in host.groups:
        server.shell(
            name=op_name("pull", "the canary image pulls from the fleet registry"),
            commands=cast(
                Any,
                [
                    pull_command(
                        endpoint,
                        canary_reference(endpoint),
                        settings.trust().mode == "certs.d",
                        _login(registry),
                    )
                ],
            ),
            _ignore_errors=True,
        )
