"""Command line of ``python -m kvtwist.bench``."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

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
    p.add_argument("--server-warmup", type=float, default=None,
                   help=f"unmeasured seconds of load on each new server before round 1 (default {runner.SERVER_WARMUP:g}, 0 with --quick)")
    keys = ", ".join(s.key for s in plan.fullPlan())
    p.add_argument("--only", default="", help=f"comma-separated scenario keys to run, from: {keys} (default all)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for results.json, results.md and plots")
    p.add_argument("--server-python", default=sys.executable, help="interpreter that runs kvtwist (default: this one)")
    p.add_argument("--pypy", default=None, metavar="INTERPRETER",
                   help="also measure kvtwist on this PyPy (it needs Twisted installed)")
    p.add_argument("--no-redis", action="store_true", help="do not start redis-server even if installed")
    p.add_argument("--no-durable", action="store_true", help="leave out the --fsync always comparison")
    p.add_argument("--no-plots", action="store_true", help="do not draw PNG plots")
    p.add_argument("--build-dir", type=Path, default=None, help="where to compile kvbench (default ~/.cache/kvtwist)")
    return p.parse_args(argv)


def _progress(start: float):  # type: ignore[no-untyped-def]
    def say(line: str) -> None:
        print(f"{time.monotonic() - start:6.1f}s {line}", file=sys.stderr, flush=True)

    return say


def main(argv: list[str] | None = None) -> int:
    args = parseArgs(argv)
    durable = not args.no_durable
    scenarios = (
        plan.quickPlan(durable)
        if args.quick
        else plan.fullPlan(args.rounds, args.duration, args.warmup, durable)
    )
    if args.only:
        keys = set(args.only.split(","))
        unknown = keys - {s.key for s in scenarios}
        if unknown:
            print(f"unknown scenario(s): {', '.join(sorted(unknown))}; known: "
                  f"{', '.join(s.key for s in scenarios)}", file=sys.stderr)
            return 2
        scenarios = [s for s in scenarios if s.key in keys]

    say = _progress(time.monotonic())
    try:
        kvbench = build.build("kvbench", args.build_dir)
        cserver = build.build("cserver", args.build_dir)
    except build.BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    redis = None if args.no_redis else shutil.which("redis-server")
    if redis is None:
        say("redis-server not found: measuring kvtwist alone, no ratios")
    options = servers.Options(python=args.server_python, pypy=args.pypy, redis=redis, cserver=cserver)

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
    table = report.formatTable(rows)
    print(table)
    if verdicts:
        print("\nTargets:\n" + report.formatVerdicts(verdicts))

    args.out.mkdir(parents=True, exist_ok=True)
    report.writeJson(
        args.out / "results.json",
        command=["python", "-m", "kvtwist.bench", *report.homeRelative(sys.argv[1:] if argv is None else argv)],
        machine=report.machine(args.server_python, args.pypy, redis),
        plan=ran, summary=rows, targets=verdicts, measurements=measurements,
    )
    (args.out / "results.md").write_text(table + "\n\n" + report.formatVerdicts(verdicts) + "\n")
    written = [args.out / "results.json", args.out / "results.md"]
    if not args.no_plots:
        try:
            written.append(plots.throughputByConnections(ran, rows, args.out / "throughput.png"))
            written.append(plots.latencyCdf(ran, measurements, args.out / "latency.png"))
        except plots.PlotsUnavailable as e:
            say(str(e))
    say("wrote " + ", ".join(str(p) for p in written))
    return 0
