"""Turning measurements into the summary table, the target verdicts and the JSON file."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvtwist.bench.plan import AGAINST_MEMORY, AGAINST_PLAIN, AGAINST_TREE, FLOOR, Scenario, Target
from kvtwist.bench.runner import Measurement
from kvtwist.bench.servers import (
    FLOOR_OF, REDIS_COUNTERPART, baselineKind, inMemoryKind, installedSource, runsBaselineTree, treeSource, withoutMetricsKind,
)
from kvtwist.bench.stats import median, pairedRatios

# The per-round figures a Row summarises, by the name targets use.
METRICS = {
    "rps": lambda m: m.rps,
    "cpu": lambda m: m.cpu,
    "p99": lambda m: m.p99,
    "rssPerKey": lambda m: m.rssPerKey,
    "memPerConnection": lambda m: m.memPerConnection,
}
# Taken from the first round only: it is the one where the server had never
# held that many connections, so later rounds reuse memory and look free.
FIRST_ROUND_ONLY = {"memPerConnection"}


@dataclass
class Row:
    """One server in one scenario: medians over rounds, and median ratios against its baseline."""

    scenario: str
    title: str
    server: str
    rounds: int
    medians: dict[str, float]
    ratios: dict[str, float]  # empty when there is no baseline in the run
    against: str = ""  # the server kind the ratios are taken against
    # The ratio of each round, whose median ``ratios`` holds: verdicts need to
    # know whether the rounds agree.
    roundRatios: dict[str, list[float]] = field(default_factory=dict)
    # The same against the floor on this server's interpreter, when a target needs it.
    floor: str = ""
    floorRatios: dict[str, list[float]] = field(default_factory=dict)


MET, NOT_MET, UNCERTAIN = "met", "NOT met", "uncertain"
# Fewer rounds than this cannot show whether a verdict would hold.
MIN_ROUNDS = 3


@dataclass
class Verdict:
    """A target judged on one row: ``outcome`` is met or NOT met only when every round agrees."""

    scenario: str
    server: str
    target: str
    ratio: float  # the median of the per-round ratios
    outcome: str  # MET, NOT_MET or UNCERTAIN
    roundsMet: int
    rounds: int


def judge(target: Target, roundRatios: Sequence[float]) -> tuple[str, int]:
    """
    The outcome of ``target`` over the rounds' ratios, and in how many rounds it was met.

    A median can land on either side of a threshold from one run to the
    next when the rounds disagree, so then the outcome is uncertain.
    """
    metIn = sum(1 for ratio in roundRatios if target.met(ratio))
    if len(roundRatios) < MIN_ROUNDS or 0 < metIn < len(roundRatios):
        return UNCERTAIN, metIn
    return (MET if metIn else NOT_MET), metIn


def againstOf(scenario: Scenario, server: str) -> str:
    """The server kind whose figures ``server``'s are divided by in ``scenario``; "" for none."""
    if scenario.against == AGAINST_TREE:
        return "" if runsBaselineTree(server) else baselineKind(server)
    if scenario.against == AGAINST_PLAIN:
        plain = withoutMetricsKind(server)
        return "" if plain == server else plain
    if scenario.against == AGAINST_MEMORY:
        memory = inMemoryKind(server)
        return "" if memory == server else memory
    if server.startswith("twisted-floor"):
        # The floor is shown beside the Redis of its scenario.
        return next((kind for kind in scenario.servers if kind.startswith("redis")), "")
    return REDIS_COUNTERPART.get(server, "")


def _againstName(kind: str) -> str:
    return "Redis" if kind.startswith("redis") else kind


def _byRound(measurements: Sequence[Measurement], scenario: str, server: str) -> list[Measurement]:
    return sorted((m for m in measurements if m.scenario == scenario and m.server == server), key=lambda m: m.round)


def _series(name: str, f, mine: Sequence[Measurement], base: Sequence[Measurement]):  # type: ignore[no-untyped-def]
    if name in FIRST_ROUND_ONLY:
        mine, base = mine[:1], base[:1]
    return [f(m) for m in mine], [f(m) for m in base]


def summarize(plan: Sequence[Scenario], measurements: Sequence[Measurement]) -> list[Row]:
    rows = []
    for scenario in plan:
        for server in scenario.servers:
            mine = _byRound(measurements, scenario.key, server)
            if not mine:
                continue
            against = againstOf(scenario, server)
            base = _byRound(measurements, scenario.key, against)
            roundRatios = {}
            if base and len(base) == len(mine):
                roundRatios = {name: pairedRatios(*_series(name, f, mine, base)) for name, f in METRICS.items()}
            ratios = {name: median(values) for name, values in roundRatios.items()}
            medians = {name: median(_series(name, f, mine, mine)[0]) for name, f in METRICS.items()}
            row = Row(scenario.key, scenario.title, server, len(mine), medians, ratios,
                      against if ratios else "", roundRatios)
            floor = _byRound(measurements, scenario.key, FLOOR_OF.get(server, ""))
            if any(t.baseline == FLOOR for t in scenario.targets) and floor and len(floor) == len(mine):
                row.floor = FLOOR_OF[server]
                row.floorRatios = {name: pairedRatios(*_series(name, f, mine, floor)) for name, f in METRICS.items()}
            rows.append(row)
    return rows


