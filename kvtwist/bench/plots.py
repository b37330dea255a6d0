"""PNG plots of a run; matplotlib comes from the optional ``bench`` extra."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kvtwist.bench.plan import Scenario
from kvtwist.bench.report import Row
from kvtwist.bench.runner import Measurement
from kvtwist.bench.stats import mergeHistograms


class PlotsUnavailable(Exception):
    """matplotlib is not installed."""


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailable("matplotlib is not installed (pip install 'kvtwist[bench]'); skipping plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughputByConnections(plan: Sequence[Scenario], rows: Sequence[Row], path: Path) -> Path:
    """Median requests/s against active connections, one line per server (no pipelining)."""
    plt = _pyplot()
    import matplotlib.ticker

    byKey = {s.key: s for s in plan}
    points: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        scenario = byKey[row.scenario]
        if scenario.memory or scenario.load.depth != 1 or scenario.load.idle or row.server == "cserver":
            continue
        if not (row.scenario.startswith("sweep-") or row.scenario == "c50"):
            continue
        points.setdefault(row.server, []).append((scenario.load.connections, row.medians["rps"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for server, xy in sorted(points.items()):
        xy.sort()
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=server)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("active connections (no pipelining)")
    ax.set_ylabel("requests/s (median of rounds)")
    ax.set_title("Throughput against connections, 80% gets")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def latencyCdf(plan: Sequence[Scenario], measurements: Sequence[Measurement], path: Path,
               scenarios: Sequence[str] = ("c50", "c50-d16", "idle10k", "always")) -> Path:
    """Latency CDF per server, all rounds merged, one panel per scenario."""
    plt = _pyplot()
    titles = {s.key: s.title for s in plan}
    shown = [k for k in scenarios if any(m.scenario == k for m in measurements)]
    columns = min(len(shown), 2) or 1
    rows = (len(shown) + columns - 1) // columns or 1
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, shown):
        for server in sorted({m.server for m in measurements if m.scenario == key}):
            merged = mergeHistograms([m.histogram for m in measurements if m.scenario == key and m.server == server])
            total = sum(n for _, n in merged)
            if not total:
                continue
            xs, ys, seen = [], [], 0
            for upper, n in merged:
                seen += n
                xs.append(upper / 1000)
                ys.append(seen / total)
            ax.plot(xs, ys, label=server)
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(titles.get(key, key), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
