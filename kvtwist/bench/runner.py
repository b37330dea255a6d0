"""Running a plan: servers up, interleaved rounds, one Measurement per server per round."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, TypeVar

from kvtwist.bench import loadgen, procfs, servers
from kvtwist.bench.loadgen import Load
from kvtwist.bench.plan import Scenario

# Then each server runs the scenario's load unmeasured for this long, so
# that its caches and allocator have settled before round 1.
SERVER_WARMUP = 3.0
# A server on PyPy warms up this many times as long: its JIT compiles the
# hot paths as it finds them, and a PyPy kvtwist with --fsync always still
# served 3 to 9% more after 12 s of load than after 3 (docs/performance.md).
PYPY_WARMUP_FACTOR = 4.0
# After a load the server may still be closing its connections (10,000 of
# them in idle10k, which takes a Python server a second or more): its CPU
# is read, and the next server measured, only once it has gone quiet, so
# that one server's teardown is counted in its own CPU and never runs
# during another's round. Quiet: at most QUIET_CPU seconds of CPU in a
# QUIET_WINDOW (a tenth of a core), checked after at least _SETTLE.
_SETTLE = 0.2
QUIET_WINDOW = 0.2
QUIET_CPU = 0.02
_QUIET_TIMEOUT = 30.0


@dataclass
class Measurement:
    """One server's figures for one round of one scenario."""

    scenario: str
    server: str
    round: int
    rps: float
    p50: float  # microseconds, as are p99 and p999
    p99: float
    p999: float
    errors: int
    cpu: float  # server CPU microseconds per request
    rssBefore: int
    rssPeak: int
    rssAfter: int
    connections: int
    keys: int  # keys written by a memory scenario, else 0
    histogram: list[tuple[float, int]] = field(default_factory=list)
    pid: int = 0  # the server process measured

    @property
    def memPerConnection(self) -> float:
        return (self.rssPeak - self.rssBefore) / self.connections

    @property
    def rssPerKey(self) -> float:
        return (self.rssAfter - self.rssBefore) / self.keys if self.keys else float("nan")


Progress = Callable[[str], None]


def warmupFor(kind: str, serverWarmup: float) -> float:
    """Seconds of unmeasured load for a new server of ``kind`` (longer on PyPy, for its JIT)."""
    return serverWarmup * PYPY_WARMUP_FACTOR if servers.runsOnPypy(kind) else serverWarmup


def measure(
    group: Sequence[servers.Server], scenario: Scenario, round: int, kvbench: Path,
    rssBaselines: Mapping[int, int] | None = None,
) -> list[Measurement]:
    """
    Run the scenario's load once against each server of ``group``, in
    turns if there are several (``Load.turn``), sampling their /proc
    meanwhile. ``rssBaselines``: by pid, a server's resident bytes before it
    first opened the scenario's idle connections, which the memory per
    connection is counted from (else from the start of this load).
    """
    load = scenario.load
    before = [procfs.sample(server.pid) for server in group]
    proc = loadgen.startTurns(kvbench, load, [(server.port, server.proto) for server in group])
    peaks = [b.rss for b in before]

    def samplePeaks() -> None:
        peaks[:] = [max(peak, procfs.sample(server.pid).rss) for peak, server in zip(peaks, group)]

    results = loadgen.finishEach(
        proc, timeout=120 + len(group) * (load.warmup + load.duration), meanwhile=samplePeaks
    )
    measurements = []
    for server, start, peak, result in zip(group, before, peaks, results, strict=True):
        waitUntilQuiet(server.pid)
        after = procfs.sample(server.pid)
        baseline = (rssBaselines or {}).get(server.pid)
        measurements.append(Measurement(
            scenario=scenario.key,
            server=server.kind,
            round=round,
            rps=result.rps,
            p50=result.p50,
            p99=result.p99,
            p999=result.p999,
            errors=result.errors,
            cpu=(after.cpu - start.cpu) * 1e6 / max(result.totalRequests, 1),
            rssBefore=start.rss if baseline is None else baseline,
            rssPeak=max(peak, after.rss),
            rssAfter=after.rss,
            pid=server.pid,
            connections=load.connections + load.idle,
            keys=load.keyspace if load.fill else 0,
            histogram=result.histogram,
        ))
    return measurements


def waitUntilQuiet(pid: int, timeout: float = _QUIET_TIMEOUT) -> None:
    """Return once process ``pid`` has used at most ``QUIET_CPU`` seconds of CPU in a ``QUIET_WINDOW`` (or after ``timeout``)."""
    time.sleep(_SETTLE)
    deadline = time.monotonic() + timeout
    last = procfs.sample(pid).cpu
    while time.monotonic() < deadline:
        time.sleep(QUIET_WINDOW)
        now = procfs.sample(pid).cpu
        if now - last <= QUIET_CPU:
            return
        last = now


def _describe(m: Measurement) -> str:
    if m.keys:
        return f"{m.rssPerKey:.0f} B/key resident"
    return f"{m.rps:,.0f} req/s, {m.cpu:.1f} us CPU/req, p99 {m.p99 / 1000:.2f} ms"


