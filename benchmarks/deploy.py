"""Deploy benchmark: on fresh container-only labs of each size (`--sizes`, default 1,6,12 Docker
hosts; its own lab, DOCKYARD_LAB_NAME=dockyard-bench), the first `pyinfra --json inventory/lab.py
deploy.py -y`, the second (no-change) one `--repeat` times, and a no-change `dockyard rollout
inventory/lab.py deploy.py --json` with its waves, timed end to end as users run them; printed
with the growth from the smallest size and the physical limit beside each run: the control
process tree's CPU (os.times() of children), the lab containers' CPU (their cgroups), the whole
machine's busy CPU (/proc/stat) against wall time × CPUs, and the load average.

"Where the time goes" for every no-change deploy: pyinfra's phases (start-up and inventory,
connect, prepare, execute) from its stage changes, the remote commands and uploads per host, the
operations that take the most of the execute phase (serial ones marked), and with `--profile`
(default on) one more, profiled, no-change run per size: the control CPU by package (cProfile).
pyinfra runs in a child process of this script (`--probe`, pyinfra's own CLI in-process with
counters); nothing but the lab's containers is contacted.

The deploys run from a copy of the checkout taken at the start (`--tree DIR`: a directory as is);
`--compare DIR` alternates no-change deploys from a second tree on the same lab (before/after);
`--keep-lab` leaves the last lab up and `--reuse-lab` measures a running, deployed one.

Usage: python benchmarks/deploy.py [--sizes 1,6,12] [--repeat 2] [--no-profile] [--no-rollout]
    [--tree DIR] [--compare DIR] [--keep-lab | --reuse-lab] [--log FILE]"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Optional

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LAB_NAME = "dockyard-bench"
ENV = {**os.environ, "DOCKYARD_LAB_NAME": LAB_NAME, "PYTHONUNBUFFERED": "1"}
# The tree every deploy, rollout and lab command runs from (working directory and PYTHONPATH):
# by default a copy of the checkout made when the benchmark starts (main() sets it), so edits
# made to the checkout during a long run do not change what is measured.
TREE: list[Path] = [ROOT]
# A second tree (`--compare`) whose no-change deploys alternate with TREE's on the same lab.
COMPARE: list[Path] = []
# Bound on one pyinfra run or rollout; a first deploy installs the engine from Debian everywhere.
TIMEOUT = 1800
CPUS = os.cpu_count() or 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
# pyinfra's stages, in order (pyinfra.api.state.StateStage names), as the probe records them.
PHASES = ("Connect", "Prepare", "Execute", "Disconnect")
# Operations shown per no-change deploy, and profile rows per size.
TOP_OPS = 6
TOP_PACKAGES = 8


# --- the probe: pyinfra's CLI in this child process, with counters ------------------------------


def probe(stats_path: str, profile_path: Optional[str], args: list[str]) -> None:
    """Run pyinfra's CLI (`pyinfra ARGS`) in this process and write to `stats_path`: the time of
    each stage change, per host the shell commands (facts apart) and uploads, per operation its
    execute wall time, whether it is serial and its commands; with `profile_path`, a cProfile of
    the whole run."""
    import pyinfra_cli  # noqa: F401  (gevent's monkey patching comes first)
    from pyinfra.api import facts as pyinfra_facts
    from pyinfra.api import operations as pyinfra_operations
    from pyinfra.api.host import Host
    from pyinfra.api.state import State
    from pyinfra_cli.main import main as pyinfra_main

    start = time.time()
    stages: dict[str, float] = {}
    hosts: dict[str, dict[str, int]] = {}
    ops: dict[str, dict[str, Any]] = {}
    names: dict[str, str] = {}
    state_ref: list[Any] = []

    def op_name(op_hash: Optional[str]) -> str:
        if op_hash is None:
            return "(outside operations)"
        if op_hash not in names and state_ref:
            meta = state_ref[0].get_op_meta(op_hash)
            names[op_hash] = ", ".join(sorted(meta.names)) or op_hash
        return names.get(op_hash, op_hash)

    def op_stats(op_hash: Optional[str]) -> dict[str, Any]:
        return ops.setdefault(
            op_name(op_hash),
            {"seconds": 0.0, "serial": False, "commands": 0, "facts": 0, "uploads": 0},
        )

    def host_stats(host: Any) -> dict[str, int]:
        return hosts.setdefault(host.name, {"commands": 0, "facts": 0, "uploads": 0})

    set_stage = State.set_stage

    def timed_set_stage(self: Any, stage: Any) -> None:
        if not state_ref:
            state_ref.append(self)
        stages[stage.name] = time.time() - start
        set_stage(self, stage)

    run_shell_command = Host.run_shell_command

    def counted_shell(self: Any, *a: Any, **kw: Any) -> Any:
        host_stats(self)["commands"] += 1
        op_stats(self.executing_op_hash)["commands"] += 1
        return run_shell_command(self, *a, **kw)

    put_file = Host.put_file

    def counted_put(self: Any, *a: Any, **kw: Any) -> Any:
        host_stats(self)["uploads"] += 1
        op_stats(self.executing_op_hash)["uploads"] += 1
        return put_file(self, *a, **kw)

    get_fact = pyinfra_facts._get_fact

    def counted_fact(state: Any, host: Any, *a: Any, **kw: Any) -> Any:
        host_stats(host)["facts"] += 1
        op_stats(host.executing_op_hash)["facts"] += 1
        return get_fact(state, host, *a, **kw)

    run_single_op = pyinfra_operations._run_single_op

    def timed_single_op(state: Any, op_hash: str) -> None:
        began = time.monotonic()
        try:
            run_single_op(state, op_hash)
        finally:
            entry = op_stats(op_hash)
            entry["seconds"] += time.monotonic() - began
            entry["serial"] = bool(state.get_op_meta(op_hash).global_arguments["_serial"])

    State.set_stage = timed_set_stage  # type: ignore[method-assign]
    Host.run_shell_command = counted_shell  # type: ignore[method-assign]
    Host.put_file = counted_put  # type: ignore[method-assign]
    pyinfra_facts._get_fact = counted_fact
    pyinfra_operations._run_single_op = timed_single_op
    sys.argv = ["pyinfra", *args]
    profiler = None
    if profile_path:
        import cProfile

        profiler = cProfile.Profile(time.process_time)  # CPU, not the hub's waits
        profiler.enable()
    try:
        pyinfra_main()
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(profile_path))
        stages["end"] = time.time() - start
        Path(stats_path).write_text(
            json.dumps({"start": start, "stages": stages, "hosts": hosts, "ops": ops})
        )


# --- the tree measured ---------------------------------------------------------------------------


def snapshot(dest: Path) -> Path:
    """Copy the checkout's files as they are now (tracked and untracked, not ignored; symlinks as
    symlinks) into `dest`."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in sorted(set(filter(None, names.split("\0")))):
        src, target = ROOT / name, dest / name
        if not (src.is_symlink() or src.is_file()):
            continue  # deleted in the working tree
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, target)
    return dest