def verdicts(plan: Sequence[Scenario], rows: Sequence[Row]) -> list[Verdict]:
    """Each target of each scenario, judged on the kvtwist rows that have a baseline in the run."""
    out = []
    targets = {s.key: s.targets for s in plan}
    for row in rows:
        if not row.ratios or not row.server.startswith("kvtwist"):
            continue
        for target in targets.get(row.scenario, ()):
            if not target.appliesTo(row.server):
                continue
            if target.baseline == FLOOR:
                if not row.floorRatios:
                    continue
                roundRatios, against = row.floorRatios[target.metric], row.floor
            else:
                roundRatios, against = row.roundRatios[target.metric], _againstName(row.against)
            outcome, metIn = judge(target, roundRatios)
            out.append(Verdict(row.scenario, row.server, target.describe(against),
                               median(roundRatios), outcome, metIn, len(roundRatios)))
    return out


def _fmt(value: float, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def formatTable(rows: Sequence[Row], against: str = "Redis") -> str:
    """A Markdown table (readable as plain text too); ``against`` names what the ratios divide by."""
    header = ["scenario", "server", "rounds", "req/s", "CPU us/req", "p99 ms", "memory",
              *(f"x {against} {what}" for what in ("req/s", "CPU", "p99", "memory"))]
    lines = [header]
    for r in rows:
        if r.scenario.startswith("mem"):
            memory, memRatio = f"{_fmt(r.medians['rssPerKey'], '.0f')} B/key", r.ratios.get("rssPerKey", math.nan)
        elif r.medians["memPerConnection"] > 0 and "idle" in r.scenario:
            memory, memRatio = (
                f"{_fmt(r.medians['memPerConnection'] / 1024, '.1f')} KiB/conn (round 1)",
                r.ratios.get("memPerConnection", math.nan),
            )
        else:
            memory, memRatio = "", math.nan
        lines.append([
            r.title, r.server, str(r.rounds),
            _fmt(r.medians["rps"], ",.0f"), _fmt(r.medians["cpu"], ".1f"), _fmt(r.medians["p99"] / 1000, ".2f"),
            memory,
            _fmt(r.ratios.get("rps", math.nan), ".2f"), _fmt(r.ratios.get("cpu", math.nan), ".2f"),
            _fmt(r.ratios.get("p99", math.nan), ".2f"), _fmt(memRatio, ".2f"),
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)


def _outcome(v: Verdict) -> str:
    if v.rounds < MIN_ROUNDS:
        return f"{UNCERTAIN}: only {v.rounds} round{'s' if v.rounds != 1 else ''}"
    if v.outcome == UNCERTAIN:
        return f"{UNCERTAIN}: met in {v.roundsMet} of {v.rounds} rounds"
    return f"{MET} in all {v.rounds} rounds" if v.outcome == MET else f"{NOT_MET} in any of {v.rounds} rounds"


def formatVerdicts(items: Sequence[Verdict]) -> str:
    return "\n".join(f"- {v.server}, {v.scenario}: {v.target}: measured {v.ratio:.2f}x, {_outcome(v)}" for v in items)


def _firstLine(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def machine(serverPython: str, pypy: str | None, redis: str | None) -> dict[str, object]:
    """What the figures were measured on: they mean nothing without it."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import twisted

    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_implementation() + " " + platform.python_version(),
        "server_python": _firstLine([serverPython, "-VV"]),
        "pypy": " ".join(_firstLine([pypy, "-VV"]).split()) if pypy else "not measured",
        "pypy_twisted": _firstLine([pypy, "-c", "import twisted; print(twisted.__version__)"]) if pypy else "",
        "twisted": twisted.__version__,
        "redis": _firstLine([redis, "--version"]) if redis else "not installed",
    }


def treeVersion(directory: Path) -> str:
    """The commit a source tree is at (``-dirty`` when it has changes), for a reader to check out again."""
    try:
        result = subprocess.run(["git", "-C", str(directory), "describe", "--always", "--dirty", "--abbrev=12"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "not a git checkout"


def trees(baselineTree: Path | None) -> dict[str, str]:
    """Which commits a comparison of two trees measured; empty without one."""
    if baselineTree is None:
        return {}
    return {
        "current": treeVersion(installedSource().package.parent),
        "baseline": treeVersion(treeSource(baselineTree).package.parent),
    }


# Options whose values are paths on the machine that ran the benchmark,
# with the word the recorded command shows instead (as docs/performance.md
# writes them): a reader reruns the command with paths of their own.
_MACHINE_PATHS = {
    "--pypy": "PYPY",
    "--server-python": "PYTHON",
    "--out": "DIR",
    "--baseline-tree": "BASELINE",
    "--build-dir": "BUILD",
}


def portableCommand(argv: Sequence[str]) -> list[str]:
    """The command line as results.json records it: each path of this machine replaced by its role."""
    out: list[str] = []
    hide = None
    for arg in argv:
        if hide is not None:
            out.append(hide)
            hide = None
            continue
        option, equals, _ = arg.partition("=")
        if option in _MACHINE_PATHS:
            if equals:
                out.append(f"{option}={_MACHINE_PATHS[option]}")
            else:
                out.append(arg)
                hide = _MACHINE_PATHS[option]
            continue
        out.append(arg)
    return out


def writeJson(path: Path, **sections: object) -> None:
    def default(o: object) -> object:
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        raise TypeError(type(o).__name__)

    # One line: the histograms would make an indented file megabytes long.
    path.write_text(json.dumps(sections, separators=(",", ":"), default=default) + "\n")
