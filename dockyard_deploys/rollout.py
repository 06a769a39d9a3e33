"""`dockyard rollout INVENTORY DEPLOY` on the control machine: the deploy rolled out tier by tier
and wave by wave (rollout_plan), each wave one real `pyinfra -y --json INVENTORY DEPLOY --limit …`
run whose progress goes to the terminal, then the health gates (rollout_gates) over the same
inventory; it stops when a wave has more failed hosts than `--max-fail` allows, saying which
hosts failed which gate and which were left untouched, and keeps its state so `--resume`
continues from that wave. `--group NAME` rolls out only the inventory hosts in that group (tiers
and waves as usual among them, the gates only on them) and `--data KEY=VALUE` is handed to every
pyinfra run (the receiver's staging rollout: `--group staging --data
docker_release_images='["REGISTRY/REPO@sha256:…"]'`). Every pyinfra run goes through one seam,
`run_pyinfra`, which tests replace."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from dockyard_deploys.rollout_gates import GATES_FUNCTION, gate_of
from dockyard_deploys.rollout_plan import (
    DEFAULT_MAX_FAIL,
    DEFAULT_WAVES,
    DOCKER_TIER,
    UNKNOWN_RELEASE,
    Budget,
    FleetHost,
    RolloutError,
    Wave,
    WaveSize,
    parse_max_fail,
    parse_waves,
    plan_difference,
    plan_waves,
)
from dockyard_deploys.settings import RolloutSettings, SettingsError

# Where state files live, relative to the working directory.
STATE_DIR = ".dockyard"
# Bumped when the state file's shape changes (an older file is then refused for --resume).
STATE_FORMAT = 1
# The failure names besides the gates': the wave's deploy run, and gates that did not run.
DEPLOY = "deploy"
NO_GATES = "gates"
# The fact that gives a host's release when no data key does.
RELEASE_FACT = "server.LinuxDistribution"
# --data KEY=VALUE: a host data key (pyinfra parses VALUE: true/false, a number, JSON, or text).
_DATA_ITEM = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)
DATA_VALID = (
    "KEY=VALUE with KEY a data key (letters, digits, _), VALUE as pyinfra's --data takes it"
)


@dataclass
class PyinfraRun:
    """One pyinfra invocation: its exit code and the JSON it printed on stdout (None if none)."""

    returncode: int
    output: Optional[dict[str, Any]]


Runner = Callable[[list[str]], PyinfraRun]


def run_pyinfra(args: list[str]) -> PyinfraRun:
    """Run `python -m pyinfra ARGS` (this Python's pyinfra) with its progress (stderr) going to
    the terminal as is, and parse the JSON it prints on stdout."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pyinfra", *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        check=False,
    )
    return PyinfraRun(proc.returncode, parse_json_output(proc.stdout))


def parse_json_output(stdout: str) -> Optional[dict[str, Any]]:
    """pyinfra's --json output: the whole of stdout, else its last line that parses; a list
    (debug-inventory's) comes back as {"hosts": [...]}."""
    candidates = [stdout, *reversed(stdout.splitlines())]
    for text in candidates:
        text = text.strip()
        if not text.startswith(("{", "[")):
            continue
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
        if isinstance(value, list):
            return {"hosts": value}
    return None


# --- the inventory ------------------------------------------------------------------------------


def parse_data(items: Sequence[str]) -> tuple[str, ...]:
    """--data items, checked: each KEY=VALUE (a RolloutError names a bad one)."""
    for item in items:
        if not _DATA_ITEM.match(item):
            raise RolloutError(f"--data {item!r} is not valid; valid: {DATA_VALID}")
    return tuple(items)


def _data_args(data: Sequence[str]) -> list[str]:
    args: list[str] = []
    for item in data:
        args += ["--data", item]
    return args


