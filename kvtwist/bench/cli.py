"""Command line of ``python -m kvtwist.bench``."""

from __future__ import annotations

import argparse
import faulthandler
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType

from kvtwist.bench import build, loadgen, plan, plots, report, runner, servers


def parseArgs(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m kvtwist.bench",
        description="Benchmark kvtwist against Redis on loopback, in interleaved rounds.",
    )
    p.add_argument("--quick", action="store_true", help="a tiny run of every scenario, to check the harness")
    p.add_argument("--rounds", type=int, default=5, help="rounds per scenario (default 5)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per round (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each round (default 1)")
    p.add_argument("--turn", type=float, default=plan.TURN,
                   help="within a round, the servers take turns of this many seconds in one kvbench run, "
                        f"until each has had --duration (default {plan.TURN:g}; 0: one server after the other)")
    p.add_argument("--server-warmup", type=float, default=None,
                   help=f"unmeasured seconds of load on each new server before round 1 (default {runner.SERVER_WARMUP:g}, 0 with --quick; "
                        f"{runner.PYPY_WARMUP_FACTOR:g} times as long on PyPy)")
    keys = ", ".join(s.key for s in plan.fullPlan(trees=True))
    p.add_argument("--only", default="", help=f"comma-separated scenario keys to run, from: {keys} (default all; "
                   f"{' and '.join(plan.TREE_KEYS)} need --baseline-tree)")
    p.add_argument("--baseline-tree", type=Path, default=None, metavar="DIR",
                   help="another checkout of kvtwist (e.g. from git worktree add): compare this kvtwist's "
                        f"in-memory throughput and CPU with that one's in {' and '.join(plan.TREE_KEYS)}")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for results.json, results.md and plots")
    p.add_argument("--server-python", default=sys.executable, help="interpreter that runs kvtwist (default: this one)")
    p.add_argument("--pypy", default=None, metavar="INTERPRETER",
                   help="also measure kvtwist on this PyPy (it needs Twisted installed)")
    p.add_argument("--no-redis", action="store_true", help="do not start redis-server even if installed")
    p.add_argument("--no-durable", action="store_true", help="leave out the --fsync always comparison")
    p.add_argument("--no-plots", action="store_true", help="do not draw PNG plots")
    p.add_argument("--build-dir", type=Path, default=None, help="where to compile kvbench (default ~/.cache/kvtwist)")
    return p.parse_args(argv)


def _results(ran: list[plan.Scenario], rows: list[report.Row], verdicts: list[report.Verdict], quick: bool) -> str:
    """The tables (against Redis; against the baseline tree; against no --metrics) and the targets."""
    against = {s.key: s.against for s in ran}
    parts = []
    redisRows = [r for r in rows if against.get(r.scenario) == plan.AGAINST_REDIS]
    if redisRows:
        parts.append(report.formatTable(redisRows))
    treeRows = [r for r in rows if against.get(r.scenario) == plan.AGAINST_TREE]
    if treeRows:
        parts.append("This tree against the baseline tree (--baseline-tree); a median throughput "
                     f"ratio under {plan.REGRESSION.threshold:g} is a regression:\n\n"
                     + report.formatTable(treeRows, against="baseline"))
    plainRows = [r for r in rows if against.get(r.scenario) == plan.AGAINST_PLAIN]
    if plainRows:
        parts.append("kvtwist with --metrics against the same kvtwist without it; what serving metrics costs:\n\n"
                     + report.formatTable(plainRows, against="plain"))
    memoryRows = [r for r in rows if against.get(r.scenario) == plan.AGAINST_MEMORY]
    if memoryRows:
        parts.append("kvtwist nodes over a remote engine against kvtwist in memory (--store):\n\n"
                     + report.formatTable(memoryRows, against="memory"))
    if quick:
        parts.append("Targets: not judged; a --quick run is far too short to tell.")
    elif verdicts:
        parts.append("Targets (met or NOT met only when every round agrees):\n" + report.formatVerdicts(verdicts))
    return "\n\n".join(parts)


def _progress(start: float):  # type: ignore[no-untyped-def]
    def say(line: str) -> None:
        print(f"{time.monotonic() - start:6.1f}s {line}", file=sys.stderr, flush=True)

    return say


class UsageError(Exception):
    """A command line that cannot run; the message says what to change."""


