"""The control machine's `dockyard` command: `dockyard rollout` (it needs pyinfra and the
deploys, so it lives here) and every other command handed to the core's CLI, `dockyard.cli`,
which is all that hosts get (their wheel's entry point stays `dockyard.cli:main`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

from dockyard import cli as core_cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["rollout"]:
        try:
            from dockyard_deploys import rollout
        except ImportError as exc:  # dockyard installed without its deploy extras
            print(
                f"dockyard: error: rollouts need pyinfra ({exc}): "
                "pip install 'dockyard[deploy]' on the control machine",
                file=sys.stderr,
            )
            return 2
        return rollout.main(args[1:])
    return core_cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
