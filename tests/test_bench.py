"""The benchmark harness: its C tools, its arithmetic, its /proc reading, and one tiny end-to-end run."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport

from kvtwist.bench import build, cli, floor, loadgen, plan, procfs, runner, servers
from kvtwist.bench.loadgen import Load
from kvtwist.bench.plan import AGAINST_TREE, REGRESSION, Scenario, Target
from kvtwist.bench.report import MET, NOT_MET, UNCERTAIN, formatVerdicts, judge, portableCommand, summarize, verdicts
from kvtwist.bench.runner import Measurement, roundOrder
from kvtwist.server.arguments import LISTEN_BACKLOG
from kvtwist.bench.stats import median, medianRatio, mergeHistograms, pairedRatios, percentileFromHistogram

needsRedis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


@pytest.fixture(scope="module")
def buildDir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("build")


@pytest.fixture(scope="module")
def kvbench(buildDir: Path) -> Path:
    return build.build("kvbench", buildDir)


@pytest.fixture(scope="module")
def cserver(buildDir: Path) -> Iterator[servers.Server]:
    server = servers.start("cserver", servers.Options(cserver=build.build("cserver", buildDir)))
    yield server
    server.stop()


def _request(port: int, line: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(line)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                break
            reply += chunk
        return reply


# The C tools


@pytest.mark.parametrize("name", ["kvbench", "cserver"])
def test_c_sources_compile_without_warnings(name: str, tmp_path: Path) -> None:
    src = tmp_path / f"{name}.c"
    src.write_bytes(build.source(name))
    result = subprocess.run(
        ["cc", "-O2", "-Wall", "-Wextra", str(src), "-o", str(tmp_path / name)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_build_reuses_binary_until_source_changes(buildDir: Path, kvbench: Path) -> None:
    assert build.build("kvbench", buildDir) == kvbench
    assert os.access(kvbench, os.X_OK)


def test_kvbench_fill_stores_every_key_in_kvtwist(kvbench: Path, kvserver) -> None:  # type: ignore[no-untyped-def]
    result = loadgen.finish(
        loadgen.start(kvbench, Load(connections=3, depth=4, keyspace=50, fill=True), kvserver.port, "kv"), 30
    )
    assert result.requests == 50
    assert result.errors == 0
    assert _request(kvserver.port, b"get 49\n") == b"49\n"
    assert _request(kvserver.port, b"put 0 1\n") == b"Key already exists\n"


def test_a_server_is_filled_in_the_shape_of_the_load_it_is_measured_under(kvbench: Path, kvserver) -> None:  # type: ignore[no-untyped-def]
    # A JIT compiles what it runs first: the fill runs the measured load's
    # connections and depth, without its idle connections or turns.
    load = Load(connections=5, depth=1, keyspace=40, duration=0.3, warmup=0.1, idle=3000, turn=0.05)
    prefill = runner.prefillFor(load)
    assert prefill.fill and prefill.idle == 0 and prefill.turn == 0.0
    assert (prefill.connections, prefill.depth, prefill.keyspace, prefill.reads) == (5, 1, 40, load.reads)
    result = loadgen.finish(loadgen.start(kvbench, prefill, kvserver.port, "kv"), 30)
    assert (result.requests, result.errors) == (40, 0)
    assert [_request(kvserver.port, b"get %d\n" % key) for key in (0, 39)] == [b"0\n", b"39\n"]


@needsRedis
def test_kvbench_speaks_redis(kvbench: Path) -> None:
    server = servers.start("redis", servers.Options())
    try:
        result = loadgen.finish(
            loadgen.start(kvbench, Load(connections=2, depth=8, keyspace=30, fill=True), server.port, "redis"), 30
        )
        assert result.requests == 30
        assert _request(server.port, b"GET 29\r\n") == b"$2\r\n29\r\n"
        mixed = loadgen.finish(
            loadgen.start(kvbench, Load(connections=2, depth=3, keyspace=30, duration=0.2, warmup=0), server.port, "redis"), 30
        )
        assert mixed.requests > 0 and mixed.errors == 0
    finally:
        server.stop()


def test_kvbench_result_is_consistent(kvbench: Path, cserver: servers.Server) -> None:
    load = Load(connections=3, depth=2, keyspace=100, duration=0.3, warmup=0.1, idle=25)
    proc = loadgen.start(kvbench, load, cserver.port, "kv")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    raw = json.loads(out)
    result = loadgen.parseResultLine(out)
    assert raw["idle"] == 25 and raw["connections"] == 3
    assert result.errors == 0
    assert sum(n for _, n in result.histogram) == result.requests
    # The warm-up and the idle connections' probes are served but not measured.
    assert result.totalRequests >= result.requests + 25
    assert result.rps == pytest.approx(result.requests / result.seconds, rel=1e-3)
    # kvbench's percentiles and the Python ones agree on the same histogram.
    assert percentileFromHistogram(result.histogram, 0.99) == pytest.approx(result.p99, abs=0.051)  # p99 is printed to 0.1 us
    assert result.p50 <= result.p99 <= result.p999


def test_kvbench_loads_several_servers_in_turns_and_measures_each(kvbench: Path, cserver: servers.Server, kvserver) -> None:  # type: ignore[no-untyped-def]
    load = Load(connections=3, depth=2, keyspace=100, duration=0.4, warmup=0.1, turn=0.05, idle=20)
    began = time.monotonic()
    results = loadgen.finishEach(loadgen.startTurns(kvbench, load, [(cserver.port, "kv"), (kvserver.port, "kv")]), 60)
    took = time.monotonic() - began
    assert len(results) == 2
    for result in results:
        assert result.requests > 0 and result.errors == 0
        assert sum(n for _, n in result.histogram) == result.requests
        # Each server's measured turns add up to the duration (each turn ends
        # once its last reply is in, so a little more).
        assert 0.4 <= result.seconds < 1.0
        # Its warm-up turn and its idle connections' probes are served but not measured.
        assert result.totalRequests >= result.requests + 20
    # One server at a time: the run lasts at least both servers' turns.
    assert took >= 2 * (load.warmup + load.duration)


def test_every_turn_of_every_server_follows_another_server_s(kvbench: Path, cserver: servers.Server) -> None:
    # Three loads on one server: no position in the order may give a load
    # two turns in a row, which would spare it a switch (its pipelines
    # drained and refilled) and serve it more than the others.
    load = Load(connections=2, depth=1, keyspace=100, duration=0.3, warmup=0.05, turn=0.05)
    results = loadgen.finishEach(loadgen.startTurns(kvbench, load, [(cserver.port, "kv")] * 3), 60)
    assert [(r.turns, r.turnsStarted) for r in results] == [(6, 6)] * 3


def test_a_result_larger_than_a_pipe_is_read_while_the_servers_are_sampled(
    cserver: servers.Server, tmp_path: Path
) -> None:
    # Many servers in turns with wide latencies print histograms beyond a
    # pipe's 64 KiB: a harness that only samples the servers until the load
    # generator exits waits for ever on one blocked in its last write. This
    # stand-in prints such a result, one line per server, after a while.
    buckets = [[10.0 + i / 64, 1] for i in range(8_000)]
    line = json.dumps({
        "rps": 1000.0, "requests": len(buckets), "total_requests": len(buckets), "errors": 0,
        "seconds": 8.0, "p50_us": 50.0, "p99_us": 120.0, "p999_us": 130.0,
        "hist_us": buckets, "turns": 4, "turns_started": 4,
    })
    generator = tmp_path / "bigresult"
    generator.write_text(
        f"#!{sys.executable}\nimport sys, time\ntime.sleep(0.4)\n"
        f"for _ in range(3):\n    sys.stdout.write({line!r} + '\\n')\n"
    )
    generator.chmod(0o755)
    assert 3 * len(line) > 4 * 65536
    scenario = Scenario("big", "big", Load(duration=0.1, warmup=0.0, turn=0.05))
    results = runner.measure([cserver] * 3, scenario, 0, generator)
    assert [(m.rps, len(m.histogram)) for m in results] == [(1000.0, len(buckets))] * 3


def test_each_server_s_idle_connections_are_held_by_a_process_of_their_own(
    kvbench: Path, cserver: servers.Server, kvserver  # type: ignore[no-untyped-def]
) -> None:
    # The open-files limit is per process and cannot always be raised: in
    # one process, two servers' 150 idle connections would not fit under 256.
    def lowLimit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    load = Load(connections=2, keyspace=100, duration=0.2, warmup=0, turn=0.05, idle=150)
    proc = subprocess.Popen(load.argv(kvbench, [(cserver.port, "kv"), (kvserver.port, "kv")]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=lowLimit)
    results = loadgen.finishEach(proc, 60)
    assert [r.errors for r in results] == [0, 0]
    assert all(r.totalRequests >= r.requests + 150 for r in results)
    # Alone, a server's idle connections need more than the limit allows.
    tooMany = replace(load, idle=300)
    proc = subprocess.Popen(tooMany.argv(kvbench, [(cserver.port, "kv")]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=lowLimit)
    with pytest.raises(loadgen.LoadError, match="open files"):
        loadgen.finishEach(proc, 60)


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "1,2", "--proto", "kv,redis,kv"], "3 protocols for 2 ports"),
    (["--port", "1,2", "--fill"], "one server at a time"),
    (["--port", ",".join(["1"] * 17)], "at most 16 ports"),
])
def test_kvbench_refuses_a_run_it_cannot_make(kvbench: Path, args: list[str], message: str) -> None:
    proc = subprocess.run([str(kvbench), *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_memory_per_connection_counts_from_before_the_idle_connections_first_open(kvbench: Path) -> None:
    # The warm-up opens the idle connections once, so that no measured round
    # pays for a new process's first growth; the memory they took is still
    # what the scenario reports.
    scenario = Scenario("idle", "idle", Load(connections=2, keyspace=1000, duration=0.3, warmup=0.1, idle=3000),
                        ("kvtwist",), rounds=1)
    [m] = runner.runScenario(scenario, servers.Options(), kvbench, progress=lambda line: None, serverWarmup=0.3)
    assert m.errors == 0 and m.connections == 3002
    # CPython's kvtwist takes over a kilobyte per connection (docs/performance.md).
    assert m.memPerConnection > 500


def test_kvbench_fails_loudly_without_a_server(kvbench: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        proc = subprocess.run([str(kvbench), "--port", str(port), "--duration", "0.1"], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "kvbench:" in proc.stderr


# Pure parts


def test_parse_stat_counts_from_the_last_parenthesis() -> None:
    fields = ["S"] + [str(i) for i in range(4, 14)] + ["1234", "567"] + ["0"] * 30
    text = "4242 (evil) name (x) " + " ".join(fields)
    assert procfs.parseStatTicks(text) == 1234 + 567


def test_parse_status_rss() -> None:
    text = "Name:\tpython\nVmPeak:\t 9999 kB\nVmRSS:\t   2048 kB\nThreads:\t1\n"
    assert procfs.parseStatusRss(text) == 2048 * 1024
    with pytest.raises(ValueError):
        procfs.parseStatusRss("Name:\tzombie\n")


def test_sample_of_this_process_matches_os_times() -> None:
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    times = os.times()
    sample = procfs.sample(os.getpid())
    assert sample.cpu == pytest.approx(times.user + times.system, abs=0.05)
    assert 1024 * 1024 < sample.rss < 10 * 1024**3


def test_a_server_is_read_only_once_it_has_gone_quiet() -> None:
    # A process that works through one second of CPU after its load (as a
    # server closing 10,000 connections does), then idles.
    busy = subprocess.Popen([sys.executable, "-c", (
        "import time\n"
        "while time.process_time() < 1.0:\n"
        "    pass\n"
        "time.sleep(60)\n"
    )])
    try:
        runner.waitUntilQuiet(busy.pid, timeout=20)
        assert procfs.sample(busy.pid).cpu >= 0.9
        # And an idle process is quiet at once.
        started = time.monotonic()
        runner.waitUntilQuiet(busy.pid, timeout=20)
        assert time.monotonic() - started < 5
    finally:
        busy.kill()
        busy.wait()


def test_median_ratio_is_paired_by_round() -> None:
    ours, theirs = [10.0, 40.0, 20.0], [20.0, 10.0, 40.0]
    assert pairedRatios(ours, theirs) == [0.5, 4.0, 0.5]
    # Two rounds out of three were lost by half; the ratio of medians (1.0) hides it.
    assert medianRatio(ours, theirs) == 0.5
    assert median(ours) / median(theirs) == 1.0
    assert medianRatio([1.0, 2.0], [2.0, 1.0]) == pytest.approx(1.25)
    with pytest.raises(ValueError):
        pairedRatios([1.0], [1.0, 2.0])


def test_histogram_merge_and_percentiles() -> None:
    merged = mergeHistograms([[(1.0, 2), (3.0, 1)], [(3.0, 4), (2.0, 3)]])
    assert merged == [(1.0, 2), (2.0, 3), (3.0, 5)]
    assert percentileFromHistogram(merged, 0.0) == 1.0
    assert percentileFromHistogram(merged, 0.5) == 3.0
    assert percentileFromHistogram(merged, 0.2) == 2.0


def _m(server: str, round: int, rps: float, cpu: float) -> Measurement:
    return Measurement("s", server, round, rps, 1.0, 2.0, 3.0, 0, cpu, 0, 0, 0, 10, 0)


def test_summary_and_verdicts() -> None:
    scenarios = [Scenario("s", "title", Load(), targets=(Target("rps", ">=", 1.0), Target("cpu", "<=", 1.0)))]
    measurements = [
        _m("kvtwist", 0, 100, 4), _m("redis", 0, 50, 2),
        _m("kvtwist", 1, 100, 4), _m("redis", 1, 200, 8),
        _m("kvtwist", 2, 90, 3), _m("redis", 2, 100, 1),
    ]
    rows = summarize(scenarios, measurements)
    kv = next(r for r in rows if r.server == "kvtwist")
    assert kv.medians["rps"] == 100
    assert kv.ratios["rps"] == pytest.approx(0.9)  # median of 2.0, 0.5, 0.9
    assert kv.ratios["cpu"] == pytest.approx(2.0)  # median of 2.0, 0.5, 3.0
    assert next(r for r in rows if r.server == "redis").ratios == {}
    judged = {v.target: v.outcome for v in verdicts(scenarios, rows)}
    # Each target was met in one round of three, so the rounds disagree.
    assert judged == {"rps >= 1x Redis": UNCERTAIN, "cpu <= 1x Redis": UNCERTAIN}


def test_a_verdict_is_certain_only_when_every_round_agrees() -> None:
    target = Target("rps", ">=", 1.0)
    assert judge(target, [1.2, 1.1, 1.5, 1.01, 1.3]) == (MET, 5)
    assert judge(target, [0.5, 0.9, 0.99, 0.7, 0.8]) == (NOT_MET, 0)
    # The median (1.05) meets the target, but two rounds did not.
    assert judge(target, [1.05, 0.9, 1.2, 0.95, 1.1]) == (UNCERTAIN, 3)
    assert judge(target, [0.9, 1.1, 0.8]) == (UNCERTAIN, 1)
    # Agreeing rounds, but too few of them to trust.
    assert judge(target, [1.5, 1.6]) == (UNCERTAIN, 2)
    assert judge(Target("cpu", "<=", 1.0), [0.5, 0.6, 0.7]) == (MET, 3)


def test_verdicts_say_how_many_rounds_met_the_target() -> None:
    scenarios = [Scenario("s", "title", Load(), targets=(Target("rps", ">=", 1.0),))]
    agree = [m for r in range(3) for m in (_m("kvtwist", r, 120, 4), _m("redis", r, 100, 2))]
    disagree = [_m("kvtwist", 0, 80, 4), _m("redis", 0, 100, 2), _m("kvtwist", 1, 120, 4), _m("redis", 1, 100, 2),
                _m("kvtwist", 2, 90, 4), _m("redis", 2, 100, 2)]
    text = formatVerdicts(verdicts(scenarios, summarize(scenarios, agree)))
    assert text == "- kvtwist, s: rps >= 1x Redis: measured 1.20x, met in all 3 rounds"
    text = formatVerdicts(verdicts(scenarios, summarize(scenarios, disagree)))
    assert text == "- kvtwist, s: rps >= 1x Redis: measured 0.90x, uncertain: met in 1 of 3 rounds"
    text = formatVerdicts(verdicts(scenarios, summarize(scenarios, agree[:2])))
    assert text == "- kvtwist, s: rps >= 1x Redis: measured 1.20x, uncertain: only 1 round"
    miss = [m for r in range(5) for m in (_m("kvtwist", r, 50 + r, 4), _m("redis", r, 100, 2))]
    text = formatVerdicts(verdicts(scenarios, summarize(scenarios, miss)))
    assert text == "- kvtwist, s: rps >= 1x Redis: measured 0.52x, NOT met in any of 5 rounds"


def test_a_floor_target_is_judged_against_the_floor_on_the_same_interpreter() -> None:
    servers = ("kvtwist", "kvtwist-pypy", "twisted-floor", "twisted-floor-pypy", "redis")
    targets = (Target("rps", ">=", 0.95, plan.FLOOR, ("kvtwist",)), Target("rps", ">=", 1.0, only=("kvtwist-pypy",)))
    scenarios = [Scenario("s", "title", Load(), servers, targets=targets)]
    rates = {"kvtwist": 96, "twisted-floor": 100, "kvtwist-pypy": 110, "twisted-floor-pypy": 200, "redis": 120}
    measurements = [_m(server, r, rate + r, 1) for r in range(3) for server, rate in rates.items()]
    rows = summarize(scenarios, measurements)
    # The floor itself is shown against the scenario's Redis.
    assert next(r for r in rows if r.server == "twisted-floor").against == "redis"
    text = formatVerdicts(verdicts(scenarios, rows))
    assert text.splitlines() == [
        "- kvtwist, s: rps >= 0.95x twisted-floor: measured 0.96x, met in all 3 rounds",
        "- kvtwist-pypy, s: rps >= 1x Redis: measured 0.92x, NOT met in any of 3 rounds",
    ]


def test_the_recorded_command_names_each_path_by_its_role() -> None:
    argv = ["--rounds", "5", "--pypy", "/opt/pypy/bin/pypy3", "--out=/home/me/run", "--only", "always",
            "--baseline-tree", "/src/old", "--server-python=/usr/bin/python3", "--build-dir", "/var/cache/kb"]
    assert portableCommand(argv) == ["--rounds", "5", "--pypy", "PYPY", "--out=DIR", "--only", "always",
                                     "--baseline-tree", "BASELINE", "--server-python=PYTHON", "--build-dir", "BUILD"]


def test_each_target_compares_servers_that_run_side_by_side() -> None:
    judged = 0
    # Memory per key does not drift with the machine's load as throughput does.
    for s in plan.fullPlan(durable=True):
        if s.memory:
            continue
        for target in s.targets:
            for kind in target.only or [k for k in s.servers if k in servers.REDIS_COUNTERPART]:
                if s.against != plan.AGAINST_REDIS:
                    continue
                other = servers.FLOOR_OF[kind] if target.baseline == plan.FLOOR else servers.REDIS_COUNTERPART[kind]
                assert abs(s.servers.index(kind) - s.servers.index(other)) == 1, (s.key, kind, other)
                assert s.alternate and s.freshServers, s.key
                judged += 1
    assert judged >= 8


def test_the_quick_plan_judges_no_target() -> None:
    assert all(not s.targets for s in plan.quickPlan(durable=True, trees=True))
    assert any(s.targets for s in plan.fullPlan())


# Two source trees


def test_the_tree_comparison_is_the_one_a_refactor_needs() -> None:
    scenarios = {s.key: s for s in plan.fullPlan(trees=True) if s.against == AGAINST_TREE}
    assert sorted(scenarios) == ["tree-always", "tree-d1", "tree-d16"]
    assert [scenarios[k].load.depth for k in ("tree-d1", "tree-d16", "tree-always")] == [1, 16, 1]
    assert set(scenarios["tree-always"].servers) == {
        "kvtwist-always", "kvtwist-always-baseline", "kvtwist-pypy-always", "kvtwist-pypy-always-baseline"
    }
    for s in scenarios.values():
        assert (s.load.connections, s.load.reads, s.load.keyspace, s.load.idle) == (50, 80, 100_000, 0)
        assert s.rounds >= 5 and s.alternate and not s.memory
        assert s.targets == (REGRESSION,) and REGRESSION.met(0.97) and not REGRESSION.met(0.969)
        assert not any("redis" in k for k in s.servers)
        assert all(servers.runsBaselineTree(k) or servers.baselineKind(k) in s.servers for k in s.servers)
    # Without a baseline tree the full plan does not wait for one.
    assert not any(s.against == AGAINST_TREE for s in plan.fullPlan())


def test_alternate_rounds_reverse_the_order() -> None:
    assert [roundOrder("AB", r, alternate=True) for r in range(4)] == [["A", "B"], ["B", "A"], ["A", "B"], ["B", "A"]]
    assert [roundOrder("ABC", r, alternate=False) for r in range(2)] == [["A", "B", "C"]] * 2


def test_trees_are_compared_with_each_other_not_with_redis() -> None:
    tree = Scenario("s", "title", Load(), ("kvtwist-baseline", "kvtwist", "redis"), targets=(REGRESSION,),
                    against=AGAINST_TREE)
    measurements = [
        _m("kvtwist-baseline", 0, 100, 10), _m("kvtwist", 0, 98, 11), _m("redis", 0, 300, 3),
        _m("kvtwist-baseline", 1, 100, 10), _m("kvtwist", 1, 95, 12), _m("redis", 1, 300, 3),
        _m("kvtwist-baseline", 2, 90, 10), _m("kvtwist", 2, 99, 9), _m("redis", 2, 300, 3),
    ]
    rows = {r.server: r for r in summarize([tree], measurements)}
    assert rows["kvtwist"].against == "kvtwist-baseline"
    assert rows["kvtwist"].roundRatios["rps"] == pytest.approx([0.98, 0.95, 1.1])
    assert rows["kvtwist"].ratios["rps"] == pytest.approx(0.98)
    assert rows["kvtwist"].ratios["cpu"] == pytest.approx(1.1)
    assert rows["kvtwist-baseline"].ratios == {} and rows["redis"].ratios == {}
    [verdict] = verdicts([tree], list(rows.values()))
    assert (verdict.target, verdict.outcome, verdict.roundsMet) == ("rps >= 0.97x kvtwist-baseline", UNCERTAIN, 2)


def _copyTree(tree: Path, marker: str) -> Path:
    """A source tree holding a copy of this kvtwist that prints ``marker`` when imported."""
    source = servers.installedSource()
    assert source.dropin is not None
    shutil.copytree(source.package, tree / "kvtwist", ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "twisted" / "plugins").mkdir(parents=True)
    shutil.copy(source.dropin, tree / "twisted" / "plugins")
    with open(tree / "kvtwist" / "__init__.py", "a") as f:
        f.write(f"\nprint({marker!r}, flush=True)\n")
    return tree


def test_the_baseline_kind_runs_the_baseline_tree(tmp_path: Path) -> None:
    options = servers.Options(baselineTree=_copyTree(tmp_path / "tree", "imported from the baseline tree"))
    for kind, fromTree in (("kvtwist-baseline", True), ("kvtwist", False)):
        server = servers.start(kind, options)
        try:
            assert _request(server.port, b"put 5 6\n") == b"OK\n"
            assert _request(server.port, b"get 5\n") == b"6\n"
            assert ("imported from the baseline tree" in server.logText()) == fromTree
        finally:
            server.stop()


def test_a_baseline_tree_must_hold_kvtwist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "kvtwist").mkdir()
    with pytest.raises(servers.ServerError, match="twisted/plugins/kvtwist_plugin.py"):
        servers.treeSource(tmp_path)
    assert cli.main(["--baseline-tree", str(tmp_path), "--only", "tree-d1"]) == 2
    assert "not a kvtwist source tree" in capsys.readouterr().err
    # The comparison's scenarios cannot run without a tree to compare with.
    assert cli.main(["--only", "tree-d1,c50"]) == 2
    assert "--baseline-tree" in capsys.readouterr().err


# The commit before kvtwist.protocol moved to kvtwist.server.protocol.
_OLD_LAYOUT = "27ded57"


def _oldLayoutTree(tmp_path: Path) -> Path:
    repo = Path(__file__).resolve().parent.parent
    tree = tmp_path / "old"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", _OLD_LAYOUT, "kvtwist", "twisted"],
                             capture_output=True) if shutil.which("git") else None
    if archive is None or archive.returncode != 0:
        pytest.skip(f"commit {_OLD_LAYOUT} is not in this checkout's history")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def test_a_baseline_tree_in_the_old_layout_serves(tmp_path: Path) -> None:
    tree = _oldLayoutTree(tmp_path)
    assert (tree / "kvtwist" / "protocol.py").exists()
    server = servers.start("kvtwist-baseline", servers.Options(baselineTree=tree))
    try:
        assert _request(server.port, b"put 1 2\n") == b"OK\n"
        assert _request(server.port, b"get 1\n") == b"2\n"
        # The old tree's factory logs under its old module name.
        assert "[kvtwist.protocol.KVFactory" in server.logText()
    finally:
        server.stop()


def test_the_floor_is_compared_but_not_judged() -> None:
    scenarios = [Scenario("s", "title", Load(), ("twisted-floor", "redis-always"), targets=(Target("rps", ">=", 1.0),))]
    measurements = [_m("twisted-floor", 0, 80, 4), _m("redis-always", 0, 100, 2)]
    rows = summarize(scenarios, measurements)
    floor = next(r for r in rows if r.server == "twisted-floor")
    assert floor.ratios["rps"] == pytest.approx(0.8)
    assert verdicts(scenarios, rows) == []


def readLines(s: socket.socket, lines: int, server: servers.Server) -> bytes:
    """What the floor sends until ``lines`` lines have come."""
    reply = b""
    while reply.count(b"\n") < lines:
        chunk = s.recv(100)
        assert chunk, f"the floor closed the connection after {reply!r}:\n{server.logText()}"
        reply += chunk
    return reply


@pytest.mark.parametrize("kind", ["twisted-floor", "twisted-floor-stock-reactor"])
def test_the_floor_server_answers_every_line_and_nothing_else(kind: str) -> None:
    server = servers.start(kind, servers.Options())
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"get 1\nput 2 3\nanything at all\nnot yet a line")
            reply = readLines(s, 3, server)
            s.sendall(b"\n")
            reply += s.recv(100)
        assert reply == b"OK\n" * 4
        # A connection's set-up ran whole (KVProtocol.connectionMade reads the
        # factory's attributes; a missing one fails it half-way, and the
        # floor would then read 64 KiB at a time, unlike kvtwist).
        assert "Traceback" not in server.logText(), server.logText()
    finally:
        server.stop()


def test_servers_on_pypy_warm_up_longer_for_their_jit_and_pairs_alike() -> None:
    cpython = runner.warmupFor("kvtwist", runner.SERVER_WARMUP)
    assert cpython == runner.warmupFor("redis", runner.SERVER_WARMUP) == runner.SERVER_WARMUP
    pypy = runner.warmupFor("kvtwist-pypy-always", runner.SERVER_WARMUP)
    assert pypy > cpython
    # kvtwist on PyPy and the floor it is judged against warm up alike.
    assert runner.warmupFor("twisted-floor-pypy-always", runner.SERVER_WARMUP) == pypy
    # --quick warms up nothing, on any interpreter.
    assert runner.warmupFor("kvtwist-pypy", 0.0) == 0.0


def test_the_floor_listens_with_kvtwist_s_backlog() -> None:
    # Thousands of idle connections opened at once overflowed Twisted's
    # default backlog of 50 on the floor, but not kvtwist's.
    reactor = MemoryReactor()
    floor.serve(reactor, "tcp:0:interface=127.0.0.1")
    [(port, factory, backlog, interface)] = reactor.tcpServers
    assert backlog == LISTEN_BACKLOG and interface == "127.0.0.1"
    assert isinstance(factory, floor.FloorFactory)


def test_the_durable_floor_journals_writes_and_answers_them_after_the_fsync() -> None:
    server = servers.start("twisted-floor-always", servers.Options())
    try:
        journal = server.workdir / "journal"
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"get 1\n")
            assert s.recv(100) == b"OK\n"
            assert journal.stat().st_size == 0
            s.sendall(b"put 2 3\nget 2\ndel 2\n")
            reply = readLines(s, 3, server)
        assert reply == b"OK\n" * 3
        # One 21-byte record for the put and one for the del.
        assert journal.stat().st_size == 42
        assert "Traceback" not in server.logText(), server.logText()
    finally:
        server.stop()


def test_the_durable_floor_writes_a_turn_s_records_in_one_go_before_its_fsync(tmp_path: Path) -> None:
    """Like kvtwist, which the floor must never be slower than: no write per chunk, one per turn."""
    clock = Clock()
    journal = tmp_path / "journal"
    factory = floor.DurableFloorFactory(clock, str(journal), inThread=True, runBlocking=defer.maybeDeferred)
    connections = []
    for chunk in (b"put 1 1\n", b"del 2\nget 3\n", b"get 4\n"):
        protocol, transport = factory.buildProtocol(None), StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(chunk)
        connections.append(transport)
    # Reads leave at once; writes wait for the end of the turn, unwritten.
    assert [t.value() for t in connections] == [b"", b"", b"OK\n"]
    assert journal.stat().st_size == 0
    clock.advance(0)
    assert journal.stat().st_size == 42
    assert [t.value() for t in connections] == [b"OK\n", b"OK\nOK\n", b"OK\n"]


# End to end


def test_quick_run_end_to_end(tmp_path: Path, buildDir: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "kvtwist.bench", "--quick", "--out", str(out), "--build-dir", str(buildDir)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "round 1/" in proc.stderr  # progress is shown while it runs
    results = json.loads((out / "results.json").read_text())
    assert results["machine"]["nproc"] == os.cpu_count()
    # The recorded command names no path of the machine that ran it.
    assert results["command"] == ["python", "-m", "kvtwist.bench", "--quick", "--out", "DIR", "--build-dir", "BUILD"]
    ran = {(m["scenario"], m["server"]) for m in results["measurements"]}
    for scenario in results["plan"]:
        for server in scenario["servers"]:
            assert (scenario["key"], server) in ran
    assert ("c50", "kvtwist") in ran and ("cal-d1", "cserver") in ran
    assert all(m["errors"] == 0 and m["rps"] > 0 for m in results["measurements"])
    assert "| kvtwist" in proc.stdout
    # Two connections for a fraction of a second say nothing about the targets.
    assert "not judged" in proc.stdout and " met" not in proc.stdout
    assert results["targets"] == []
    if shutil.which("redis-server"):
        assert ("c50", "redis") in ran
        assert "x Redis req/s" in proc.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "skipping plots" in proc.stderr
    else:
        for name in ("throughput.png", "latency.png"):
            assert (out / name).read_bytes().startswith(b"\x89PNG")


def test_quick_comparison_of_two_trees_end_to_end(tmp_path: Path, buildDir: Path) -> None:
    tree = _copyTree(tmp_path / "tree", "baseline")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "kvtwist.bench", "--quick", "--baseline-tree", str(tree), "--only", "tree-d1,tree-d16",
         "--no-plots", "--out", str(out), "--build-dir", str(buildDir)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert [s["key"] for s in results["plan"]] == ["tree-d1", "tree-d16"]
    assert set(results["trees"]) == {"current", "baseline"}
    for key in ("tree-d1", "tree-d16"):
        rounds = [(m["round"], m["server"]) for m in results["measurements"] if m["scenario"] == key]
        # Interleaved, and neither tree always goes first.
        assert rounds == [(0, "kvtwist-baseline"), (0, "kvtwist"), (1, "kvtwist"), (1, "kvtwist-baseline")]
        # Each round on new processes: a process's own luck is not measured twice.
        pids = [m["pid"] for m in results["measurements"] if m["scenario"] == key]
        assert len(set(pids)) == 4 and 0 not in pids
        [row] = [r for r in results["summary"] if r["scenario"] == key and r["server"] == "kvtwist"]
        assert row["against"] == "kvtwist-baseline" and len(row["roundRatios"]["rps"]) == 2
        assert 0 < row["ratios"]["rps"] < 100 and 0 < row["ratios"]["cpu"] < 100
    assert all(m["errors"] == 0 and m["rps"] > 0 for m in results["measurements"])
    assert "x baseline req/s" in proc.stdout and "x Redis" not in proc.stdout
    assert "not judged" in proc.stdout and " met" not in proc.stdout
    assert (out / "results.md").read_text().strip() == proc.stdout.strip()


def _stat(pid: int) -> tuple[str, list[str]] | None:
    """A process's command name and the fields after it in /proc/PID/stat (state, ppid, ...), or None once it is gone."""
    try:
        text = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return None
    return text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()


