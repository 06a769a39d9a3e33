"""The `dockyard` command line that hosts get: `dockyard registry`, `receive`, `image`, `container`
and `store` (the lab is apart, on the control machine: `dockyard-lab`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dockyard import __version__

if TYPE_CHECKING:
    from dockyard.layers.store import ImageStore


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dockyard", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dockyard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    # The lab moved out of the core (hosts install the core alone): say where it went.
    lab = sub.add_parser("lab", help="moved: the lab is `dockyard-lab` on the control machine")
    lab.add_argument("lab_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    # Rollouts drive pyinfra from the control machine: on a host, say where they run.
    rollout = sub.add_parser(
        "rollout",
        help="roll a deploy out in waves with health gates (control machine: "
        "pip install 'dockyard[deploy]')",
    )
    rollout.add_argument("rollout_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    registry = sub.add_parser("registry", help="the OCI Distribution registry")
    reg_sub = registry.add_subparsers(dest="registry_command", required=True)
    reg_serve = reg_sub.add_parser("serve", help="serve a registry from a distribution config.yml")
    reg_serve.add_argument("--config", required=True, help="path of config.yml")
    reg_serve.add_argument("config_positional", nargs="?", help=argparse.SUPPRESS)
    reg_serve.add_argument(
        "--workers",
        type=int,
        default=None,
        help="serving processes sharing the port (default: one per CPU, at most 4)",
    )
    reg_wait = reg_sub.add_parser(
        "wait", help="wait until a registry answers /v2/ (exit 1 with the reason if it does not)"
    )
    reg_wait.add_argument("url", help="http(s)://HOST:PORT of the registry")
    reg_wait.add_argument("--ca-file", help="CA certificate to verify the registry's TLS with")
    reg_wait.add_argument(
        "--server-name", help="name to check the certificate against (default: the URL's host)"
    )
    reg_wait.add_argument("--cert", help="client certificate for a registry that asks for one")
    reg_wait.add_argument("--key", help="key of --cert")
    reg_wait.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait (default: %(default)s)"
    )
    reg_gc = reg_sub.add_parser(
        "garbage-collect", help="delete blobs no manifest references (safe while serving)"
    )
    reg_gc.add_argument("config", help="path of config.yml")
    reg_gc.add_argument("--dry-run", "-d", action="store_true", help="only list what would go")
    reg_gc.add_argument(
        "--delete-untagged", "-m", action="store_true", help="also delete untagged manifests"
    )
    reg_gc.add_argument(
        "--grace",
        type=float,
        default=None,
        help="seconds an unreferenced blob or untagged manifest is kept after it was written"
        " (default: 3600)",
    )
    receive = sub.add_parser(
        "receive",
        help="receive the registry's events over TLS and run a command (a rollout) for pushes",
    )
    receive.add_argument("--config", required=True, help="the receiver's config (JSON or YAML)")
    receive.add_argument(
        "--check",
        action="store_true",
        help="only check the config, the token file and the TLS files, then exit",
    )
    _layer_commands(sub)
    return parser


def _layer_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", help="store root (default: $DOCKYARD_ROOT or /var/lib/dockyard)")
    common.add_argument(
        "--driver",
        choices=["overlay", "vfs"],
        help="graph driver (default: overlay where the kernel has it and we are root, else vfs)",
    )
    from dockyard.layers.store import REMOVAL_WAIT

    removal = argparse.ArgumentParser(add_help=False)
    removal.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to wait for running pulls, imports, creates and commits on the store "
        f"(default: {REMOVAL_WAIT:g})",
    )
    net = argparse.ArgumentParser(add_help=False)
    net.add_argument("--insecure", action="store_true", help="allow plain HTTP off loopback")
    net.add_argument("--ca-file", help="CA certificate (default: certs.d/<host:port>/ca.crt)")
    net.add_argument("--username", help="registry user (default: ~/.docker/config.json)")
    net.add_argument("--password-stdin", action="store_true", help="read the password on stdin")

    image = sub.add_parser("image", help="images in the layer store")
    isub = image.add_subparsers(dest="image_command", required=True)
    p = isub.add_parser("pull", parents=[common, net], help="pull an image from a registry")
    p.add_argument("ref")
    p.add_argument("--platform", default="linux/amd64")
    p = isub.add_parser("push", parents=[common, net], help="push an image to a registry")
    p.add_argument("ref", help="destination host[:port]/repo:tag")
    p.add_argument("--from", dest="source", help="local image to push (default: the ref itself)")
    isub.add_parser("ls", parents=[common], help="list images")
    p = isub.add_parser("history", parents=[common], help="an image's layers, newest first")
    p.add_argument("ref")
    p = isub.add_parser(
        "rm", parents=[common, removal], help="untag/remove an image, free unused layers"
    )
    p.add_argument("ref")
    p = isub.add_parser("export", parents=[common], help="write an image archive")
    p.add_argument("ref")
    p.add_argument("path")
    p.add_argument("--format", choices=["oci", "docker-archive"], default="oci")
    p = isub.add_parser("import", parents=[common], help="read an OCI layout or docker-archive")
    p.add_argument("path")
    p.add_argument("--tag", help="tag for the imported image")

    container = sub.add_parser("container", help="containers: a writable layer over an image")
    csub = container.add_subparsers(dest="container_command", required=True)
    p = csub.add_parser("create", parents=[common], help="create a container from an image")
    p.add_argument("image")
    p.add_argument("name")
    for verb, text in (
        ("mount", "mount the rootfs (prints its path last)"),
        ("umount", "unmount the rootfs"),
        ("rm", "remove the container"),
    ):
        parents = [common, removal] if verb == "rm" else [common]
        p = csub.add_parser(verb, parents=parents, help=text)
        p.add_argument("name")
    p = csub.add_parser("commit", parents=[common], help="the container's changes as a new image")
    p.add_argument("name")
    p.add_argument("ref")
    p.add_argument("-m", "--message", default="")
    p.add_argument("--author", default="")
    csub.add_parser("ls", parents=[common], help="list containers")

    store = sub.add_parser("store", help="the store as a whole")
    ssub = store.add_subparsers(dest="store_command", required=True)
    ssub.add_parser("du", parents=[common], help="disk use, and what is shared")
    ssub.add_parser(
        "fsck", parents=[common], help="re-verify every digest; check other users are kept out"
    )
    ssub.add_parser(
        "prune",
        parents=[common, removal],
        help="remove unused layers and blobs, and temp files killed operations left",
    )


def _store(args: argparse.Namespace, create: bool = False) -> ImageStore:
    """The store at --root; only the commands that add content (`create`) make a new one."""
    from dockyard.layers.store import ImageStore

    store = ImageStore(args.root, args.driver, create=create)
    if getattr(args, "wait", None) is not None:
        if args.wait < 0:
            raise ValueError(f"--wait {args.wait:g} must not be negative")
        store.lock_wait = args.wait

    def waiting(what: str) -> None:
        print(f"dockyard: waiting for {what} on the store at {store.root}", file=sys.stderr)

    store.on_lock_wait = waiting
    if store.tightened and not store.created:
        print(
            f"dockyard: made {len(store.tightened)} directories of the store at {store.root} "
            "private to its owner (0700)",
            file=sys.stderr,
        )
    return store


def _client_factory(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from dockyard.client.registry import RegistryClient

    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None

    def make(host: str) -> RegistryClient:
        return RegistryClient(
            host,
            insecure=args.insecure,
            ca_file=args.ca_file,
            username=args.username,
            password=password,
        )

    return make


def _human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f}{unit}" if unit != "B" else f"{int(size)}B"
        size /= 1000
    return f"{size:.1f}GB"


def _image(args: argparse.Namespace) -> int:
    from dockyard.client import registry as client
    from dockyard.layers import archive

    cmd = args.image_command
    store = _store(args, create=cmd in ("pull", "import"))
    if cmd == "pull":
        # shared for the whole pull: a removal waits rather than free what it downloaded
        with store.sharing():
            image_id = client.pull(store, args.ref, _client_factory(args), platform=args.platform)
        print(f"Pulled {args.ref}\nImage {image_id}")
    elif cmd == "push":
        with store.sharing():
            digest = client.push(store, args.ref, _client_factory(args), source_ref=args.source)
        print(f"Pushed {args.ref}: digest: {digest}")
    elif cmd == "ls":
        print(f"{'REFERENCE':50} {'IMAGE ID':19} {'LAYERS':>6} {'SIZE':>9}")
        for image in store.images():
            size = sum(layer.size for layer in image.layers)
            for tag in image.tags or ["<none>"]:
                print(f"{tag:50} {image.id[7:19]:19} {len(image.layers):>6} {_human(size):>9}")
    elif cmd == "history":
        print(f"{'LAYER':19} {'SIZE':>9}  {'CREATED BY':45} COMMENT")
        for row in store.history(args.ref):
            layer = row["layer"][7:19] if row["layer"].startswith("sha256:") else row["layer"]
            print(
                f"{layer:19} {_human(row['size']):>9}  {row['created_by'][:45]:45} {row['comment']}"
            )
    elif cmd == "rm":
        removed = store.remove_image(args.ref)
        print(f"Untagged {args.ref}")
        for item in removed:
            print(f"Deleted {item}")
    elif cmd == "export":
        with store.sharing():
            archive.export_image(store, args.ref, args.path, args.format)
        print(f"Exported {args.ref} to {args.path} ({args.format})")
    elif cmd == "import":
        with store.sharing():
            image = archive.import_image(store, args.path, args.tag)
        print(f"Imported {image.id}" + (f" as {args.tag}" if args.tag else ""))
    return 0


def _container(args: argparse.Namespace) -> int:
    store = _store(args)
    cmd = args.container_command
    if cmd == "create":
        meta = store.create_container(args.image, args.name)
        print(f"Created {meta['name']} from {meta['ref']} ({meta['driver']})")
    elif cmd == "mount":
        print(store.mount(args.name))
    elif cmd == "umount":
        store.umount(args.name)
        print(f"Unmounted {args.name}")
    elif cmd == "rm":
        store.remove_container(args.name)
        print(f"Removed {args.name}")
    elif cmd == "commit":
        image = store.commit(args.name, args.ref, args.message, args.author)
        print(f"Committed {args.name} as {args.ref}\nImage {image.id}")
    elif cmd == "ls":
        print(f"{'NAME':24} {'IMAGE':50} {'DRIVER':8} CREATED")
        for c in store.containers():
            print(f"{c['name']:24} {c['ref'][:50]:50} {c['driver']:8} {c['created']}")
    return 0


def _store_cmd(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.store_command == "du":
        usage = store.disk_usage()
        print(f"{'LAYER':19} {'IMAGES':>6} {'SIZE':>9}")
        for layer in usage["layers"]:
            print(f"{layer['chain_id'][7:19]:19} {layer['images']:>6} {_human(layer['bytes']):>9}")
        for c in usage["containers"]:
            print(f"container {c['name']}: {_human(c['bytes'])} written")
        for temp in usage["temps"]:
            print(f"temp {temp['path']}: {_human(temp['bytes'])}, {temp['state']}")
        print(
            f"layers: {_human(usage['total_layer_bytes'])}, shared by more than one image: "
            f"{_human(usage['shared_bytes'])}"
            + (f"; temp: {_human(usage['temp_bytes'])}" if usage["temps"] else "")
        )
        return 0
    if args.store_command == "prune":
        removed = store.prune()
        for item in removed:
            print(f"Deleted {item}")
        print(f"prune: {len(removed)} item(s) removed")
        return 0
    report = store.fsck_report()
    for line in report.damage:
        print(f"DAMAGED {line}")
    for line in report.unsafe:
        print(f"UNSAFE {line}")
    for temp in report.temps:
        print(f"TEMP {temp.path} ({_human(temp.bytes)}): {temp.state}")
    from dockyard.client.registry import stale_partials

    for line in stale_partials(store):  # complete or orphaned downloads no pull will resume
        print(f"STALE {line}")
    problems = len(report.damage) + len(report.unsafe)
    if problems:
        print(f"fsck: {problems} problem(s)")
        return 1
    print("fsck: every digest verified; the store is private to its owner")
    return 0


def _registry(args: argparse.Namespace) -> int:
    from dockyard.registry.config import load_config

    def warn(message: str) -> None:
        print(f"dockyard: warning: {message}", file=sys.stderr)

    if args.registry_command == "serve":
        from dockyard.registry.server import check_workers, default_workers, serve

        workers = check_workers(default_workers() if args.workers is None else args.workers)
        return serve(load_config(args.config, warn=warn), workers)
    if args.registry_command == "wait":
        from dockyard.registry.probe import wait_ready

        if bool(args.cert) != bool(args.key):
            raise ValueError("--cert and --key go together")
        client = (args.cert, args.key) if args.cert else None
        answer = wait_ready(args.url, args.timeout, args.ca_file, args.server_name, client)
        if not answer.ready:
            print(
                f"dockyard: error: the registry at {args.url} did not answer /v2/ within "
                f"{args.timeout:g} s (last: {answer.detail})",
                file=sys.stderr,
            )
            return 1
        print(f"registry at {args.url} is ready ({answer.detail})")
        return 0
    from dockyard.registry import gc
    from dockyard.registry.store import build_registry

    config = load_config(args.config, warn=warn)
    grace = gc.DEFAULT_GRACE_SECONDS if args.grace is None else args.grace
    if grace < 0:
        raise ValueError(f"--grace {grace} must not be negative")
    registry = build_registry(config, create=False)
    gc.collect(
        registry, dry_run=args.dry_run, delete_untagged=args.delete_untagged, grace_seconds=grace
    )
    return 0


def _layer_errors() -> tuple[type[Exception], ...]:
    from dockyard.client.registry import ClientError
    from dockyard.layers.store import StoreError
    from dockyard.layers.tarsafe import LayerError

    return (ClientError, StoreError, LayerError)


ROLLOUT_ELSEWHERE = (
    "dockyard: error: rollouts run on the control machine, which has pyinfra and the deploys: "
    "pip install 'dockyard[deploy]' there and run `dockyard rollout INVENTORY DEPLOY`"
)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["rollout"]:
        # before parsing: the rollout's own options (--dry, --waves …) are not known here
        print(ROLLOUT_ELSEWHERE, file=sys.stderr)
        return 2
    args = build_parser().parse_args(arguments)
    try:
        if args.command == "lab":
            print(
                "dockyard: error: the lab is not part of the core; run `dockyard-lab "
                f"{' '.join(args.lab_args) or 'up|down|status'}` on the control machine",
                file=sys.stderr,
            )
            return 2
        if args.command == "registry":
            return _registry(args)
        if args.command == "receive":
            from dockyard import receiver

            try:
                return receiver.main(args.config, check=args.check)
            except receiver.ReceiverConfigError as exc:
                print(f"dockyard receive: error: {exc}", file=sys.stderr)
                return 2
        if args.command == "image":
            return _image(args)
        if args.command == "container":
            return _container(args)
        if args.command == "store":
            return _store_cmd(args)
    except (ValueError, OSError) as exc:
        print(f"dockyard: error: {exc}", file=sys.stderr)
        return 1
    except _layer_errors() as exc:
        print(f"dockyard: error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