def _env(tree: Optional[Path] = None) -> dict[str, str]:
    return {**ENV, "PYTHONPATH": str(tree or TREE[0])}


# --- measuring a run ----------------------------------------------------------------------------


def _proc_stat_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (every CPU: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / CLK_TCK


def _lab_container_ids() -> list[str]:
    proc = subprocess.run(
        ["docker", "ps", "--no-trunc", "--filter", f"name=^{LAB_NAME}-", "--format", "{{.ID}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.split()


def _lab_cpu(ids: Sequence[str]) -> float:
    """CPU seconds the lab containers (their cgroups: sshd, shells, docker, apt...) have used."""
    total = 0
    for cid in ids:
        for path in (
            f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage",
            f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat",
        ):
            try:
                text = Path(path).read_text()
            except OSError:
                continue
            if path.endswith("cpu.stat"):  # cgroup v2: usage_usec
                total += int(text.split()[1]) * 1000
            else:
                total += int(text)
            break
    return total / 1e9


@dataclass
class Run:
    """One timed command: wall seconds, the CPU it and the machine used, and what it printed."""

    label: str
    wall: float
    control_cpu: float
    lab_cpu: float
    machine_busy: float
    load1: float
    returncode: int
    stdout: str
    stderr_lines: list[tuple[float, str]]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def saturation(self) -> float:
        """Share of the machine's CPU capacity (wall × CPUs) that was busy during the run."""
        return self.machine_busy / (self.wall * CPUS) if self.wall else 0.0


def _timed(label: str, cmd: list[str], log: Optional[IO[str]], tree: Optional[Path] = None) -> Run:
    """Run `cmd` in `tree` (default TREE), its stderr lines timestamped (and copied to `log`)."""
    tree = tree or TREE[0]
    ids = _lab_container_ids()
    lines: list[tuple[float, str]] = []
    before_children = os.times()
    before_busy, before_lab = _proc_stat_busy(), _lab_cpu(ids)
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=tree, env=_env(tree), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read() if proc.stdout else ""))
    reader.start()
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append((time.monotonic() - start, line.rstrip("\n")))
        if log is not None:
            log.write(line)
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader.join()
    wall = time.monotonic() - start
    after_children = os.times()
    control = (after_children.children_user - before_children.children_user) + (
        after_children.children_system - before_children.children_system
    )
    return Run(
        label=label,
        wall=wall,
        control_cpu=control,
        lab_cpu=_lab_cpu(ids) - before_lab,
        machine_busy=_proc_stat_busy() - before_busy,
        load1=os.getloadavg()[0],
        returncode=proc.returncode,
        stdout="".join(out),
        stderr_lines=lines,
    )


def _deploy(
    label: str, log: Optional[IO[str]], profile: Optional[str] = None, tree: Optional[Path] = None
) -> Run:
    """One `pyinfra --json inventory/lab.py deploy.py -y` from `tree`, through the probe."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        stats_path = tmp.name
    cmd = [sys.executable, __file__, "--probe", stats_path]
    if profile:
        cmd += ["--probe-profile", profile]
    cmd += ["--", "--json", "inventory/lab.py", "deploy.py", "-y"]
    if log is not None:
        log.write(f"\n===== {label}: pyinfra --json inventory/lab.py deploy.py -y ({tree})\n")
    run = _timed(label, cmd, log, tree)
    try:
        run.stats = json.loads(Path(stats_path).read_text())
    except (OSError, ValueError):
        run.stats = {}
    finally:
        Path(stats_path).unlink(missing_ok=True)
    if run.returncode != 0:
        tail = "\n".join(line for _, line in run.stderr_lines[-40:])
        sys.exit(f"{label} failed (exit {run.returncode}):\n{tail}")
    return run


def _totals(run: Run) -> dict[str, int]:
    return dict(json.loads(run.stdout)["results"]["totals"])


def _rollout(log: Optional[IO[str]]) -> Run:
    """A no-change `dockyard rollout inventory/lab.py deploy.py --json`, waves timed from its
    progress lines."""
    if log is not None:
        log.write("\n===== rollout: dockyard rollout inventory/lab.py deploy.py --json\n")
    cmd = [str(BIN / "dockyard"), "rollout", "inventory/lab.py", "deploy.py", "--json"]
    run = _timed("rollout", cmd, log)
    if run.returncode != 0:
        tail = "\n".join(line for _, line in run.stderr_lines[-40:])
        sys.exit(f"the rollout failed (exit {run.returncode}):\n{tail}")
    return run


def _lab(*args: str) -> float:
    start = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "dockyard-lab"), *args],
        cwd=TREE[0],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"dockyard-lab {' '.join(args)} failed:\n{proc.stderr}")
    return time.monotonic() - start


# --- analysis -----------------------------------------------------------------------------------


def phases(run: Run) -> dict[str, float]:
    """Seconds per pyinfra phase: start-up (interpreter, config, inventory), connect, prepare
    (deploy.py per host), execute, and the rest (results, disconnect, exit)."""
    stages = run.stats.get("stages", {})
    if not all(name in stages for name in ("Connect", "Prepare", "Execute", "end")):
        return {}
    return {
        "start-up": stages["Connect"],
        "connect": stages["Prepare"] - stages["Connect"],
        "prepare": stages["Execute"] - stages["Prepare"],
        "execute": stages.get("Disconnect", stages["end"]) - stages["Execute"],
        "rest": max(0.0, run.wall - stages.get("Disconnect", stages["end"])),
    }


def per_host(run: Run) -> tuple[int, int, int, int]:
    """(min, max) shell commands per host (facts included) and (min, max) facts per host."""
    hosts = run.stats.get("hosts", {}).values()
    if not hosts:
        return 0, 0, 0, 0
    cmds = [h["commands"] for h in hosts]
    facts = [h["facts"] for h in hosts]
    return min(cmds), max(cmds), min(facts), max(facts)


def top_ops(run: Run, count: int = TOP_OPS) -> list[tuple[str, dict[str, Any]]]:
    ops = run.stats.get("ops", {})
    timed = [(name, v) for name, v in ops.items() if v["seconds"] > 0]
    return sorted(timed, key=lambda item: -item[1]["seconds"])[:count]


def profile_by_package(path: str) -> tuple[float, list[tuple[str, float]]]:
    """(total own time, [(package, own seconds)]) of a cProfile dump, grouped by package."""
    import pstats

    stats: Any = pstats.Stats(path)
    groups: dict[str, float] = {}
    total = 0.0
    for (filename, _, func), (_, _, tottime, _, _) in stats.stats.items():
        total += tottime
        match = re.search(r"site-packages/([A-Za-z0-9_]+)", filename)
        if match:
            group = match.group(1)
        elif "dockyard" in filename and "site-packages" not in filename:
            group = "dockyard (checkout)"
        elif filename == "~":
            group = f"C code: {func[:60]}"
        else:
            group = "stdlib"
        groups[group] = groups.get(group, 0.0) + tottime
    ranked = sorted(groups.items(), key=lambda item: -item[1])
    return total, ranked


def rollout_waves(run: Run) -> list[dict[str, Any]]:
    """The JSON's waves with seconds of deploy and gates from the progress lines' timestamps."""
    try:
        waves = list(json.loads(run.stdout)["waves"])
    except (ValueError, KeyError):
        return []
    marks: list[tuple[float, str, str]] = []
    for at, line in run.stderr_lines:
        match = re.match(r"--> Wave \d+/\d+ (\S+) ", line)
        if match:
            marks.append((at, match.group(1), "start"))
        match = re.match(r"--> Health gates of wave (\S+)", line)
        if match:
            marks.append((at, match.group(1), "gates"))
        match = re.match(r"--> Wave (\S+) (passed|failed)", line)
        if match:
            marks.append((at, match.group(1), "end"))
    times: dict[str, dict[str, float]] = {}
    for at, name, kind in marks:
        times.setdefault(name, {})[kind] = at
    for wave in waves:
        t = times.get(wave["name"], {})
        if {"start", "gates", "end"} <= t.keys():
            wave["deploy_s"] = t["gates"] - t["start"]
            wave["gates_s"] = t["end"] - t["gates"]
    return waves


# --- the benchmark ------------------------------------------------------------------------------


@dataclass
class SizeResult:
    hosts: int
    first: Optional[Run]
    second: list[Run]
    compared: list[Run]
    rollout: Optional[Run]
    profile: Optional[str]
    profiled: Optional[Run]

    @property
    def best_second(self) -> Run:
        return min(self.second, key=lambda run: run.wall)

    @property
    def best_compared(self) -> Optional[Run]:
        return min(self.compared, key=lambda run: run.wall) if self.compared else None


def _limit(run: Run) -> str:
    return (
        f"{run.control_cpu:7.1f} {run.lab_cpu:7.1f} {run.machine_busy:7.1f} "
        f"{100 * run.saturation:5.0f}% {run.load1:5.2f}"
    )


def report(results: list[SizeResult], out: IO[str]) -> None:
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    base = results[0]
    say(
        f"machine: {CPUS} CPUs shared by the control process and every lab container; "
        f"wall x{base.hosts} = growth from {base.hosts} host(s); ctl = pyinfra's process tree "
        "CPU-s, lab = the lab containers' CPU-s, busy = the machine's busy CPU-s (/proc/stat, "
        f"other work included), % = busy / (wall x {CPUS} CPUs), load = 1-min load average"
    )
    say(
        f"{'hosts':>5} {'run':<14} {'wall s':>7} {'growth':>7} {'ops':>5} {'changed':>7} "
        f"{'ctl':>7} {'lab':>7} {'busy':>7} {'%':>6} {'load':>5}"
    )

    def row(hosts: int, name: str, run: Run, base_run: Run, totals: Optional[dict[str, int]]):
        ops = f"{totals['hosts']:5} {totals['success']:7}" if totals else f"{'':5} {'':7}"
        say(
            f"{hosts:>5} {name:<14} {run.wall:7.1f} {run.wall / base_run.wall:6.2f}x {ops} "
            + _limit(run)
        )

    for r in results:
        if r.first is not None:
            row(r.hosts, "first deploy", r.first, base.first or r.first, _totals(r.first))
        for i, run in enumerate(r.second):
            row(r.hosts, f"no-change #{i + 1}", run, base.best_second, _totals(run))
        for i, run in enumerate(r.compared):
            row(r.hosts, f"compare #{i + 1}", run, base.best_second, _totals(run))
        if r.rollout is not None and base.rollout is not None:
            row(r.hosts, "rollout", r.rollout, base.rollout, None)
    say()
    last = results[-1]
    for r in results[1:]:
        say(
            f"growth {r.hosts} hosts / {base.hosts}:"
            + (f" first {r.first.wall / base.first.wall:.2f}x," if r.first and base.first else "")
            + f" no-change (best) {r.best_second.wall / base.best_second.wall:.2f}x"
            + (
                f", rollout {r.rollout.wall / base.rollout.wall:.2f}x"
                if r.rollout and base.rollout
                else ""
            )
        )
    for r in results:
        b = r.best_compared
        if b is not None:
            say(
                f"compare {r.hosts} hosts, best no-change: {b.wall:.1f} s from {COMPARE[0]} vs "
                f"{r.best_second.wall:.1f} s from {TREE[0]}: {b.wall / r.best_second.wall:.2f}x"
            )
    if last is not base and base.hosts == 1 and last.hosts == 12:
        ratio = last.best_second.wall / base.best_second.wall
        say(
            f"target: no-change deploy of 12 hosts < 3x 1 host: {ratio:.2f}x "
            + ("met" if ratio < 3 else "NOT met")
            + " (pyinfra's own benchmark: 1.27 s -> 2.24 s, 1.76x, from 1 to 25 hosts)"
        )
    say()
    say("where the time goes, no-change deploys (seconds; commands = remote shell commands,")
    say("facts included, per host min-max; uploads in all):")
    say(
        f"{'hosts':>5} {'run':<12} {'start-up':>8} {'connect':>8} {'prepare':>8} {'execute':>8} "
        f"{'rest':>6} {'cmds/host':>10} {'facts/host':>10} {'uploads':>7} {'ctl CPU/wall':>12}"
    )
    for r in results:
        labelled = [(f"#{i + 1}", run) for i, run in enumerate(r.second)]
        labelled += [(f"compare #{i + 1}", run) for i, run in enumerate(r.compared)]
        for label, run in labelled:
            ph = phases(run)
            lo, hi, flo, fhi = per_host(run)
            uploads = sum(h["uploads"] for h in run.stats.get("hosts", {}).values())
            say(
                f"{r.hosts:>5} {label:<12} "
                + " ".join(
                    f"{ph.get(k, 0.0):8.1f}" for k in ("start-up", "connect", "prepare", "execute")
                )
                + f" {ph.get('rest', 0.0):6.1f} {f'{lo}-{hi}':>10} {f'{flo}-{fhi}':>10} "
                f"{uploads:7} {run.control_cpu / run.wall:11.2f}"
            )
    best = [("best no-change run", r.hosts, r.best_second) for r in results]
    best += [("best compare run", r.hosts, r.best_compared) for r in results if r.best_compared]
    for what, hosts, run in best:
        execute = phases(run).get("execute", 0.0)
        say(f"{hosts} host(s), {what}: operations taking the most of execute ({execute:.1f} s):")
        for name, v in top_ops(run):
            share = 100 * v["seconds"] / execute if execute else 0.0
            say(
                f"    {v['seconds']:6.2f} s {share:4.0f}%  {'serial ' if v['serial'] else ''}"
                f"{name[:70]} [{v['commands']} cmds, {v['facts']} facts, {v['uploads']} uploads]"
            )
    for r in results:
        if not (r.profile and r.profiled):
            continue
        total, ranked = profile_by_package(r.profile)
        say(
            f"{r.hosts} host(s), profiled no-change run ({r.profiled.wall:.1f} s wall under "
            f"cProfile, {r.profiled.control_cpu:.1f} CPU-s): control CPU by package, own time:"
        )
        for group, seconds in ranked[:TOP_PACKAGES]:
            say(f"    {seconds:6.2f} s {100 * seconds / total if total else 0:4.0f}%  {group}")
    if any(r.rollout for r in results):
        say()
        say("no-change rollouts: waves (deploy s + gates s)")
        for r in results:
            if r.rollout is None:
                continue
            waves = rollout_waves(r.rollout)
            parts = [
                f"{w['name']}[{len(w['hosts'])}] "
                f"{w.get('deploy_s', 0):.1f}+{w.get('gates_s', 0):.1f}"
                for w in waves
            ]
            say(
                f"{r.hosts:>5} hosts, {len(waves)} waves, {r.rollout.wall:.1f} s: "
                + ", ".join(parts)
            )


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="1,6,12", help="comma-separated lab sizes (default: 1,6,12)"
    )
    parser.add_argument(
        "--repeat", type=int, default=2, help="no-change deploys per size (default 2)"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled runs")
    parser.add_argument("--no-rollout", action="store_true", help="skip the rollouts")
    parser.add_argument("--log", help="also write every run's pyinfra progress to this file")
    parser.add_argument(
        "--tree",
        help="run the deploys from this directory as it is (default: a copy of the checkout)",
    )
    parser.add_argument(
        "--compare",
        help="a second tree: its no-change deploys alternate with the tree's on each lab",
    )
    parser.add_argument(
        "--reuse-lab",
        action="store_true",
        help="use the running, deployed lab (one size): no lab up, no first deploy",
    )
    parser.add_argument("--keep-lab", action="store_true", help="leave the last lab up")
    opts = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in opts.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be comma-separated numbers, got {opts.sizes!r}")
    if not sizes or min(sizes) < 1 or opts.repeat < 1:
        parser.error("--sizes needs numbers >= 1 and --repeat at least 1")
    if opts.reuse_lab and len(sizes) != 1:
        parser.error("--reuse-lab takes one size (the running lab's)")
    log = open(opts.log, "a") if opts.log else None  # noqa: SIM115
    profile_dir = Path(tempfile.mkdtemp(prefix="dockyard-bench-"))
    TREE[0] = Path(opts.tree).resolve() if opts.tree else snapshot(profile_dir / "tree")
    if opts.compare:
        COMPARE.append(Path(opts.compare).resolve())
    print(f"--> deploying from {TREE[0]}", file=sys.stderr, flush=True)
    results: list[SizeResult] = []

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        for hosts in sizes:
            first = None
            if not opts.reuse_lab:
                _lab("down")
                lab_up = _lab("up", "--topology", "containers", "--hosts", str(hosts))
                note(f"--> {hosts} host(s): lab up in {lab_up:.0f} s")
                first = _deploy(f"{hosts} hosts, first deploy", log)
                note(f"    first deploy {first.wall:.1f} s")
            second: list[Run] = []
            compared: list[Run] = []
            for i in range(opts.repeat):
                for tree, runs, what in [(TREE[0], second, "no-change")] + [
                    (c, compared, "compare") for c in COMPARE
                ]:
                    runs.append(_deploy(f"{hosts} hosts, {what} deploy #{i + 1}", log, tree=tree))
                    changed = _totals(runs[-1])["success"]
                    note(f"    {what} deploy #{i + 1} {runs[-1].wall:.1f} s ({changed} changed)")
            profile = profiled = None
            if not opts.no_profile:
                profile = str(profile_dir / f"{hosts}.prof")
                profiled = _deploy(f"{hosts} hosts, profiled no-change deploy", log, profile)
            rollout = None if opts.no_rollout else _rollout(log)
            if rollout is not None:
                note(f"    rollout {rollout.wall:.1f} s")
            results.append(SizeResult(hosts, first, second, compared, rollout, profile, profiled))
            if hosts != sizes[-1]:  # what is measured so far, in case a later size fails
                print(f"===== results so far ({', '.join(str(r.hosts) for r in results)})")
                report(results, sys.stdout)
                print(flush=True)
    finally:
        if not opts.keep_lab:
            _lab("down")
        if log is not None:
            log.close()
    print(f"===== results ({', '.join(str(r.hosts) for r in results)} hosts)")
    report(results, sys.stdout)
    shutil.rmtree(profile_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        rest = sys.argv[2:]
        stats = rest.pop(0)
        prof = None
        if rest[:1] == ["--probe-profile"]:
            prof = rest[1]
            rest = rest[2:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        probe(stats, prof, rest)
        sys.exit(0)
    sys.exit(main())