T = TypeVar("T")


def prefillFor(load: Load) -> Load:
    """
    How a server's keyspace is filled before its warm-up: unmeasured, but in
    the shape of the load it is then measured under (its connections and
    depth), not in the fastest shape.

    A JIT compiles what it runs first. A PyPy kvtwist with ``--fsync
    always`` filled over 4 connections at depth 64 still served 6 to 12%
    less without pipelining, 12 to 30 seconds later, than one filled by the
    load it then served: its traces were shaped by the pipelined fill
    (docs/performance.md). Servers with no JIT are unaffected; the fill
    just takes a second or two longer.
    """
    return replace(load, fill=True, idle=0, warmup=0.0, turn=0.0)


def roundOrder(items: Sequence[T], round: int, alternate: bool) -> list[T]:
    """The order servers run in a round: always the same, or reversed in odd rounds when ``alternate``."""
    return list(reversed(items)) if alternate and round % 2 else list(items)


def runScenario(
    scenario: Scenario, options: servers.Options, kvbench: Path, progress: Progress, serverWarmup: float = SERVER_WARMUP
) -> list[Measurement]:
    """
    All rounds of one scenario. Within a round the servers take turns: in
    one kvbench run, turn by turn, when the load has a ``turn``; else one
    after the other (A B, A B, ...).
    """
    results: list[Measurement] = []

    # With idle connections: each server's resident bytes once filled and warmed, before it first opened them.
    filled: dict[int, int] = {}

    def record(group: list[servers.Server], round: int) -> None:
        for m in measure(group, scenario, round, kvbench, filled):
            results.append(m)
            progress(f"  {scenario.title} | round {round + 1}/{scenario.rounds} | {m.server}: {_describe(m)}")

    if scenario.memory:
        # Memory is measured on fresh processes, so nothing earlier inflates or hides it.
        for round in range(scenario.rounds):
            for kind in scenario.servers:
                server = servers.start(kind, options)
                try:
                    record([server], round)
                finally:
                    server.stop()
        return results

    def prime(started: list[servers.Server]) -> None:
        prefill = prefillFor(scenario.load)
        # Then the idle connections are opened once, unmeasured: a process
        # that first grows to 10,000 connections (its allocator, its
        # garbage collector's generations) does so here, as a long-running
        # server did long ago, and not in a measured round. What it grew
        # by is the memory per connection, counted from just before.
        grow = replace(scenario.load, warmup=0, duration=0.5) if scenario.load.idle else None
        for server in started:
            loadgen.finish(loadgen.start(kvbench, prefill, server.port, server.proto), timeout=300)
            seconds = warmupFor(server.kind, serverWarmup)
            if seconds:
                warm = replace(scenario.load, idle=0, warmup=0, duration=seconds)
                loadgen.finish(loadgen.start(kvbench, warm, server.port, server.proto), timeout=60 + seconds)
            if grow is not None:
                waitUntilQuiet(server.pid)
                filled[server.pid] = procfs.sample(server.pid).rss
                loadgen.finish(loadgen.start(kvbench, grow, server.port, server.proto), timeout=120)
                waitUntilQuiet(server.pid)

    def startAll() -> list[servers.Server]:
        running: list[servers.Server] = []
        try:
            for kind in scenario.servers:
                running.append(servers.start(kind, options))
            prime(running)
        except BaseException:
            for server in running:
                server.stop()
            raise
        return running

    # Either one set of servers for every round, or, with freshServers, a new set per round.
    rounds = list(range(scenario.rounds))
    for theseRounds in ([[r] for r in rounds] if scenario.freshServers else [rounds]):
        running = startAll()
        try:
            for round in theseRounds:
                order = roundOrder(running, round, scenario.alternate)
                for group in [order] if scenario.load.turn else [[server] for server in order]:
                    record(group, round)
        finally:
            for server in running:
                server.stop()
    return results


def runPlan(
    plan: list[Scenario], options: servers.Options, kvbench: Path, progress: Progress, serverWarmup: float = SERVER_WARMUP
) -> list[Measurement]:
    """Every scenario in order, skipping servers that are not available here."""
    results: list[Measurement] = []
    available = set(servers.KINDS)
    if options.redis is None:
        available -= {"redis", "redis-always", "kvtwist-redis"}
    if options.etcd is None:
        available -= {"etcd", "kvtwist-etcd"}
    if options.pypy is None:
        available = {kind for kind in available if not servers.runsOnPypy(kind)}
    if options.baselineTree is None:
        available = {kind for kind in available if not servers.runsBaselineTree(kind)}
    if not servers.kvtwistSupportsFsync():
        available = {kind for kind in available if not servers.runsWithFsync(kind)}
    for i, scenario in enumerate(plan, 1):
        kinds = tuple(k for k in scenario.servers if k in available)
        skipped = set(scenario.servers) - set(kinds)
        progress(f"[{i}/{len(plan)}] {scenario.title}" + (f" (skipping {', '.join(sorted(skipped))}: not available)" if skipped else ""))
        if kinds:
            results += runScenario(replace(scenario, servers=kinds), options, kvbench, progress, serverWarmup)
    return results
