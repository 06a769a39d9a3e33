"""Deploy benchmark: first and second `pyinfra inventory/lab.py deploy.py` on fresh container-only
labs of 1 and 3 hosts, timed end to end as users run it, printed with operations, changes and the
ratios (second/first, 3 hosts/1 host). Uses its own lab (DOCKYARD_LAB_NAME=dockyard-bench)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {**os.environ, "DOCKYARD_LAB_NAME": "dockyard-bench"}
# Bound on one pyinfra run; a first deploy installs the engine from Debian on every host.
TIMEOUT = 1200


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def _deploy() -> tuple[float, dict[str, Any]]:
    start = time.monotonic()
    proc = _run(str(BIN / "pyinfra"), "--json", "inventory/lab.py", "deploy.py", "-y")
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"deploy failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed, json.loads(proc.stdout)["results"]["totals"]


def _lab(*args: str) -> None:
    proc = _run(str(BIN / "dockyard-lab"), *args)
    if proc.returncode != 0:
        sys.exit(f"dockyard-lab {' '.join(args)} failed:\n{proc.stderr}")


def main() -> int:
    rows = []
    try:
        for hosts in (1, 3):
            _lab("down")
            # containers only: the seed topology's emulated VMs would measure qemu, not pyinfra
            _lab("up", "--topology", "containers", "--hosts", str(hosts))
            first, first_totals = _deploy()
            second, second_totals = _deploy()
            rows.append((hosts, first, first_totals, second, second_totals))
    finally:
        _lab("down")
    print(
        f"{'hosts':>5} {'run':>6} {'seconds':>8} {'ops':>5} {'changed':>8} {'no change':>10}"
        f" {'second/first':>13}"
    )
    for hosts, first, ft, second, st in rows:
        print(
            f"{hosts:>5} {'first':>6} {first:8.1f} {ft['hosts']:5} {ft['success']:8} "
            f"{ft['no_change']:10}"
        )
        print(
            f"{hosts:>5} {'second':>6} {second:8.1f} {st['hosts']:5} {st['success']:8} "
            f"{st['no_change']:10} {second / first:13.3f}"
        )
    (h1, f1, _, s1, _), (h3, f3, _, s3, _) = rows
    print(f"scaling {h3} hosts / {h1} host: first {f3 / f1:.2f}x, second {s3 / s1:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
