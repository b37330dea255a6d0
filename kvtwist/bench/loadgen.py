"""Running the C load generator and reading its one-line JSON result."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class LoadError(Exception):
    """kvbench failed; its message says why (server closed, refused, ...)."""


@dataclass(frozen=True)
class Load:
    """One kvbench invocation's parameters (see kvbench --help)."""

    connections: int = 50
    depth: int = 1
    keyspace: int = 100_000
    reads: int = 80
    duration: float = 5.0
    warmup: float = 1.0
    idle: int = 0
    fill: bool = False
    seed: int = 1
    # With several servers: the length of each one's turns (0: one turn of
    # ``duration`` each, one after the other).
    turn: float = 0.0

    def argv(self, binary: Path, targets: Sequence[tuple[int, str]], host: str = "127.0.0.1") -> list[str]:
        """kvbench's command line loading each (port, protocol) of ``targets``, in turns if several."""
        args = [
            str(binary), "--host", host,
            "--port", ",".join(str(port) for port, _ in targets),
            "--proto", ",".join(proto for _, proto in targets),
            "--connections", str(self.connections), "--depth", str(self.depth),
            "--keyspace", str(self.keyspace), "--reads", str(self.reads),
            "--duration", str(self.duration), "--warmup", str(self.warmup),
            "--turn", str(self.turn), "--idle", str(self.idle), "--seed", str(self.seed),
        ]
        return args + ["--fill"] if self.fill else args


@dataclass(frozen=True)
class LoadResult:
    """What kvbench measured: throughput over the window, latency, and its histogram."""

    rps: float
    requests: int
    totalRequests: int
    errors: int
    seconds: float
    p50: float
    p99: float
    p999: float
    # (upper bound in microseconds, count) for each non-empty bucket.
    histogram: list[tuple[float, int]] = field(default_factory=list)
    # Measured turns, and how many of them began with the server's pipelines
    # refilled after another's turn rather than going on from its own: all
    # of them when several servers take turns, so each pays every switch.
    turns: int = 0
    turnsStarted: int = 0


def parseResultLine(line: str) -> LoadResult:
    """Parse kvbench's JSON result line; latencies stay in microseconds."""
    data = json.loads(line)
    return LoadResult(
        rps=float(data["rps"]),
        requests=int(data["requests"]),
        totalRequests=int(data["total_requests"]),
        errors=int(data["errors"]),
        seconds=float(data["seconds"]),
        p50=float(data["p50_us"]),
        p99=float(data["p99_us"]),
        p999=float(data["p999_us"]),
        histogram=[(float(u), int(n)) for u, n in data["hist_us"]],
        turns=int(data["turns"]),
        turnsStarted=int(data["turns_started"]),
    )


def start(binary: Path, load: Load, port: int, proto: str) -> subprocess.Popen[str]:
    """Start kvbench on one server in the background; ``finish`` collects its result."""
    return startTurns(binary, load, [(port, proto)])


def startTurns(binary: Path, load: Load, targets: Sequence[tuple[int, str]]) -> subprocess.Popen[str]:
    """Start kvbench loading several servers in turns; ``finishEach`` collects their results."""
    return subprocess.Popen(
        load.argv(binary, targets), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> LoadResult:
    """Wait for a one-server kvbench and parse its result, or raise LoadError with its message."""
    [result] = finishEach(proc, timeout)
    return result


def finishEach(
    proc: subprocess.Popen[str], timeout: float,
    meanwhile: Callable[[], None] = lambda: None, every: float = 0.05,
) -> list[LoadResult]:
    """
    Wait for kvbench and parse its result for each server, in the order they
    were given, calling ``meanwhile`` every ``every`` seconds until it exits.
    Its output is read all along: with many servers and wide latencies the
    histograms outgrow a pipe's buffer, and kvbench would block on its last
    write while we waited for it to exit.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            out, err = proc.communicate(timeout=every)
            break
        except subprocess.TimeoutExpired:
            # communicate keeps what it has read so far for the next call.
            if time.monotonic() >= deadline:
                proc.kill()
                proc.communicate()
                raise LoadError(f"kvbench did not finish within {timeout:.0f} s")
            meanwhile()
    if proc.returncode != 0:
        raise LoadError(err.strip() or f"kvbench exited with {proc.returncode}")
    return [parseResultLine(line) for line in out.strip().splitlines()]