def _select(scenarios: list[plan.Scenario], only: str, trees: bool) -> list[plan.Scenario]:
    """The scenarios named by ``--only`` (all when empty), or UsageError."""
    if not only:
        return scenarios
    keys = set(only.split(","))
    unknown = keys - {s.key for s in scenarios}
    if unknown & set(plan.TREE_KEYS) and not trees:
        raise UsageError(f"{', '.join(sorted(unknown & set(plan.TREE_KEYS)))}: give the tree to compare "
                         "with as --baseline-tree DIR")
    if unknown:
        raise UsageError(f"unknown scenario(s): {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(s.key for s in scenarios)}")
    return [s for s in scenarios if s.key in keys]


def _exitOnTerm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """
    Run the benchmark and return the exit status.

    SIGTERM ends the run as Ctrl-C does, by an exception, so that the
    servers it started are stopped and their directories removed on the way
    out (by default it would die at once and leave them behind); the exit
    status is then 143, as for a process killed by it. SIGUSR1 writes
    every thread's stack to stderr and the run goes on: a run that seems
    stuck can be asked where it waits. Both handlers are in place only
    while ``main`` runs.
    """
    previous = signal.signal(signal.SIGTERM, _exitOnTerm)
    # The process's own stderr: faulthandler writes to a file descriptor,
    # which a replaced sys.stderr (a test's capture) may not have.
    stderr = sys.__stderr__
    if stderr is not None:
        faulthandler.register(signal.SIGUSR1, file=stderr, all_threads=True)
    try:
        return _run(argv)
    finally:
        if stderr is not None:
            faulthandler.unregister(signal.SIGUSR1)
        # None: a handler set outside Python, which cannot be put back.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _run(argv: list[str] | None) -> int:
    args = parseArgs(argv)
    durable = not args.no_durable
    trees = args.baseline_tree is not None
    scenarios = (
        plan.quickPlan(durable, trees)
        if args.quick
        else plan.fullPlan(args.rounds, args.duration, args.warmup, durable, trees, args.turn)
    )
    try:
        scenarios = _select(scenarios, args.only, trees)
        if trees:
            servers.treeSource(args.baseline_tree)
    except (UsageError, servers.ServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    say = _progress(time.monotonic())
    versions = report.trees(args.baseline_tree)
    if versions:
        say(f"comparing this kvtwist ({versions['current']}) with the baseline tree ({versions['baseline']})")
    try:
        kvbench = build.build("kvbench", args.build_dir)
        cserver = build.build("cserver", args.build_dir)
    except build.BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    redis = None if args.no_redis else shutil.which("redis-server")
    if redis is None and any(kind.startswith("redis") for s in scenarios for kind in s.servers):
        say("redis-server not found: measuring kvtwist alone, no ratios against Redis")
    options = servers.Options(python=args.server_python, pypy=args.pypy, redis=redis, cserver=cserver,
                              baselineTree=args.baseline_tree)

    serverWarmup = args.server_warmup if args.server_warmup is not None else (0.0 if args.quick else runner.SERVER_WARMUP)
    try:
        measurements = runner.runPlan(scenarios, options, kvbench, say, serverWarmup)
    except (servers.ServerError, loadgen.LoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # Scenarios as run: without the servers that were not available.
    ran = [replace(s, servers=tuple(k for k in s.servers if any(m.server == k and m.scenario == s.key for m in measurements)))
           for s in scenarios]
    rows = report.summarize(ran, measurements)
    verdicts = report.verdicts(ran, rows)
    text = _results(ran, rows, verdicts, args.quick)
    print(text)

    args.out.mkdir(parents=True, exist_ok=True)
    report.writeJson(
        args.out / "results.json",
        command=["python", "-m", "kvtwist.bench", *report.portableCommand(sys.argv[1:] if argv is None else argv)],
        machine=report.machine(args.server_python, args.pypy, redis),
        trees=versions,
        plan=ran, summary=rows, targets=verdicts, measurements=measurements,
    )
    (args.out / "results.md").write_text(text + "\n")
    written = [args.out / "results.json", args.out / "results.md"]
    if not args.no_plots:
        try:
            written.append(plots.throughputByConnections(ran, rows, args.out / "throughput.png"))
            written.append(plots.latencyCdf(ran, measurements, args.out / "latency.png"))
        except plots.PlotsUnavailable as e:
            say(str(e))
    say("wrote " + ", ".join(str(p) for p in written))
    return 0