def _children(pid: int) -> dict[int, tuple[str, str]]:
    """The processes whose parent is ``pid``: by pid, their command name and start time."""
    found = {}
    for child in map(int, filter(str.isdigit, os.listdir("/proc"))):
        stat = _stat(child)
        if stat is not None and stat[1][1] == str(pid):
            found[child] = (stat[0], stat[1][19])
    return found


def _running(pid: int, started: str) -> bool:
    """Whether the process ``pid`` that started at ``started`` runs still: it is neither gone nor a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[1][19] == started and stat[1][0] != "Z"


def _waitForEnd(processes: dict[int, tuple[str, str]], timeout: float) -> list[str]:
    """The names of ``processes`` (as ``_children`` gives them) still running after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [name for pid, (name, started) in processes.items() if _running(pid, started)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _startHarness(tmp_path: Path, buildDir: Path, duration: float, temp: Path | None = None) -> subprocess.Popen[str]:
    """A real harness process measuring the C calibration server for ``duration`` seconds, with ``temp`` as its TMPDIR."""
    return subprocess.Popen(
        [sys.executable, "-m", "kvtwist.bench", "--only", "cal-d1", "--duration", str(duration), "--warmup", "0",
         "--server-warmup", "0", "--no-redis", "--no-plots", "--out", str(tmp_path / "results"),
         "--build-dir", str(buildDir)],
        env=dict(os.environ, TMPDIR=str(temp)) if temp is not None else None,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _childrenOnceLoading(proc: subprocess.Popen[str], children: dict[int, tuple[str, str]]) -> None:
    """Wait until the harness runs its load generator, keeping its children (pid: name, start) in ``children``."""
    deadline = time.monotonic() + 60
    while not any(name.startswith("kvbench") for name, _ in children.values()):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no load generator was started"
        time.sleep(0.05)
        children.update(_children(proc.pid))


def _endHarness(proc: subprocess.Popen[str], children: dict[int, tuple[str, str]]) -> None:
    """Kill what a failed test left: the harness and any child still running."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate()
    for pid, (_, started) in children.items():
        if _running(pid, started):
            os.kill(pid, signal.SIGKILL)
    _waitForEnd(children, 10)


def test_sigterm_stops_the_servers_and_removes_their_directories(tmp_path: Path, buildDir: Path, kvbench: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = _startHarness(tmp_path, buildDir, 60, temp)
    children: dict[int, tuple[str, str]] = {}
    try:
        # Once the load generator runs, the server it loads is up in its directory.
        _childrenOnceLoading(proc, children)
        assert any(name.startswith("cserver") for name, _ in children.values()), children
        assert [p.name[:16] for p in temp.iterdir()] == ["kvbench-cserver-"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "Traceback" not in err
        assert list(temp.iterdir()) == []
        # The server was stopped; the load generator ends as its connections close.
        assert _waitForEnd(children, 10) == []
    finally:
        _endHarness(proc, children)


def test_sigusr1_writes_where_the_run_waits_and_the_run_goes_on(tmp_path: Path, buildDir: Path, kvbench: Path) -> None:
    proc = _startHarness(tmp_path, buildDir, 3)
    children: dict[int, tuple[str, str]] = {}
    try:
        _childrenOnceLoading(proc, children)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        # The stack of the thread that waits for the load generator, then the run's own output.
        assert "most recent call first" in err and "kvtwist/bench/runner.py" in err, err
        assert (tmp_path / "results" / "results.json").exists() and "cserver" in out
    finally:
        _endHarness(proc, children)


def _commandLines() -> list[bytes]:
    lines = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            lines.append(Path("/proc", pid, "cmdline").read_bytes())
        except OSError:
            pass
    return lines


def test_a_server_interrupted_while_it_starts_is_stopped(tmp_path: Path) -> None:
    # A server that never says it listens: its start waits for it, and an
    # interrupt then (Ctrl-C, or the harness's SIGTERM) must not leave it running.
    marker = f"never-listens-{os.getpid()}-{time.monotonic_ns()}"
    argv = [sys.executable, "-c", "import sys, time; time.sleep(60)", marker]

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            servers._startAndWaitForLog("never", argv, tmp_path, re.compile(r"listening on (\d+)"))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not [line for line in _commandLines() if marker.encode() in line]


def test_a_server_that_ends_without_listening_is_reported_with_its_log(tmp_path: Path) -> None:
    workdir = tmp_path / "server"
    workdir.mkdir()
    argv = [sys.executable, "-c", "print('no port for you', flush=True)"]
    with pytest.raises(servers.ServerError, match="did not start listening:\nno port for you"):
        servers._startAndWaitForLog("broken", argv, workdir, re.compile(r"listening on (\d+)"))
    # Stopped: its directory, log and all, is gone.
    assert not workdir.exists()


def test_the_harness_puts_back_the_sigterm_handler_it_found(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        assert cli.main(["--only", "no-such-scenario"]) == 2
        assert "unknown scenario" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_enginecost_times_every_step_and_each_pair_does_the_same_work(capsys: pytest.CaptureFixture[str]) -> None:
    from kvtwist.bench import enginecost

    steps = enginecost.costs()
    if "encode, compiled" in steps:
        assert steps["encode, compiled"]() == steps["encode, Python"]()
        assert steps["decode, compiled"]() == steps["decode, Python"]()
        operations, taken = steps["parse a chunk, compiled"]()  # type: ignore[misc]
        assert operations == enginecost.chunk(16, 1) and taken > 0
    enginecost.main(["--number", "3", "--repeat", "1"])
    printed = capsys.readouterr().out
    for name in steps:
        assert f"{name}:" in printed


def _recordingTransports() -> tuple[list[StringTransport], Callable[[], StringTransport]]:
    """A list, and a transport factory that appends each transport it makes to it."""
    transports: list[StringTransport] = []

    def recording() -> StringTransport:
        transports.append(StringTransport())
        return transports[-1]

    return transports, recording


def _modelReplies(stream: list[bytes]) -> list[bytes]:
    """The replies to ``stream`` of a store that starts with every requestcost key holding itself."""
    from kvtwist.bench import requestcost

    model = {key: key for key in range(requestcost.KEYS)}
    expected = []
    for line in stream:
        verb, *numbers = line.split()
        key = int(numbers[0])
        if verb == b"get":
            expected.append(b"%d\n" % model[key] if key in model else b"Key not found\n")
        elif verb == b"put":
            expected.append(b"Key already exists\n" if key in model else b"OK\n")
            model.setdefault(key, int(numbers[1]))
        else:
            expected.append(b"OK\n" if model.pop(key, None) is not None else b"Key not found\n")
    return expected


def test_requestcost_feeds_every_server_the_same_requests_and_each_answers_them(capsys: pytest.CaptureFixture[str]) -> None:
    from kvtwist.bench import requestcost

    stream = requestcost.requests(2_000, seed=3)
    assert {line.split()[0] for line in stream} == {b"get", b"put", b"del"}
    transports, recording = _recordingTransports()
    received = requestcost.servers(recording)
    for dataReceived in received.values():
        for line in stream:
            dataReceived(line)
    replies = dict(zip(received, (t.value() for t in transports)))
    assert replies["floor"] == b"OK\n" * len(stream)
    expected = _modelReplies(stream)
    for name in received.keys() - {"floor"}:
        assert replies[name] == b"".join(expected), name
    requestcost.main(["--requests", "50", "--repeat", "1"])
    printed = capsys.readouterr().out
    for name in received:
        assert f"{name}:" in printed


def test_requestcost_with_fsync_always_answers_every_request_once_its_turn_ends(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvtwist.bench import requestcost

    connections = requestcost.CONNECTIONS
    stream = requestcost.requests(connections * 40, seed=5)
    transports, recording = _recordingTransports()
    turns = requestcost.durableServers(str(tmp_path), recording)
    try:
        # A write's reply waits for the fsync that its turn's end starts
        # (the pure path's connections are the last ones made).
        pure, transport, added = turns["kvtwist, pure Python"], transports[-connections], requestcost.KEYS + 1
        pure.received[0](b"put %d 1\n" % added)
        assert transport.value() == b""
        pure.clock.advance(0)
        assert transport.value() == b"OK\n"
        pure.received[0](b"del %d\n" % added)
        pure.clock.advance(0)
        assert transport.value() == b"OK\nOK\n"
        transport.clear()
        for run in turns.values():
            run(stream)
    finally:
        for run in turns.values():
            run.close()
    expected = _modelReplies(stream)
    for index, name in enumerate(turns):
        mine = transports[index * connections : (index + 1) * connections]
        if name == "floor":
            assert all(t.value() == b"OK\n" * 40 for t in mine)
            continue
        # Each connection got its own requests' replies, in order, all of them.
        for c, transport in enumerate(mine):
            assert transport.value() == b"".join(expected[c::connections]), (name, c)
    requestcost.main(["--fsync-always", "--requests", "100", "--repeat", "1"])
    printed = capsys.readouterr().out
    for name in turns:
        assert f"{name}:" in printed