def load_fleet(
    inventory: str,
    runner: Runner,
    group: Optional[str] = None,
    data: Sequence[str] = (),
) -> tuple[list[FleetHost], dict[str, Optional[str]]]:
    """The inventory's hosts (in inventory order, with their groups) as pyinfra itself loads
    them — `pyinfra --json INVENTORY debug-inventory`, group_data and all, in its own process
    (pyinfra's CLI patches the process with gevent) — and each host's release from its data:
    `rollout_release`, else the lab's `lab_release` (None when neither is set). With `group`,
    only the hosts in that group (a RolloutError when it has none)."""
    run = runner([*_data_args(data), "--json", inventory, "debug-inventory"])
    listed = (run.output or {}).get("hosts") if isinstance(run.output, dict) else None
    if run.returncode != 0 or not isinstance(listed, list):
        raise RolloutError(
            f"pyinfra could not load the inventory {inventory} (exit {run.returncode}; its "
            "error is above)"
        )
    hosts: list[FleetHost] = []
    releases: dict[str, Optional[str]] = {}
    for item in listed:
        name, host_data = str(item["name"]), dict(item.get("data") or {})
        try:
            release = RolloutSettings.from_data(host_data).release
        except SettingsError as exc:
            raise RolloutError(f"{name}: {exc}") from exc
        lab = host_data.get("lab_release")
        releases[name] = release or (str(lab) if lab else None)
        hosts.append(FleetHost(name, tuple(str(g) for g in item.get("groups") or ())))
    if not hosts:
        raise RolloutError(f"the inventory {inventory} has no hosts")
    if group is not None:
        members = [h for h in hosts if group in h.groups]
        if not members:
            groups = sorted({g for h in hosts for g in h.groups})
            raise RolloutError(
                f"--group {group}: the inventory {inventory} has no host in that group; its "
                f"groups: {', '.join(groups) or 'none'}"
            )
        hosts = members
        releases = {h.name: releases[h.name] for h in members}
    return hosts, releases


def release_from_fact(fact: Any) -> str:
    """`<id> <version>` from pyinfra's LinuxDistribution fact ("debian 12"), else unknown."""
    if not isinstance(fact, dict):
        return UNKNOWN_RELEASE
    meta = fact.get("release_meta") or {}
    name = meta.get("ID") or fact.get("name")
    version = meta.get("VERSION_ID") or fact.get("major")
    if not name:
        return UNKNOWN_RELEASE
    return f"{str(name).lower()} {version}" if version else str(name).lower()


def fact_releases(inventory: str, hosts: Sequence[str], runner: Runner) -> dict[str, str]:
    """Releases of `hosts` from one read-only `pyinfra --json INVENTORY fact` run; hosts it
    could not reach are `unknown`."""
    run = runner(["--json", inventory, "fact", RELEASE_FACT, *_limit(hosts)])
    facts = (run.output or {}).get(RELEASE_FACT) or {}
    return {name: release_from_fact(facts.get(name)) for name in hosts}


def with_releases(
    hosts: Sequence[FleetHost],
    known: dict[str, Optional[str]],
    inventory: str,
    runner: Runner,
    need_facts: bool,
) -> list[FleetHost]:
    """Hosts with their release: from data (or an earlier run's state), else from the fact —
    asked only of Docker hosts, and only when a canary wave needs releases."""
    missing = [h.name for h in hosts if DOCKER_TIER in h.groups and not known.get(h.name)]
    found = fact_releases(inventory, missing, runner) if need_facts and missing else {}
    return [
        FleetHost(h.name, h.groups, known.get(h.name) or found.get(h.name) or UNKNOWN_RELEASE)
        for h in hosts
    ]


# --- results of one wave ------------------------------------------------------------------------


def _limit(hosts: Sequence[str]) -> list[str]:
    args: list[str] = []
    for name in hosts:
        args += ["--limit", name]
    return args


def deploy_args(
    inventory: str, deploy: str, hosts: Sequence[str], dry: bool, data: Sequence[str] = ()
) -> list[str]:
    return [
        "-y",
        "--json",
        *(["--dry"] if dry else []),
        *_data_args(data),
        *_limit(hosts),
        inventory,
        deploy,
    ]


