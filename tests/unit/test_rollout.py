"""`dockyard rollout` without hosts: wave planning and --waves, failure budgets, the state and
--resume, the JSON result, the gates' pyinfra results read back, the gates' shell checks run
against fake files and a fake `docker`, and the command line's errors (as subprocesses). Every
pyinfra run goes through the engine's one seam (`runner`), replaced here by a fake fleet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import pytest

from dockyard_deploys import rollout, rollout_gates
from dockyard_deploys.rollout import PyinfraRun
from dockyard_deploys.rollout_plan import (
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
from dockyard_deploys.settings import NfsMount

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]

# --- planning -----------------------------------------------------------------------------------


def _fleet(*specs: tuple[str, str, str]) -> list[FleetHost]:
    """FleetHosts from (name, comma-separated groups, release)."""
    return [FleetHost(name, tuple(groups.split(",")), release) for name, groups, release in specs]


SEED = _fleet(
    ("nfs", "storage,docker_hosts", "bookworm"),
    ("reg", "registry,docker_hosts", "bookworm"),
    ("d1", "docker_hosts", "bullseye"),
    ("d2", "docker_hosts", "bookworm"),
    ("d3", "docker_hosts", "trixie"),
    ("d4", "docker_hosts", "bookworm"),
    ("d5", "docker_hosts", "bullseye"),
    ("d6", "docker_hosts", "trixie"),
    ("d7", "docker_hosts", "bookworm"),
    ("vm1", "vms", "bookworm"),
)


def _shape(waves: Sequence[Wave]) -> list[tuple[str, list[str]]]:
    return [(w.name, list(w.hosts)) for w in waves]


def test_default_waves_storage_registry_canary_quarter_rest_then_others() -> None:
    waves = plan_waves(SEED, parse_waves("canary,25%,100%"))
    assert _shape(waves) == [
        ("storage", ["nfs"]),
        ("registry", ["reg"]),
        # one Docker host per release, in inventory order
        ("docker-1", ["d1", "d2", "d3"]),
        # 25% of the 4 left
        ("docker-2", ["d4"]),
        ("docker-3", ["d5", "d6", "d7"]),
        ("others", ["vm1"]),
    ]
    assert [w.tier for w in waves] == [
        "storage",
        "registry",
        "docker_hosts",
        "docker_hosts",
        "docker_hosts",
        "others",
    ]
    assert [w.size for w in waves][2:5] == ["canary", "25%", "100%"]


def test_a_host_in_several_tiers_rolls_out_once_in_the_first() -> None:
    fleet = _fleet(("one", "storage,registry,docker_hosts", "a"), ("two", "docker_hosts", "b"))
    assert _shape(plan_waves(fleet, parse_waves("canary,25%,100%"))) == [
        ("storage", ["one"]),
        ("docker-1", ["two"]),
    ]


@pytest.mark.parametrize(
    ("waves", "sizes"),
    [
        ("1", [1, 1, 1, 1, 1, 1, 1]),  # the last size repeats: one host at a time
        ("2,50%", [2, 3, 1, 1]),  # 50% of the 5 left, rounded up; then of the 2 left; then 1
        ("100%", [7]),
        ("3,100%", [3, 4]),
        ("1%", [1] * 7),  # at least one host
        ("canary,1", [3, 1, 1, 1, 1]),
    ],
)
def test_wave_sizes(waves: str, sizes: list[int]) -> None:
    docker = [h for h in SEED if h.groups == ("docker_hosts",)]
    planned = plan_waves(docker, parse_waves(waves))
    assert [len(w.hosts) for w in planned] == sizes
    assert [h for w in planned for h in w.hosts] == [h.name for h in docker]


def test_canary_with_unknown_releases_is_one_host() -> None:
    fleet = [FleetHost(f"d{i}", ("docker_hosts",)) for i in range(4)]
    assert [len(w.hosts) for w in plan_waves(fleet, parse_waves("canary,100%"))] == [1, 3]


def test_waves_parse() -> None:
    assert parse_waves("canary, 25% ,100%") == (
        WaveSize("canary"),
        WaveSize("percent", 25),
        WaveSize("percent", 100),
    )
    assert parse_waves("1,3") == (WaveSize("count", 1), WaveSize("count", 3))
    assert [str(s) for s in parse_waves("CANARY,2,10%")] == ["canary", "2", "10%"]


@pytest.mark.parametrize(
    ("text", "bad"),
    [("0", "'0'"), ("0%", "'0%'"), ("101%", "'101%'"), ("abc", "'abc'"), ("1,,2", "''"),
     ("-1", "'-1'"), ("1.5", "'1.5'"), ("25 %", "'25 %'")],
)  # fmt: skip
def test_bad_waves_name_the_item_and_what_is_valid(text: str, bad: str) -> None:
    with pytest.raises(RolloutError) as error:
        parse_waves(text)
    message = str(error.value)
    assert f"{bad} is not a wave size" in message
    assert "canary (one host per release), a host count" in message


def test_empty_waves_are_refused() -> None:
    with pytest.raises(RolloutError, match="--waves '' is empty; valid: comma-separated"):
        parse_waves("")


@pytest.mark.parametrize(
    ("text", "hosts", "allowed"),
    [("0", 10, 0), ("1", 3, 1), ("25%", 3, 0), ("25%", 4, 1), ("50%", 9, 4), ("100%", 5, 5)],
)
def test_budget(text: str, hosts: int, allowed: int) -> None:
    assert parse_max_fail(text).allowed(hosts) == allowed


@pytest.mark.parametrize("text", ["-1", "x", "101%", "1.5", ""])
def test_bad_budget_is_refused(text: str) -> None:
    with pytest.raises(RolloutError, match="--max-fail .* is not valid; valid: a host count"):
        parse_max_fail(text)
    assert str(Budget(25, percent=True)) == "25%"


def test_plan_difference_in_words() -> None:
    old = plan_waves(SEED, parse_waves("canary,100%"))
    assert plan_difference(old, old) == ""
    moved = [FleetHost(h.name, h.groups, "trixie" if h.name == "d2" else h.release) for h in SEED]
    assert plan_difference(old, plan_waves(moved, parse_waves("canary,100%"))) == (
        "wave docker-1 had hosts d1, d2, d3 and now has d1, d2, d4"
    )
    assert plan_difference(old, old[:-1]) == "wave others (vm1) is gone"
    assert plan_difference(old[:-1], old) == "wave others (vm1) is new"


# --- pyinfra's results read back ----------------------------------------------------------------


def _op(gate: str, error: Sequence[str] = (), success: Sequence[str] = ()) -> dict[str, Any]:
    name = f"Check the rollout's health gates | dockyard gate {gate}: something"
    return {"name": name, "names": [name], "error": list(error), "success": list(success),
            "no_change": []}  # fmt: skip


def _results(ops: list[dict[str, Any]], failed: Sequence[str] = ()) -> dict[str, Any]:
    return {"plan": [], "results": {"operations": ops, "failed_hosts": list(failed)}}


def test_gate_of_reads_the_gate_from_an_operation_name() -> None:
    assert rollout_gates.gate_of("Deploy | dockyard gate pull: the canary pulls") == "pull"
    assert rollout_gates.gate_of(rollout_gates.op_name("engine", "x")) == "engine"
    assert rollout_gates.gate_of("dockyard gate nonsense: x") is None
    assert rollout_gates.gate_of("Write daemon.json") is None


def test_deploy_failures() -> None:
    hosts = ["a", "b", "c"]
    assert rollout.deploy_failures(PyinfraRun(0, _results([])), hosts) == []
    assert rollout.deploy_failures(PyinfraRun(1, _results([], ["b"])), hosts) == ["b"]
    # pyinfra stopped the whole run (a deploy raised while preparing): nobody is known good
    assert rollout.deploy_failures(PyinfraRun(1, None), hosts) == hosts
    assert rollout.deploy_failures(PyinfraRun(1, {"plan": [], "results": None}), hosts) == hosts
    assert rollout.deploy_failures(PyinfraRun(0, {"plan": [], "results": None}), hosts) == []


def test_gate_outcomes() -> None:
    run = PyinfraRun(
        1,
        _results(
            [
                _op("engine", error=["a"], success=["b"]),
                _op("mounts", success=["a", "b"]),
                _op("pull", error=["a", "b"]),
                {"name": "something else", "names": [], "error": ["b"], "success": []},
            ],
            failed=["c"],
        ),
    )
    failed, passed = rollout.gate_outcomes(run, ["a", "b", "c"])
    assert failed == {"a": ["engine", "pull"], "b": ["pull"], "c": ["gates"]}
    assert passed == {"a": ["mounts"], "b": ["engine", "mounts"]}
    assert rollout.gate_outcomes(PyinfraRun(1, None), ["a", "b"]) == (
        {"a": ["gates"], "b": ["gates"]},
        {},
    )


def test_json_output_is_found_after_other_lines() -> None:
    assert rollout.parse_json_output('{"a": 1}\n') == {"a": 1}
    assert rollout.parse_json_output('noise\n{"a": 2}\n') == {"a": 2}
    assert rollout.parse_json_output("not json") is None


def test_releases_from_the_distribution_fact() -> None:
    fact = {"name": "Debian", "major": 12, "release_meta": {"ID": "debian", "VERSION_ID": "12"}}
    assert rollout.release_from_fact(fact) == "debian 12"
    assert rollout.release_from_fact({"name": "CentOS", "major": 7}) == "centos 7"
    assert rollout.release_from_fact(None) == "unknown"


# --- a fake fleet behind the runner seam ------------------------------------------------------

# The fake fleet's inventory, as `pyinfra --json INVENTORY debug-inventory` lists it.
INVENTORY: list[dict[str, Any]] = [
    {"name": "nfs", "groups": ["storage"], "data": {"lab_release": "bookworm"}},
    {"name": "reg", "groups": ["registry"], "data": {"lab_release": "bookworm"}},
    {"name": "d1", "groups": ["docker_hosts"], "data": {"lab_release": "bullseye"}},
    {"name": "d2", "groups": ["docker_hosts"], "data": {"lab_release": "bookworm"}},
    {"name": "d3", "groups": ["docker_hosts"], "data": {"lab_release": "bookworm"}},
    {"name": "d4", "groups": ["docker_hosts"], "data": {"lab_release": "trixie"}},
    {"name": "d5", "groups": ["docker_hosts"], "data": {"lab_release": "bookworm"}},
]


class FakeFleet:
    """Answers pyinfra runs as pyinfra's --json would: deploy runs fail the hosts in
    `deploy_fail`, gate runs fail `gate_fail[host]`; every call is recorded."""

    def __init__(self) -> None:
        self.inventory = [dict(item) for item in INVENTORY]
        self.calls: list[list[str]] = []
        self.deploy_fail: set[str] = set()
        self.gate_fail: dict[str, list[str]] = {}
        self.facts: dict[str, Any] = {}

    @staticmethod
    def limit(args: list[str]) -> list[str]:
        return [args[i + 1] for i, a in enumerate(args) if a == "--limit"]

    def __call__(self, args: list[str]) -> PyinfraRun:
        self.calls.append(list(args))
        hosts = self.limit(args)
        if "debug-inventory" in args:
            return PyinfraRun(0, {"hosts": self.inventory})
        if "fact" in args:
            return PyinfraRun(0, {rollout.RELEASE_FACT: {h: self.facts.get(h) for h in hosts}})
        if rollout_gates.GATES_FUNCTION in args:
            kwargs = json.loads(args[-1])[1]
            ops = []
            for gate in rollout_gates.GATES:
                if gate == "release" and "--data" not in args:
                    continue  # the release gate runs where docker_release_images is set
                targets = kwargs["pull_hosts"] if gate == "pull" else kwargs["gate_hosts"]
                targets = [h for h in targets if gate != "registry" or h == "reg"]
                bad = [h for h in targets if gate in self.gate_fail.get(h, [])]
                ops.append(_op(gate, error=bad, success=[h for h in targets if h not in bad]))
            return PyinfraRun(0, _results(ops))
        failed = [h for h in hosts if h in self.deploy_fail]
        return PyinfraRun(1 if failed else 0, _results([], failed))

    def deploy_calls(self) -> list[list[str]]:
        return [self.limit(c) for c in self.calls if "deploy.py" in c and "fact" not in c]

    def gate_calls(self) -> list[dict[str, Any]]:
        return [
            {**json.loads(c[-1])[1], "limit": self.limit(c)}
            for c in self.calls
            if rollout_gates.GATES_FUNCTION in c
        ]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with an inventory and a deploy file (the state goes under it; the
    fake fleet answers for the inventory)."""
    (tmp_path / "inventory.py").write_text("# the fake fleet lists the hosts\n")
    (tmp_path / "deploy.py").write_text("# the fake fleet never runs it\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(
    fleet: FakeFleet, *extra: str, capsys: Optional[pytest.CaptureFixture[str]] = None
) -> tuple[int, dict[str, Any]]:
    code = rollout.main(["inventory.py", "deploy.py", "--json", *extra], runner=fleet)
    out = capsys.readouterr().out if capsys else "{}"
    return code, json.loads(out)


