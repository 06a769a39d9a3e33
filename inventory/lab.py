"""pyinfra inventory of the running local lab (`dockyard lab up`): ssh hosts with the lab key and
known_hosts, grouped by role. The last host gets a btrfs data root on a loop file, so the lab
covers both overlay2 on ext4 and btrfs."""

from dockyard.lab.inventory import lab_groups

globals().update(lab_groups())
