"""Turning measurements into the summary table, the target verdicts and the JSON file."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvtwist.bench.plan import Scenario
from kvtwist.bench.runner import Measurement
from kvtwist.bench.servers import BASELINE
from kvtwist.bench.stats import median, medianRatio

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


@dataclass
class Verdict:
    scenario: str
    server: str
    target: str
    ratio: float
    met: bool


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
            base = _byRound(measurements, scenario.key, BASELINE.get(server, ""))
            ratios = {}
            if base and len(base) == len(mine):
                ratios = {name: medianRatio(*_series(name, f, mine, base)) for name, f in METRICS.items()}
            medians = {name: median(_series(name, f, mine, mine)[0]) for name, f in METRICS.items()}
            rows.append(Row(scenario.key, scenario.title, server, len(mine), medians, ratios))
    return rows


def verdicts(plan: Sequence[Scenario], rows: Sequence[Row]) -> list[Verdict]:
    """Each target of each scenario, judged on the kvtwist rows that have a Redis baseline."""
    out = []
    targets = {s.key: s.targets for s in plan}
    for row in rows:
        if not row.ratios or not row.server.startswith("kvtwist"):
            continue
        for target in targets.get(row.scenario, ()):
            ratio = row.ratios[target.metric]
            out.append(Verdict(row.scenario, row.server, target.describe(), ratio, target.met(ratio)))
    return out


def _fmt(value: float, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def formatTable(rows: Sequence[Row]) -> str:
    """A Markdown table (readable as plain text too)."""
    header = ["scenario", "server", "rounds", "req/s", "CPU us/req", "p99 ms",
              "memory", "x Redis req/s", "x Redis CPU", "x Redis p99", "x Redis memory"]
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


def formatVerdicts(items: Sequence[Verdict]) -> str:
    return "\n".join(
        f"- {v.server}, {v.scenario}: {v.target}: measured {v.ratio:.2f}x, {'met' if v.met else 'NOT met'}"
        for v in items
    )


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


def homeRelative(argv: Sequence[str]) -> list[str]:
    """The command line with the home directory written as ``~``, as a reader would type it."""
    home = str(Path.home())
    return [("~" + a[len(home):]) if a.startswith(home + os.sep) else a for a in argv]


def writeJson(path: Path, **sections: object) -> None:
    def default(o: object) -> object:
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        raise TypeError(type(o).__name__)

    # One line: the histograms would make an indented file megabytes long.
    path.write_text(json.dumps(sections, separators=(",", ":"), default=default) + "\n")
