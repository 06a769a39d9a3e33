"""The `dockyard-lab` command line (control machine only): `dockyard-lab up|down|status [--json]`
brings the local lab fleet up and down and lists it — by default the seed's topology (a storage
VM and a registry VM with real kernels beside the systemd host containers), or containers only
(`up --topology containers`); `registry-archive PATH` saves a registry:2-compatible image for
`registry_image_archive`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dockyard import __version__
from dockyard_lab import defaults, down, status, up
from dockyard_lab.docker import DockerError
from dockyard_lab.vm import VmError


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


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 0")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dockyard-lab", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dockyard-lab {__version__}")
    sub = parser.add_subparsers(dest="lab_command", required=True)
    lab_up = sub.add_parser("up", help="build cached images and start the lab hosts")
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
    lab_up.add_argument(
        "--topology",
        choices=defaults.LAB_TOPOLOGIES,
        default=defaults.DEFAULT_TOPOLOGY,
        help=(
            "seed: a storage VM (kernel NFS server) and a registry VM (the export mounted from "
            "fstab) beside the container Docker hosts; containers: containers only, the first "
            "one exporting with nfs-ganesha and running the registry (default: %(default)s)"
        ),
    )
    lab_up.add_argument(
        "--vms",
        type=_count,
        default=0,
        help=(
            f"number of extra qemu VM hosts ({defaults.VM_SUITE}, a real kernel, software "
            "emulation) in the group vms, with no role (default: %(default)s)"
        ),
    )
    sub.add_parser(
        "down", help="remove the lab hosts (VMs: qemu, tap devices, overlays), volumes, network"
    )
    archive = sub.add_parser(
        "registry-archive",
        help="save a registry:2-compatible image (Debian's docker-registry) for registry_image",
    )
    archive.add_argument("path", help="where to write the docker save archive")
    lab_status = sub.add_parser("status", help="list the lab hosts")
    lab_status.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.lab_command == "up":
        hosts = up(hosts=args.hosts, releases=args.releases, vms=args.vms, topology=args.topology)
        print(f"--> Lab up: {len(hosts)} host(s); inventory: inventory/lab.py")
        return 0
    if args.lab_command == "registry-archive":
        from dockyard_lab.images import build_registry_archive

        tag = build_registry_archive(Path(args.path))
        print(
            f"--> {tag} in {args.path}: set registry_image={tag} registry_image_archive={args.path}"
        )
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
        print("no lab hosts (run `dockyard-lab up`)")
        return 0
    for h in hosts:
        print(
            f"{h.name:28} {h.kind:9} {h.state:9} {h.address:15} {h.release:9} {','.join(h.groups)}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (DockerError, VmError, ValueError, OSError) as exc:
        print(f"dockyard-lab: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