def test_a_clean_rollout_runs_every_wave_and_keeps_no_state(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = FakeFleet()
    code, result = _run(fleet, capsys=capsys)
    assert code == 0
    assert set(result) == {"ok", "dry", "waves", "untouched", "stopped_at", "state"}
    assert result["ok"] is True and result["untouched"] == [] and result["state"] is None
    assert [(w["name"], w["hosts"], w["passed"]) for w in result["waves"]] == [
        ("storage", ["nfs"], True),
        ("registry", ["reg"], True),
        ("docker-1", ["d1", "d2", "d4"], True),
        ("docker-2", ["d3"], True),
        ("docker-3", ["d5"], True),
    ]
    wave = result["waves"][2]
    assert set(wave) >= {"name", "hosts", "passed", "failures"}
    assert wave["failures"] == {} and wave["checks"]["d1"] == ["engine", "pull", "mounts"]
    # each wave is one real deploy run limited to its hosts, in order
    assert fleet.deploy_calls() == [["nfs"], ["reg"], ["d1", "d2", "d4"], ["d3"], ["d5"]]
    # pyinfra itself loads the inventory first
    assert fleet.calls[0] == ["--json", "inventory.py", "debug-inventory"]
    first = fleet.calls[1]
    assert first[:2] == ["-y", "--json"] and first[-2:] == ["inventory.py", "deploy.py"]
    assert not list((project / ".dockyard").glob("*.json"))
    # no release fact asked for: every Docker host has lab_release
    assert not [c for c in fleet.calls if "fact" in c]


def test_gates_push_the_canary_after_the_registry_and_pull_only_then(project: Path) -> None:
    fleet = FakeFleet()
    assert rollout.main(["inventory.py", "deploy.py"], runner=fleet) == 0
    gates = fleet.gate_calls()
    # the storage wave: no registry yet, so no pull and no push
    assert gates[0] == {
        "gate_hosts": ["nfs"],
        "pull_hosts": [],
        "push_canary": False,
        "limit": ["nfs"],
    }
    # the registry wave pushes the canary from the registry host
    assert gates[1]["push_canary"] is True and gates[1]["limit"] == ["reg"]
    # Docker waves pull, and the registry host joins only to push the canary first
    assert gates[2] == {
        "gate_hosts": ["d1", "d2", "d4"],
        "pull_hosts": ["d1", "d2", "d4"],
        "push_canary": True,
        "limit": ["reg", "d1", "d2", "d4"],
    }


def test_docker_hosts_of_waves_before_the_registry_pull_in_the_registry_wave() -> None:
    """The seed topology: the storage host is a Docker host too, deployed before the registry;
    it pulls in the registry's wave, with the registry host itself."""
    engine = rollout.Rollout(rollout.Options("i.py", "d.py"), FakeFleet())
    engine.order = ["nfs", "reg", "d1"]
    engine.groups = {
        "nfs": ("storage", "docker_hosts"),
        "reg": ("registry", "docker_hosts"),
        "d1": ("docker_hosts",),
    }
    fleet = [FleetHost(name, groups) for name, groups in engine.groups.items()]
    plan = plan_waves(fleet, parse_waves("canary,100%"))
    state = rollout.RolloutState("i.py", "d.py", "canary,100%", {}, plan)
    assert engine.gate_targets(state, 0) == (["nfs"], [], False, ["nfs"])
    assert engine.gate_targets(state, 1) == (["reg"], ["nfs", "reg"], True, ["nfs", "reg"])
    assert engine.gate_targets(state, 2) == (["d1"], ["d1"], True, ["reg", "d1"])


def test_a_failed_gate_stops_the_rollout_and_resume_continues_there(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = FakeFleet()
    fleet.gate_fail = {"d2": ["engine", "pull"]}
    code, result = _run(fleet, capsys=capsys)
    assert code == 1 and result["ok"] is False
    assert result["stopped_at"] == "docker-1"
    assert result["waves"][-1]["failures"] == {"d2": ["engine", "pull"]}
    assert result["waves"][-1]["passed"] is False
    assert result["untouched"] == ["d3", "d5"]
    state_file = Path(result["state"])
    assert state_file.parent == project / ".dockyard" and state_file.name.startswith("rollout-")
    state = json.loads(state_file.read_text())
    assert state["completed"] == ["storage", "registry"] and state["failed"] == "docker-1"
    assert [w["name"] for w in state["plan"]][-1] == "docker-3"

    fleet.gate_fail = {}
    fleet.calls.clear()
    code, result = _run(fleet, "--resume", capsys=capsys)
    assert code == 0 and result["ok"] is True
    assert fleet.deploy_calls() == [["d1", "d2", "d4"], ["d3"], ["d5"]]
    assert [(w["name"], w["previous"]) for w in result["waves"]] == [
        ("storage", True),
        ("registry", True),
        ("docker-1", False),
        ("docker-2", False),
        ("docker-3", False),
    ]
    assert not state_file.exists()


def test_a_deploy_failure_counts_and_the_summary_names_failed_and_untouched(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = FakeFleet()
    fleet.deploy_fail = {"reg"}
    assert rollout.main(["inventory.py", "deploy.py"], runner=fleet) == 1
    out = capsys.readouterr().out
    assert "--> Wave 2/5 registry (registry): reg [max fail: 0 of 1]" in out
    assert "    [reg] FAILED: deploy" in out
    assert "--> Rollout stopped at wave registry" in out
    assert "    failed: reg (deploy)" in out
    assert "    untouched: d1, d2, d4, d3, d5" in out
    assert "--resume` continues from wave registry" in out


def test_failures_within_the_budget_pass_the_wave(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = FakeFleet()
    fleet.gate_fail = {"d1": ["mounts"]}
    code, result = _run(fleet, "--max-fail", "1", capsys=capsys)
    assert code == 0 and result["ok"] is True
    assert result["waves"][2]["failures"] == {"d1": ["mounts"]}
    assert result["waves"][2]["passed"] is True
    fleet.calls.clear()
    code, result = _run(fleet, "--max-fail", "34%", capsys=capsys)  # 34% of 3 hosts: 1
    assert code == 0
    code, result = _run(fleet, "--max-fail", "33%", capsys=capsys)  # 33% of 3 hosts: none
    assert code == 1 and result["stopped_at"] == "docker-1"


def test_resume_refuses_a_changed_plan(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fleet = FakeFleet()
    fleet.gate_fail = {"d1": ["engine"]}
    assert rollout.main(["inventory.py", "deploy.py"], runner=fleet) == 1
    fleet.inventory[-1] = {**INVENTORY[-1], "name": "d6"}
    capsys.readouterr()
    assert rollout.main(["inventory.py", "deploy.py", "--resume"], runner=fleet) == 2
    err = capsys.readouterr().err
    assert "cannot resume: the plan changed since the rollout stopped (wave docker-3 had " in err
    assert "hosts d5 and now has d6); start over without --resume" in err
    # other waves than the stopped rollout's are refused too
    fleet.inventory = [dict(item) for item in INVENTORY]
    assert (
        rollout.main(["inventory.py", "deploy.py", "--resume", "--waves", "1"], runner=fleet) == 2
    )
    assert "--waves 1 differs from the stopped rollout's --waves canary,25%,100%" in (
        capsys.readouterr().err
    )
    # the same waves, given again, are fine
    fleet.gate_fail = {}
    argv = ["inventory.py", "deploy.py", "--resume", "--waves", "canary,25%,100%"]
    assert rollout.main(argv, runner=fleet) == 0


def test_resume_without_a_stopped_rollout(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rollout.main(["inventory.py", "deploy.py", "--resume"], runner=FakeFleet()) == 2
    assert "nothing to resume: there is no stopped rollout" in capsys.readouterr().err
    path = rollout.state_path("inventory.py", "deploy.py")
    path.parent.mkdir()
    path.write_text("{not json")
    assert rollout.main(["inventory.py", "deploy.py", "--resume"], runner=FakeFleet()) == 2
    assert "is not a readable rollout state" in capsys.readouterr().err


def test_dry_passes_dry_runs_only_read_only_gates_and_writes_no_state(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = FakeFleet()
    fleet.gate_fail = {"d1": ["engine"]}
    code, result = _run(fleet, "--dry", capsys=capsys)
    assert code == 1 and result["dry"] is True and result["state"] is None
    deploys = [c for c in fleet.calls if "deploy.py" in c]
    assert deploys and all("--dry" in c for c in deploys)
    assert all(not g["pull_hosts"] and not g["push_canary"] for g in fleet.gate_calls())
    assert all("--dry" not in c for c in fleet.calls if rollout_gates.GATES_FUNCTION in c)
    assert not (project / ".dockyard").exists()


def test_releases_come_from_the_fact_when_no_data_names_one(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = FakeFleet()
    fleet.inventory = [
        {"name": name, "groups": ["docker_hosts"], "data": data}
        for name, data in (("a", {}), ("b", {}), ("c", {"rollout_release": "custom"}), ("d", {}))
    ]
    debian = {"release_meta": {"ID": "debian", "VERSION_ID": "12"}}
    fleet.facts = {"a": debian, "b": debian, "d": {"name": "CentOS", "major": 7}}
    code, result = _run(fleet, "--waves", "canary,100%", capsys=capsys)
    assert code == 0
    assert [w["hosts"] for w in result["waves"]] == [["a", "c", "d"], ["b"]]
    facts = [c for c in fleet.calls if "fact" in c]
    assert len(facts) == 1 and fleet.limit(facts[0]) == ["a", "b", "d"]
    assert "server.LinuxDistribution" in facts[0]
    # no canary wave, no fact asked for
    fleet.calls.clear()
    _run(fleet, "--waves", "2", capsys=capsys)
    assert not [c for c in fleet.calls if "fact" in c]


def test_state_path_is_per_inventory_and_deploy(project: Path) -> None:
    first = rollout.state_path("inventory.py", "deploy.py")
    assert first.parent == project / ".dockyard"
    assert first == rollout.state_path(str(project / "inventory.py"), "deploy.py")
    assert first != rollout.state_path("inventory.py", "other.py")


# --- the gates' shell checks ------------------------------------------------------------------


def _sh(command: str, path: Optional[Path] = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    if path is not None:
        env["PATH"] = f"{path}:{env['PATH']}"
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env)


def _fake_docker(tmp_path: Path, info: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("docker", f"echo '{info}'"), ("systemctl", "echo active")):
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    return bin_dir


def test_engine_gate(tmp_path: Path) -> None:
    root = tmp_path / "docker-root"
    root.mkdir()
    bin_dir = _fake_docker(tmp_path, f"overlay2|{root}")
    ok = _sh(rollout_gates.engine_command("overlay2", str(root)), bin_dir)
    assert ok.returncode == 0, ok.stderr
    assert f"storage driver overlay2, data root {root}" in ok.stdout
    # no driver known: only the data root is checked
    assert _sh(rollout_gates.engine_command(None, str(root)), bin_dir).returncode == 0
    wrong = _sh(rollout_gates.engine_command("btrfs", str(root)), bin_dir)
    assert wrong.returncode == 1
    assert (
        "dockyard gate engine: storage driver is overlay2, daemon.json sets btrfs" in wrong.stderr
    )
    elsewhere = _sh(rollout_gates.engine_command("overlay2", "/srv/docker"), bin_dir)
    assert "dockyard gate engine: data root is " in elsewhere.stderr
    assert "configured /srv/docker" in elsewhere.stderr


def test_mounts_gate(tmp_path: Path) -> None:
    mounts = [
        NfsMount("nfs-01:/srv/exports/registry", "/mnt/registry", "nfs4", "rw,_netdev"),
        NfsMount("nfs-01:/srv/exports/www", "/mnt/www", "nfs", "rw,_netdev"),
    ]
    fstab, proc_mounts, filesystems = (tmp_path / n for n in ("fstab", "mounts", "filesystems"))
    fstab.write_text("".join(m.fstab_line + "\n" for m in mounts))
    filesystems.write_text("nodev\tproc\n\text4\n")
    proc_mounts.write_text("nfs-01:/srv/exports/registry /mnt/registry nfs4 rw 0 0\n")

    def gate(*kept: NfsMount) -> subprocess.CompletedProcess[str]:
        paths = {"filesystems": str(filesystems), "mounted": str(proc_mounts)}
        return _sh(
            rollout_gates.mounts_command(mounts, fstab=str(fstab), modprobe="false", **paths)
        )

    # no NFS client in the kernel: the fstab lines are what counts
    assert gate().returncode == 0
    fstab.write_text(mounts[0].fstab_line + "\n")
    missing = gate()
    assert missing.returncode == 1
    assert "/etc/fstab has no line for nfs-01:/srv/exports/www on /mnt/www (nfs)" in missing.stderr
    # a kernel NFS client: each mount point must be mounted over NFS
    filesystems.write_text("nodev\tnfs\nnodev\tnfs4\n")
    unmounted = gate()
    assert unmounted.returncode == 1
    assert "dockyard gate mounts: /mnt/www is not a mounted NFS filesystem" in unmounted.stderr
    assert "/mnt/registry" not in unmounted.stderr
    proc_mounts.write_text(
        proc_mounts.read_text() + "nfs-01:/srv/exports/www /mnt/www nfs4 rw 0 0\n"
    )
    assert gate().returncode == 0


def test_pull_gate_masks_the_password_and_keeps_no_credentials() -> None:
    command = rollout_gates.pull_command(
        "reg:5443", "reg:5443/dockyard/rollout-canary:1", True, ("fleet", "s3cret pw")
    )
    shown = command.get_masked_value()
    assert "s3cret" not in shown and "*MASKED*" in shown
    assert "printf '%s' 's3cret pw' | docker login --username fleet" in command.get_raw_value()
    assert 'export DOCKER_CONFIG="$d"' in shown and "/etc/docker/certs.d/reg:5443/ca.crt" in shown
    assert rollout_gates.canary_reference("reg:5443") == "reg:5443/dockyard/rollout-canary:1"
    anonymous = rollout_gates.pull_command("reg:5443", "r", False, None).get_raw_value()
    assert "docker login" not in anonymous and "certs.d" not in anonymous


# --- the command line (subprocesses: exit codes and messages, never a traceback) ----------------


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dockyard"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rollout"], "the following arguments are required: INVENTORY, DEPLOY"),
        (
            ["rollout", "inventory/example.py", "deploy.py", "--waves", "canary,0%"],
            "--waves 'canary,0%': '0%' is not a wave size; valid: comma-separated wave sizes",
        ),
        (
            ["rollout", "inventory/example.py", "deploy.py", "--max-fail", "half"],
            "--max-fail 'half' is not valid; valid: a host count (0, 1, …) or a percentage",
        ),
        (
            ["rollout", "inventory/missing.py", "deploy.py"],
            "the inventory file inventory/missing.py does not exist",
        ),
        (
            ["rollout", "inventory/example.py", "missing.py"],
            "the deploy file missing.py does not exist",
        ),
        (["rollout", "inventory/example.py", "deploy.py", "--bogus"], "unrecognized arguments"),
    ],
)
def test_cli_errors_exit_2_with_a_message(args: list[str], message: str) -> None:
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_resume_without_state(tmp_path: Path) -> None:
    (tmp_path / "inv.py").write_text('docker_hosts = ["a"]\n')
    (tmp_path / "deploy.py").write_text("")
    proc = _cli("rollout", "inv.py", "deploy.py", "--resume", cwd=tmp_path)
    assert proc.returncode == 2
    assert "dockyard rollout: error: nothing to resume" in proc.stderr


def test_cli_inventory_that_raises_is_pyinfras_error_then_one_line(tmp_path: Path) -> None:
    """pyinfra loads the inventory (and shows what the inventory file raised); the rollout
    then says it stopped there, and nothing of its own is a traceback."""
    (tmp_path / "inv.py").write_text('raise RuntimeError("no lab is running")\n')
    (tmp_path / "deploy.py").write_text("")
    proc = _cli("rollout", "inv.py", "deploy.py", cwd=tmp_path)
    assert proc.returncode == 2
    assert "no lab is running" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == (
        "dockyard rollout: error: pyinfra could not load the inventory inv.py (exit 1; its error "
        "is above)"
    )
    assert "dockyard_deploys" not in proc.stderr


def test_the_control_machine_cli_hands_other_commands_to_the_core() -> None:
    proc = _cli("lab", "up")
    assert proc.returncode == 2
    assert "the lab is not part of the core" in proc.stderr
    assert "rollout" in _cli("--help").stdout
    usage = _cli("rollout", "--help")  # its help text used to crash on the default's '%'
    assert usage.returncode == 0 and "canary,25%,100%" in usage.stdout, usage.stderr


@pytest.mark.parametrize("argv", [["rollout"], ["rollout", "--dry", "inv.py", "deploy.py"]])
def test_the_core_cli_says_rollouts_run_on_the_control_machine(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Hosts install the core alone: `dockyard rollout` there is one line saying where it runs."""
    from dockyard import cli as core_cli

    assert core_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "rollouts run on the control machine" in err
    assert "pip install 'dockyard[deploy]'" in err


# --- --group and --data (the receiver's staging rollout) ----------------------------------------

RELEASE = "reg:5443/dockyard/release@sha256:" + "a" * 64
STAGING_DATA = f'docker_release_images=["{RELEASE}"]'


def _staging_fleet() -> FakeFleet:
    """The fake fleet with a `staging` group of d2 (bookworm) and d4 (trixie)."""
    fleet = FakeFleet()
    for item in fleet.inventory:
        if item["name"] in ("d2", "d4"):
            item["groups"] = [*item["groups"], "staging"]
    return fleet


def test_group_rolls_out_only_its_hosts_and_gates_only_them(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = _staging_fleet()
    code, result = _run(fleet, "--group", "staging", "--data", STAGING_DATA, capsys=capsys)
    assert code == 0, result
    # tiers and waves as usual among the group's hosts: one canary per release, here both
    assert [(w["name"], w["hosts"]) for w in result["waves"]] == [("docker-1", ["d2", "d4"])]
    assert fleet.deploy_calls() == [["d2", "d4"]]
    # the gates run on the group alone: no canary push from the registry host, no canary pull
    assert fleet.gate_calls() == [
        {"gate_hosts": ["d2", "d4"], "pull_hosts": [], "push_canary": False, "limit": ["d2", "d4"]}
    ]
    # --data goes to every pyinfra run: the inventory, the deploy and the gates
    with_data = [c for c in fleet.calls if "--data" in c]
    assert len(with_data) == len(fleet.calls) == 3
    for call in fleet.calls:
        assert call[call.index("--data") + 1] == STAGING_DATA
    assert result["waves"][0]["checks"]["d2"] == ["engine", "mounts", "release"]


def test_group_with_the_release_gate_failing_stops_the_rollout(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = _staging_fleet()
    fleet.gate_fail = {"d4": ["release"]}
    code, result = _run(fleet, "--group", "staging", "--data", STAGING_DATA, capsys=capsys)
    assert code == 1 and result["waves"][0]["failures"] == {"d4": ["release"]}
    state = json.loads(Path(result["state"]).read_text())
    assert state["group"] == "staging" and state["data"] == [STAGING_DATA]
    # its state is apart from the whole fleet's rollout of the same inventory and deploy
    assert Path(result["state"]) != rollout.state_path("inventory.py", "deploy.py")
    assert Path(result["state"]) == rollout.state_path("inventory.py", "deploy.py", group="staging")
    # --resume runs with the stopped rollout's --data, and refuses other data
    fleet.gate_fail = {}
    fleet.calls.clear()
    code, result = _run(fleet, "--group", "staging", "--resume", capsys=capsys)
    assert code == 0 and all(c[c.index("--data") + 1] == STAGING_DATA for c in fleet.calls)
    fleet.gate_fail = {"d4": ["release"]}
    assert _run(fleet, "--group", "staging", "--data", STAGING_DATA, capsys=capsys)[0] == 1
    assert (
        rollout.main(
            ["inventory.py", "deploy.py", "--group", "staging", "--resume", "--data", "x=1"],
            runner=fleet,
        )
        == 2
    )
    assert "differs from the stopped rollout's" in capsys.readouterr().err


def test_a_group_with_the_registry_keeps_the_canary_gates(project: Path) -> None:
    fleet = FakeFleet()
    for item in fleet.inventory:
        if item["name"] in ("reg", "d1"):
            item["groups"] = [*item["groups"], "canaries"]
    assert rollout.main(["inventory.py", "deploy.py", "--group", "canaries"], runner=fleet) == 0
    assert fleet.deploy_calls() == [["reg"], ["d1"]]
    gates = fleet.gate_calls()
    assert gates[0]["push_canary"] is True and gates[1]["pull_hosts"] == ["d1"]


def test_an_unknown_group_and_bad_data_are_refused(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = FakeFleet()
    assert rollout.main(["inventory.py", "deploy.py", "--group", "staging"], runner=fleet) == 2
    err = capsys.readouterr().err
    assert "--group staging: the inventory inventory.py has no host in that group" in err
    assert "its groups: docker_hosts, registry, storage" in err
    assert rollout.main(["inventory.py", "deploy.py", "--data", "no-equals"], runner=fleet) == 2
    assert "--data 'no-equals' is not valid; valid: KEY=VALUE" in capsys.readouterr().err
    assert fleet.calls == [["--json", "inventory.py", "debug-inventory"]]


def test_release_gate(tmp_path: Path) -> None:
    other = "reg:5443/dockyard/release@sha256:" + "b" * 64
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    # a fake engine that has RELEASE only (RepoDigests printed one per line)
    docker.write_text(
        "#!/bin/sh\n"
        f'for a; do last="$a"; done\n[ "$last" = "{RELEASE}" ] || exit 1\n'
        f'echo "{RELEASE}"\necho "reg:5443/dockyard/release@sha256:{"c" * 64}"\n'
    )
    docker.chmod(0o755)
    ok = _sh(rollout_gates.release_command([RELEASE]), bin_dir)
    assert ok.returncode == 0 and "release images present" in ok.stdout, ok.stderr
    missing = _sh(rollout_gates.release_command([RELEASE, other]), bin_dir)
    assert missing.returncode == 1
    assert f"dockyard gate release: {other} is not on this host" in missing.stderr
    assert RELEASE not in missing.stderr
    assert rollout_gates.gate_of("x | dockyard gate release: y") == "release"


def test_release_images_are_references_by_digest() -> None:
    from dockyard_deploys.receiver import ReleaseSettings
    from dockyard_deploys.settings import SettingsError

    assert ReleaseSettings.from_data({}).images == ()
    assert ReleaseSettings.from_data({"docker_release_images": [RELEASE, RELEASE]}).images == (
        RELEASE,
    )
    for bad in (["reg:5443/dockyard/release:staging"], ["dockyard/release@sha256:" + "a" * 64]):
        with pytest.raises(SettingsError, match="docker_release_images=.* is not valid"):
            ReleaseSettings.from_data({"docker_release_images": bad})


def test_cli_help_names_group_and_data() -> None:
    usage = _cli("rollout", "--help")
    assert "--group NAME" in usage.stdout and "--data KEY=VALUE" in usage.stdout
