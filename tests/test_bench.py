"""The benchmark harness: its C tools, its arithmetic, its /proc reading, and one tiny end-to-end run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvtwist.bench import build, loadgen, procfs, servers
from kvtwist.bench.loadgen import Load
from kvtwist.bench.plan import Scenario, Target
from kvtwist.bench.report import summarize, verdicts
from kvtwist.bench.runner import Measurement
from kvtwist.bench.stats import median, medianRatio, mergeHistograms, pairedRatios, percentileFromHistogram

needsRedis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


@pytest.fixture(scope="module")
def buildDir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("build")


@pytest.fixture(scope="module")
def kvbench(buildDir: Path) -> Path:
    return build.build("kvbench", buildDir)


@pytest.fixture(scope="module")
def cserver(buildDir: Path) -> servers.Server:
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
    plan = [Scenario("s", "title", Load(), targets=(Target("rps", ">=", 1.0), Target("cpu", "<=", 1.0)))]
    measurements = [
        _m("kvtwist", 0, 100, 4), _m("redis", 0, 50, 2),
        _m("kvtwist", 1, 100, 4), _m("redis", 1, 200, 8),
        _m("kvtwist", 2, 90, 3), _m("redis", 2, 100, 1),
    ]
    rows = summarize(plan, measurements)
    kv = next(r for r in rows if r.server == "kvtwist")
    assert kv.medians["rps"] == 100
    assert kv.ratios["rps"] == pytest.approx(0.9)  # median of 2.0, 0.5, 0.9
    assert kv.ratios["cpu"] == pytest.approx(2.0)  # median of 2.0, 0.5, 3.0
    assert next(r for r in rows if r.server == "redis").ratios == {}
    judged = {v.target: v.met for v in verdicts(plan, rows)}
    assert judged == {"rps >= 1x Redis": False, "cpu <= 1x Redis": False}


def test_the_floor_is_compared_but_not_judged() -> None:
    plan = [Scenario("s", "title", Load(), ("twisted-floor", "redis-always"), targets=(Target("rps", ">=", 1.0),))]
    measurements = [_m("twisted-floor", 0, 80, 4), _m("redis-always", 0, 100, 2)]
    rows = summarize(plan, measurements)
    floor = next(r for r in rows if r.server == "twisted-floor")
    assert floor.ratios["rps"] == pytest.approx(0.8)
    assert verdicts(plan, rows) == []


def test_the_floor_server_answers_every_line_and_nothing_else() -> None:
    server = servers.start("twisted-floor", servers.Options())
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"get 1\nput 2 3\nanything at all\nnot yet a line")
            reply = b""
            while reply.count(b"\n") < 3:
                reply += s.recv(100)
            s.sendall(b"\n")
            reply += s.recv(100)
        assert reply == b"OK\n" * 4
    finally:
        server.stop()


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
    ran = {(m["scenario"], m["server"]) for m in results["measurements"]}
    for scenario in results["plan"]:
        for server in scenario["servers"]:
            assert (scenario["key"], server) in ran
    assert ("c50", "kvtwist") in ran and ("cal-d1", "cserver") in ran
    assert all(m["errors"] == 0 and m["rps"] > 0 for m in results["measurements"])
    assert "| kvtwist" in proc.stdout
    if shutil.which("redis-server"):
        assert ("c50", "redis") in ran
        assert "Targets:" in proc.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "skipping plots" in proc.stderr
    else:
        for name in ("throughput.png", "latency.png"):
            assert (out / name).read_bytes().startswith(b"\x89PNG")
