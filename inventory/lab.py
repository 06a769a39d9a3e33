"""pyinfra inventory of the running local lab (`dockyard-lab up`): ssh hosts with the lab key and
known_hosts, grouped by role. The last host gets a btrfs data root on a loop file, so the lab
covers both overlay2 on ext4 and btrfs. Works from any working directory: `inventory/group_data`
links to the project's `group_data/` (pyinfra reads `group_data/` beside the inventory file and in
the working directory)."""

import sys
from pathlib import Path

# pyinfra puts only the working directory on sys.path: this checkout's packages come first.
_CHECKOUT = str(Path(__file__).resolve().parent.parent)
if _CHECKOUT not in sys.path:
    sys.path.insert(0, _CHECKOUT)

from dockyard_lab.inventory import lab_groups

globals().update(lab_groups())