def gates_args(
    inventory: str,
    limit: Sequence[str],
    gate_hosts: Sequence[str],
    pull_hosts: Sequence[str],
    push_canary: bool,
    data: Sequence[str] = (),
) -> list[str]:
    kwargs = {
        "gate_hosts": list(gate_hosts),
        "pull_hosts": list(pull_hosts),
        "push_canary": push_canary,
    }
    return [
        "-y",
        "--json",
        *_data_args(data),
        *_limit(limit),
        inventory,
        GATES_FUNCTION,
        json.dumps([[], kwargs]),
    ]


def deploy_failures(run: PyinfraRun, hosts: Sequence[str]) -> list[str]:
    """Hosts the deploy run failed: pyinfra's failed_hosts; every host when it exited non-zero
    without saying which (it stops the whole run when a deploy raises while preparing, or when no
    host is left)."""
    results = (run.output or {}).get("results")
    failed = set()
    if isinstance(results, dict):
        failed = set(results.get("failed_hosts") or []) & set(hosts)
    if run.returncode != 0 and not failed:
        failed = set(hosts)
    return [name for name in hosts if name in failed]


def gate_outcomes(
    run: PyinfraRun, hosts: Sequence[str]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(failed gates, passed gates) per host from the gates run's --json results; a host the run
    did not report on (unreachable, or the run stopped) fails `gates`."""
    failed: dict[str, list[str]] = {}
    passed: dict[str, list[str]] = {}
    results = (run.output or {}).get("results")
    if not isinstance(results, dict):
        return {name: [NO_GATES] for name in hosts}, {}
    for op in results.get("operations") or []:
        gate = None
        for name in [op.get("name") or "", *(op.get("names") or [])]:
            gate = gate or gate_of(str(name))
        if gate is None:
            continue
        for name in op.get("error") or []:
            if gate not in failed.setdefault(name, []):
                failed[name].append(gate)
        for name in [*(op.get("success") or []), *(op.get("no_change") or [])]:
            if gate not in passed.setdefault(name, []):
                passed[name].append(gate)
    for name in results.get("failed_hosts") or []:
        failed.setdefault(name, []).append(NO_GATES)
    return failed, passed


@dataclass
class WaveResult:
    """What a wave did: per host the failed gates (`deploy` for the deploy run) and the passed."""

    wave: Wave
    passed: bool
    failures: dict[str, list[str]]
    checks: dict[str, list[str]] = field(default_factory=dict)
    allowed: int = 0
    previous: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.wave.name,
            "tier": self.wave.tier,
            "size": self.wave.size,
            "hosts": list(self.wave.hosts),
            "passed": self.passed,
            "failures": {name: list(gates) for name, gates in self.failures.items()},
            "checks": {name: list(gates) for name, gates in self.checks.items()},
            "max_fail": self.allowed,
            "previous": self.previous,
        }

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> WaveResult:
        return cls(
            Wave.from_json(item),
            bool(item["passed"]),
            {str(k): list(v) for k, v in (item.get("failures") or {}).items()},
            {str(k): list(v) for k, v in (item.get("checks") or {}).items()},
            int(item.get("max_fail", 0)),
            previous=True,
        )


# --- state --------------------------------------------------------------------------------------


def state_path(
    inventory: str, deploy: str, cwd: Optional[Path] = None, group: Optional[str] = None
) -> Path:
    """`.dockyard/rollout-<hash>.json` in the working directory, one per inventory and deploy
    (paths made absolute; an inventory that is no file — `@local`, `a,b` — as given), and per
    `--group` (a staging rollout never resumes the whole fleet's, nor the other way round)."""
    base = Path.cwd() if cwd is None else cwd

    def key(value: str) -> str:
        path = base / value
        return str(path.resolve()) if path.exists() else value

    text = f"{key(inventory)}\0{key(deploy)}" + (f"\0group={group}" if group else "")
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return base / STATE_DIR / f"rollout-{digest}.json"


@dataclass
class RolloutState:
    """The state file: the plan, the waves done, the wave that stopped the rollout."""

    inventory: str
    deploy: str
    waves: str
    releases: dict[str, str]
    plan: list[Wave]
    completed: list[str] = field(default_factory=list)
    failed: Optional[str] = None
    results: list[WaveResult] = field(default_factory=list)
    # --group and --data of the rollout (a resumed one runs with the same).
    group: Optional[str] = None
    data: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "inventory": self.inventory,
            "deploy": self.deploy,
            "group": self.group,
            "data": list(self.data),
            "waves": self.waves,
            "releases": self.releases,
            "plan": [wave.to_json() for wave in self.plan],
            "completed": self.completed,
            "failed": self.failed,
            "results": [result.to_json() for result in self.results],
            "updated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    @classmethod
    def from_json(cls, item: Any) -> RolloutState:
        if not isinstance(item, dict) or item.get("format") != STATE_FORMAT:
            raise ValueError(f"not a rollout state of format {STATE_FORMAT}")
        return cls(
            inventory=str(item["inventory"]),
            deploy=str(item["deploy"]),
            waves=str(item["waves"]),
            releases={str(k): str(v) for k, v in dict(item["releases"]).items()},
            plan=[Wave.from_json(w) for w in item["plan"]],
            completed=[str(n) for n in item["completed"]],
            failed=None if item.get("failed") is None else str(item["failed"]),
            results=[WaveResult.from_json(r) for r in item.get("results") or []],
            group=None if item.get("group") is None else str(item["group"]),
            data=[str(d) for d in item.get("data") or []],
        )

    def save(self, path: Path) -> None:
        """Written whole to a temp file, then renamed over the old one."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        os.replace(temp, path)


def load_state(path: Path) -> RolloutState:
    if not path.exists():
        raise RolloutError(
            f"nothing to resume: there is no stopped rollout of this inventory and deploy "
            f"(no {path}); run without --resume"
        )
    try:
        return RolloutState.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RolloutError(
            f"cannot resume: {path} is not a readable rollout state ({exc}); remove it and run "
            "without --resume"
        ) from exc


# --- the rollout --------------------------------------------------------------------------------


@dataclass
class Options:
    inventory: str
    deploy: str
    waves: Optional[str] = None
    max_fail: str = DEFAULT_MAX_FAIL
    resume: bool = False
    dry: bool = False
    json: bool = False
    group: Optional[str] = None
    data: tuple[str, ...] = ()


@dataclass
class Outcome:
    """The rollout's result: the waves that ran (and, resumed, those done before), the hosts
    left untouched, and where the state is kept (None when nothing is kept)."""

    ok: bool
    waves: list[WaveResult]
    untouched: list[str]
    stopped_at: Optional[str]
    state: Optional[Path]
    dry: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "dry": self.dry,
            "waves": [result.to_json() for result in self.waves],
            "untouched": self.untouched,
            "stopped_at": self.stopped_at,
            "state": None if self.state is None else str(self.state),
        }


class Rollout:
    """One `dockyard rollout`: plan, state, and the waves run through `runner`."""

    def __init__(self, options: Options, runner: Runner = run_pyinfra, out: TextIO = sys.stdout):
        self.options = options
        self.runner = runner
        self.out = out
        self.budget: Budget = parse_max_fail(options.max_fail)
        self.path = state_path(options.inventory, options.deploy, group=options.group)
        # --data of this run (a resumed rollout's own when none is given).
        self.data: tuple[str, ...] = tuple(options.data)
        # The inventory's hosts in order, and their groups (set by prepare).
        self.order: list[str] = []
        self.groups: dict[str, tuple[str, ...]] = {}

    def say(self, line: str = "") -> None:
        print(line, file=self.out, flush=True)

    # -- planning and state --
    def prepare(self) -> tuple[RolloutState, int]:
        """The state to run with and the index of the first wave to run."""
        opts = self.options
        for what, path in (("inventory", opts.inventory), ("deploy", opts.deploy)):
            if (path.endswith(".py") or os.sep in path) and not Path(path).is_file():
                raise RolloutError(f"the {what} file {path} does not exist")
        if not opts.deploy.endswith(".py"):
            raise RolloutError(f"the deploy {opts.deploy} is not a pyinfra deploy file (*.py)")
        previous: Optional[RolloutState] = None
        if opts.resume:
            previous = load_state(self.path)
            if opts.waves is not None and opts.waves != previous.waves:
                raise RolloutError(
                    f"cannot resume: --waves {opts.waves} differs from the stopped rollout's "
                    f"--waves {previous.waves}; resume with the same waves or start over "
                    "without --resume"
                )
            if opts.data and list(opts.data) != previous.data:
                raise RolloutError(
                    f"cannot resume: --data {' '.join(opts.data)} differs from the stopped "
                    f"rollout's ({' '.join(previous.data) or 'none'}); resume without --data "
                    "(its own is used) or start over without --resume"
                )
            self.data = tuple(previous.data)
        waves_text = previous.waves if previous else (opts.waves or DEFAULT_WAVES)
        sizes: tuple[WaveSize, ...] = parse_waves(waves_text)
        hosts, known = load_fleet(opts.inventory, self.runner, opts.group, self.data)
        self.order = [h.name for h in hosts]
        self.groups = {h.name: h.groups for h in hosts}
        if previous:
            known = {**previous.releases, **{k: v for k, v in known.items() if v}}
        need_facts = any(size.kind == "canary" for size in sizes)
        fleet = with_releases(hosts, known, opts.inventory, self.runner, need_facts)
        plan = plan_waves(fleet, sizes)
        releases = {h.name: h.release for h in fleet}
        if previous is None:
            if self.path.exists() and not opts.dry:
                self.say(
                    f"--> Starting over: the stopped rollout's state in {self.path} is replaced"
                )
            return (
                RolloutState(
                    opts.inventory,
                    opts.deploy,
                    waves_text,
                    releases,
                    plan,
                    group=opts.group,
                    data=list(self.data),
                ),
                0,
            )
        difference = plan_difference(previous.plan, plan)
        if difference:
            raise RolloutError(
                f"cannot resume: the plan changed since the rollout stopped ({difference}); "
                "start over without --resume"
            )
        previous.releases = releases
        start = next(
            (i for i, wave in enumerate(plan) if wave.name not in previous.completed), len(plan)
        )
        return previous, start

    # -- one wave --
    def run_wave(self, state: RolloutState, index: int) -> WaveResult:
        opts = self.options
        wave = state.plan[index]
        hosts = list(wave.hosts)
        allowed = self.budget.allowed(len(hosts))
        self.say(
            f"--> Wave {index + 1}/{len(state.plan)} {wave.name} ({wave.size}): "
            f"{', '.join(hosts)} [max fail: {allowed} of {len(hosts)}]"
        )
        self.say(f"--> Deploying {opts.deploy} on {len(hosts)} host(s){' (dry)' * opts.dry}")
        failures: dict[str, list[str]] = {
            name: [DEPLOY]
            for name in deploy_failures(
                self.runner(deploy_args(opts.inventory, opts.deploy, hosts, opts.dry, self.data)),
                hosts,
            )
        }
        gate_hosts, pull_hosts, push, limit = self.gate_targets(state, index)
        self.say(
            f"--> Health gates of wave {wave.name}"
            + (" (read-only: no canary push or pull)" if opts.dry else "")
        )
        failed_gates, passed_gates = gate_outcomes(
            self.runner(gates_args(opts.inventory, limit, gate_hosts, pull_hosts, push, self.data)),
            limit,
        )
        for name, gates in failed_gates.items():
            failures.setdefault(name, []).extend(g for g in gates if g not in failures[name])
        checks = {name: passed_gates.get(name, []) for name in limit}
        failed_hosts = [name for name in limit if name in failures]
        result = WaveResult(wave, len(failed_hosts) <= allowed, failures, checks, allowed)
        for name in limit:
            extra = (
                ""
                if name in hosts
                else " (not in this wave: "
                + ("canary push" if name not in pull_hosts else "pull deferred to the registry")
                + ")"
            )
            if name in failures:
                ran = [g for g in checks[name] if g not in failures[name]]
                self.say(
                    f"    [{name}] FAILED: {', '.join(failures[name])}"
                    + (f" (passed: {', '.join(ran)})" if ran else "")
                    + extra
                )
            else:
                gates = [DEPLOY] * (name in hosts) + checks[name]
                self.say(f"    [{name}] ok: {', '.join(gates) or 'no gate applies'}{extra}")
        if result.passed:
            note = (
                f" ({len(failed_hosts)} failed host(s) within the budget)" if failed_hosts else ""
            )
            self.say(f"--> Wave {wave.name} passed{note}")
        else:
            self.say(
                f"--> Wave {wave.name} failed: {len(failed_hosts)} failed host(s), more than "
                f"--max-fail {self.budget} allows ({allowed})"
            )
        return result

    def gate_targets(
        self, state: RolloutState, index: int
    ) -> tuple[list[str], list[str], bool, list[str]]:
        """(hosts gated, hosts that pull, whether to push the canary, the run's --limit) for
        wave `index`: pulls need the registry deployed — its wave, or an earlier one — and the
        registry wave also pulls on the Docker hosts of earlier waves, which could not; the
        canary is pushed (idempotently) from the registry host before every wave's pulls. A
        `--group` rollout without the registry host gates its own hosts alone: no canary push,
        no pull of it (the release gate checks the images it pulls)."""
        plan = state.plan
        wave = plan[index]
        registry_host = self.registry_host()
        if self.options.group is not None and registry_host not in {
            h for w in plan for h in w.hosts
        }:
            return list(wave.hosts), [], False, [h for h in self.order if h in wave.hosts]
        ready_at = next((i for i, w in enumerate(plan) if registry_host in w.hosts), None)
        docker = set(self.docker_hosts())
        pull_hosts: list[str] = []
        if ready_at is not None and index >= ready_at and not self.options.dry:
            pull_hosts = [h for h in wave.hosts if h in docker]
            if index == ready_at:
                earlier = [h for w in plan[:index] for h in w.hosts if h in docker]
                pull_hosts = earlier + pull_hosts
        push = bool(pull_hosts) or (index == ready_at and not self.options.dry)
        limit = list(dict.fromkeys([*pull_hosts, *wave.hosts]))
        if push and registry_host is not None and registry_host not in limit:
            limit.append(registry_host)
        ordered = [h for h in self.order if h in limit]
        return list(wave.hosts), pull_hosts, push, ordered

    # -- the inventory as planned --
    def registry_host(self) -> Optional[str]:
        """The fleet's registry host: the first of the `registry` group (as the deploys say)."""
        return next((h for h in self.order if "registry" in self.groups[h]), None)

    def docker_hosts(self) -> list[str]:
        return [h for h in self.order if DOCKER_TIER in self.groups[h]]

    # -- the whole rollout --
    def run(self) -> Outcome:
        opts = self.options
        state, start = self.prepare()
        results = [r for r in state.results if r.wave.name in state.completed]
        for result in results:
            result.previous = True
        if start:
            done = ", ".join(state.completed)
            self.say(f"--> Resuming at wave {start + 1}/{len(state.plan)} (done: {done})")
        stopped: Optional[str] = None
        index = start
        try:
            for index in range(start, len(state.plan)):
                wave = state.plan[index]
                if not opts.dry:
                    state.failed = wave.name  # until it passes: an interrupted wave resumes
                    state.save(self.path)
                result = self.run_wave(state, index)
                results.append(result)
                state.results = [r for r in state.results if r.wave.name != wave.name]
                state.results.append(result)
                if not result.passed:
                    stopped = wave.name
                    break
                state.completed.append(wave.name)
                state.failed = None
        except KeyboardInterrupt:
            stopped = state.plan[index].name
            self.say(f"\n--> Interrupted during wave {stopped}")
        untouched_waves = state.plan[index + 1 :] if stopped else []
        untouched = [h for w in untouched_waves for h in w.hosts]
        kept: Optional[Path] = None
        if not opts.dry:
            if stopped:
                state.failed = stopped
                state.save(self.path)
                kept = self.path
            elif self.path.exists():
                self.path.unlink()
        outcome = Outcome(stopped is None, results, untouched, stopped, kept, opts.dry)
        self.summary(outcome)
        return outcome

    def summary(self, outcome: Outcome) -> None:
        failed = {n: g for r in outcome.waves if not r.previous for n, g in r.failures.items()}
        if outcome.ok:
            ran = [r for r in outcome.waves if not r.previous]
            self.say(
                f"--> Rollout {'(dry) ' * outcome.dry}complete: {len(ran)} wave(s) passed"
                + (
                    f", {len(outcome.waves) - len(ran)} done before"
                    if len(ran) < len(outcome.waves)
                    else ""
                )
            )
        else:
            self.say(f"--> Rollout {'(dry) ' * outcome.dry}stopped at wave {outcome.stopped_at}")
        for name, gates in failed.items():
            self.say(f"    failed: {name} ({', '.join(gates)})")
        if not outcome.ok:
            self.say(f"    untouched: {', '.join(outcome.untouched) or 'none'}")
        if outcome.state is not None:
            self.say(
                f"    state: {outcome.state}; `dockyard rollout {self.options.inventory} "
                f"{self.options.deploy}"
                + (f" --group {self.options.group}" if self.options.group else "")
                + f" --resume` continues from wave {outcome.stopped_at}"
            )


# --- the command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dockyard rollout",
        description="Roll DEPLOY out over INVENTORY tier by tier (storage, registry, then the "
        "Docker hosts in waves), with health gates after each wave.",
    )
    parser.add_argument("inventory", metavar="INVENTORY", help="pyinfra inventory")
    parser.add_argument("deploy", metavar="DEPLOY", help="pyinfra deploy file (deploy.py)")
    parser.add_argument(
        "--waves",
        default=None,
        help=f"wave sizes of the Docker hosts (default: {DEFAULT_WAVES.replace('%', '%%')}): "
        "canary (one host per "
        "release), a count or a percentage of the hosts left; the last repeats",
    )
    parser.add_argument(
        "--max-fail",
        default=DEFAULT_MAX_FAIL,
        help="failed hosts a wave may have and still pass: a count or a percentage of its hosts "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--group",
        default=None,
        metavar="NAME",
        help="roll out only the inventory hosts in group NAME (tiers and waves among them; the "
        "gates only on them)",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="host data for every pyinfra run, as pyinfra's --data (repeatable)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the stopped rollout from its failed wave"
    )
    parser.add_argument(
        "--dry",
        action="store_true",
        help="pyinfra --dry for every wave; only read-only gates; no state written",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object with the result on stdout"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None, runner: Runner = run_pyinfra) -> int:
    """`dockyard rollout …`: 0 when every wave passed, 1 when the rollout stopped, 2 for bad
    arguments (argparse's own exit for unknown options)."""
    args = build_parser().parse_args(argv)
    out = sys.stderr if args.json else sys.stdout
    try:
        options = Options(
            args.inventory,
            args.deploy,
            args.waves,
            args.max_fail,
            args.resume,
            args.dry,
            args.json,
            args.group,
            parse_data(args.data),
        )
        if options.waves is not None:
            parse_waves(options.waves)
        rollout = Rollout(options, runner, out)
        outcome = rollout.run()
    except RolloutError as exc:
        print(f"dockyard rollout: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dockyard rollout: interrupted before any wave ran", file=sys.stderr)
        return 1
    if options.json:
        print(json.dumps(outcome.to_json(), indent=2))
    return 0 if outcome.ok else 1
