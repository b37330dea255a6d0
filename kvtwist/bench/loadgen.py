"""Running the C load generator and reading its one-line JSON result."""

from __future__ import annotations

import json
import subprocess
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

    def argv(self, binary: Path, port: int, proto: str, host: str = "127.0.0.1") -> list[str]:
        args = [
            str(binary), "--host", host, "--port", str(port), "--proto", proto,
            "--connections", str(self.connections), "--depth", str(self.depth),
            "--keyspace", str(self.keyspace), "--reads", str(self.reads),
            "--duration", str(self.duration), "--warmup", str(self.warmup),
            "--idle", str(self.idle), "--seed", str(self.seed),
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
    )


def start(binary: Path, load: Load, port: int, proto: str) -> subprocess.Popen[str]:
    """Start kvbench in the background; ``finish`` collects its result."""
    return subprocess.Popen(
        load.argv(binary, port, proto), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> LoadResult:
    """Wait for kvbench and parse its result, or raise LoadError with its message."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise LoadError(f"kvbench did not finish within {timeout:.0f} s")
    if proc.returncode != 0:
        raise LoadError(err.strip() or f"kvbench exited with {proc.returncode}")
    return parseResultLine(out.strip().splitlines()[-1])
