"""The waves of `dockyard rollout`, planned on the control machine from the inventory's groups
alone (no pyinfra here): the `storage` tier, then `registry`, then the `docker_hosts` not already
done in waves sized by `--waves` (by default a canary of one host per release, then 25% of the
rest, then the rest), then every other host; and the per-wave failure budget of `--max-fail`."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# The tiers before the Docker hosts, in order (the registry serves TLS before any host drops
# insecure trust), then the Docker hosts' tier in waves, then every host in none of them.
FIRST_TIERS: tuple[str, ...] = ("storage", "registry")
DOCKER_TIER = "docker_hosts"
OTHERS_TIER = "others"
# --waves when none is given: a canary of one host per release, 25% of the rest, the rest.
DEFAULT_WAVES = "canary,25%,100%"
# --max-fail when none is given: any failed host stops the rollout.
DEFAULT_MAX_FAIL = "0"
# The release of a host that names none (no data key, no fact).
UNKNOWN_RELEASE = "unknown"

_COUNT = re.compile(r"^[0-9]+$")
_PERCENT = re.compile(r"^([0-9]+)%$")
WAVES_VALID = (
    "comma-separated wave sizes: canary (one host per release), a host count (1, 2, …) or a "
    "percentage of the hosts not yet rolled out (1% to 100%), e.g. canary,25%,100%; the last "
    "size repeats until every host is done"
)
MAX_FAIL_VALID = "a host count (0, 1, …) or a percentage of the wave's hosts (0% to 100%)"


class RolloutError(Exception):
    """Bad arguments, inventory or state: the message says what and what is valid (exit 2)."""


@dataclass(frozen=True)
class WaveSize:
    """One item of --waves: `canary`, a host count, or a percentage of the remaining hosts."""

    kind: str  # "canary", "count" or "percent"
    value: int = 0

    def __str__(self) -> str:
        if self.kind == "canary":
            return "canary"
        return f"{self.value}%" if self.kind == "percent" else str(self.value)


def parse_waves(text: str) -> tuple[WaveSize, ...]:
    """--waves as wave sizes; a RolloutError names the bad item and what is valid."""
    items = [item.strip() for item in str(text).split(",")]
    if not text or not text.strip():
        raise RolloutError(f"--waves {text!r} is empty; valid: {WAVES_VALID}")
    sizes = []
    for item in items:
        percent = _PERCENT.match(item)
        if item.lower() == "canary":
            sizes.append(WaveSize("canary"))
        elif _COUNT.match(item) and int(item) >= 1:
            sizes.append(WaveSize("count", int(item)))
        elif percent and 1 <= int(percent.group(1)) <= 100:
            sizes.append(WaveSize("percent", int(percent.group(1))))
        else:
            raise RolloutError(
                f"--waves {text!r}: {item!r} is not a wave size; valid: {WAVES_VALID}"
            )
    return tuple(sizes)


@dataclass(frozen=True)
class Budget:
    """--max-fail: how many hosts of a wave may fail (deploy or gate) before the rollout stops."""

    value: int
    percent: bool = False

    def allowed(self, hosts: int) -> int:
        """Failed hosts a wave of `hosts` hosts may have and still pass (percentages round
        down: 25% of 3 hosts allows none)."""
        return hosts * self.value // 100 if self.percent else self.value

    def __str__(self) -> str:
        return f"{self.value}%" if self.percent else str(self.value)


def parse_max_fail(text: str) -> Budget:
    item = str(text).strip()
    percent = _PERCENT.match(item)
    if _COUNT.match(item):
        return Budget(int(item))
    if percent and int(percent.group(1)) <= 100:
        return Budget(int(percent.group(1)), percent=True)
    raise RolloutError(f"--max-fail {text!r} is not valid; valid: {MAX_FAIL_VALID}")


@dataclass(frozen=True)
class FleetHost:
    """What planning needs of an inventory host: its name, groups and release."""

    name: str
    groups: tuple[str, ...]
    release: str = UNKNOWN_RELEASE


@dataclass(frozen=True)
class Wave:
    """One pyinfra run of the deploy (and one of the gates) over `hosts`."""

    name: str
    tier: str
    hosts: tuple[str, ...]
    # The --waves item it was sized by ("canary", "25%", "1"), or the tier for whole tiers.
    size: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "tier": self.tier, "hosts": list(self.hosts), "size": self.size}

    @classmethod
    def from_json(cls, item: Any) -> Wave:
        return cls(str(item["name"]), str(item["tier"]), tuple(item["hosts"]), str(item["size"]))


def _take(size: WaveSize, remaining: Sequence[FleetHost]) -> list[FleetHost]:
    if size.kind == "canary":
        seen: set[str] = set()
        picked = []
        for fleet_host in remaining:
            if fleet_host.release not in seen:
                seen.add(fleet_host.release)
                picked.append(fleet_host)
        return picked
    if size.kind == "count":
        return list(remaining[: size.value])
    return list(remaining[: max(1, math.ceil(len(remaining) * size.value / 100))])


def plan_waves(hosts: Sequence[FleetHost], sizes: Sequence[WaveSize]) -> list[Wave]:
    """The rollout's waves, hosts in inventory order: one wave per non-empty first tier
    (`storage`, then `registry`), the Docker hosts not already planned in waves of `sizes` (the
    last size repeats), then `others`: every host in none of these groups (the deploy may still
    have work for it). Empty tiers and waves are left out."""
    if not sizes:
        raise RolloutError(f"--waves gives no wave size; valid: {WAVES_VALID}")
    waves: list[Wave] = []
    planned: set[str] = set()
    for tier in FIRST_TIERS:
        members = [h.name for h in hosts if tier in h.groups and h.name not in planned]
        if members:
            waves.append(Wave(tier, tier, tuple(members), tier))
            planned.update(members)
    remaining = [h for h in hosts if DOCKER_TIER in h.groups and h.name not in planned]
    index = 0
    while remaining:
        size = sizes[min(index, len(sizes) - 1)]
        picked = _take(size, remaining)
        index += 1
        waves.append(Wave(f"docker-{index}", DOCKER_TIER, tuple(h.name for h in picked), str(size)))
        planned.update(h.name for h in picked)
        remaining = [h for h in remaining if h.name not in planned]
    others = [h.name for h in hosts if h.name not in planned]
    if others:
        waves.append(Wave(OTHERS_TIER, OTHERS_TIER, tuple(others), OTHERS_TIER))
    return waves


def plan_difference(old: Sequence[Wave], new: Sequence[Wave]) -> str:
    """The first difference between two plans, in words ('' when they are the same)."""
    for index in range(max(len(old), len(new))):
        before = old[index] if index < len(old) else None
        after = new[index] if index < len(new) else None
        if before == after:
            continue
        if before is None and after is not None:
            return f"wave {after.name} ({', '.join(after.hosts)}) is new"
        if after is None and before is not None:
            return f"wave {before.name} ({', '.join(before.hosts)}) is gone"
        assert before is not None and after is not None
        if before.name != after.name:
            return f"wave {index + 1} was {before.name} and is now {after.name}"
        return (
            f"wave {before.name} had hosts {', '.join(before.hosts)} and now has "
            f"{', '.join(after.hosts)}"
        )
    return ""
