"""The `dockyard` command line: `dockyard lab up|down|status` for the local lab fleet (more
subcommands — registry, image, container — join as the core grows)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from dockyard import __version__, defaults
from dockyard.lab import down, status, up
from dockyard.lab.docker import DockerError


def _releases(value: str) -> list[str]:
    releases = [r.strip() for r in value.split(",") if r.strip()]
    bad = [r for r in releases if r not in defaults.LAB_RELEASES]
    if bad or not releases:
        raise argparse.ArgumentTypeError(
            f"unknown release(s) {', '.join(bad) or '(none)'}; "
            f"valid: {', '.join(defaults.LAB_RELEASES)}"
        )
    return releases


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dockyard", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dockyard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    lab = sub.add_parser("lab", help="the local lab fleet of systemd host containers")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    lab_up = lab_sub.add_parser("up", help="build cached images and start the lab hosts")
    lab_up.add_argument(
        "--hosts",
        type=_positive,
        default=len(defaults.LAB_RELEASES),
        help="number of hosts (default: %(default)s, one per release)",
    )
    lab_up.add_argument(
        "--releases",
        type=_releases,
        default=list(defaults.LAB_RELEASES),
        help="comma-separated Debian suites to cycle through (default: %(default)s)",
    )
    lab_sub.add_parser("down", help="remove the lab hosts, their volumes and network")
    lab_status = lab_sub.add_parser("status", help="list the lab hosts")
    lab_status.add_argument("--json", action="store_true", help="machine-readable output")

    registry = sub.add_parser("registry", help="the OCI Distribution registry")
    reg_sub = registry.add_subparsers(dest="registry_command", required=True)
    reg_serve = reg_sub.add_parser("serve", help="serve a registry from a distribution config.yml")
    reg_serve.add_argument("--config", required=True, help="path of config.yml")
    reg_serve.add_argument("config_positional", nargs="?", help=argparse.SUPPRESS)
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
        help="seconds an unreferenced blob is kept after it was written (default: 3600)",
    )
    return parser


def _lab(args: argparse.Namespace) -> int:
    if args.lab_command == "up":
        hosts = up(hosts=args.hosts, releases=args.releases)
        print(f"--> Lab up: {len(hosts)} host(s); inventory: inventory/lab.py")
        return 0
    if args.lab_command == "down":
        down()
        print("--> Lab down (images kept in the cache)")
        return 0
    hosts = status()
    if args.json:
        print(json.dumps([h.to_json() for h in hosts], indent=2))
        return 0
    if not hosts:
        print("no lab hosts (run `dockyard lab up`)")
        return 0
    for h in hosts:
        print(f"{h.name:28} {h.state:9} {h.address:15} {h.release:9} {','.join(h.groups)}")
    return 0


def _registry(args: argparse.Namespace) -> int:
    from dockyard.registry.config import load_config

    def warn(message: str) -> None:
        print(f"dockyard: warning: {message}", file=sys.stderr)

    if args.registry_command == "serve":
        from dockyard.registry.server import serve

        serve(load_config(args.config, warn=warn))
        return 0
    from dockyard.registry import gc
    from dockyard.registry.driver import FilesystemDriver
    from dockyard.registry.store import Registry

    config = load_config(args.config, warn=warn)
    grace = gc.DEFAULT_GRACE_SECONDS if args.grace is None else args.grace
    if grace < 0:
        raise ValueError(f"--grace {grace} must not be negative")
    registry = Registry(FilesystemDriver(config.rootdirectory), delete_enabled=True)
    gc.collect(
        registry, dry_run=args.dry_run, delete_untagged=args.delete_untagged, grace_seconds=grace
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "lab":
            return _lab(args)
        if args.command == "registry":
            return _registry(args)
    except (DockerError, ValueError, OSError) as exc:
        print(f"dockyard: error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
