"""``python -m kvtwist.bench.storage``: start-up recovery time and compaction stalls.

Measures, at a given number of keys (1M by default):

- recovery: opening, as the server does, a directory holding only a journal
  of N puts, and on one holding a snapshot of N keys plus a journal just
  under the size that triggers compaction (the worst case); also a whole
  ``twistd kvstore --data`` start-up, until it listens;
- compaction: the longest time the reactor goes without running a 5 ms
  timer while a compaction of N keys runs with writes going on, against
  the same measurement over the same time with no compaction (the
  machine's own noise);
- recovery memory: on both directories, in a fresh process that recovers
  the directory and keeps what a server keeps (the map), the peak
  resident memory (VmHWM) against the resident memory once open (VmRSS).
  ``--memory-only`` measures only this.

Rounds alternate the cases and the medians are printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvtwist.storage import journal, snapshot
from kvtwist.storage.datadir import journalName, snapshotName
from kvtwist.storage.compaction import COMPACT_RATIO
from kvtwist.storage.interface import Batch
from kvtwist.storage.journaled import JournaledStore, openDirectory

TICK = 0.005


def buildJournalOnly(directory: Path, keys: int) -> None:
    directory.mkdir(parents=True)
    records = b"".join(journal.encodePut(k * 7919, k) for k in range(keys))
    (directory / journalName(1)).write_bytes(journal.encodeHeader(journal.MAGIC, 1) + records)


def buildSnapshotAndJournal(directory: Path, keys: int) -> None:
    """A snapshot of ``keys`` keys and a journal just under the compaction threshold."""
    directory.mkdir(parents=True)
    snap = snapshot.encodeSnapshot(2, ((k * 7919, k) for k in range(keys)))
    (directory / snapshotName(2)).write_bytes(snap)
    # Replace values (del + put) until the journal nearly triggers compaction.
    pairs = (COMPACT_RATIO * len(snap)) // (2 * journal.RECORD_SIZE) - 1
    records = b"".join(
        journal.encodeDel((i % keys) * 7919) + journal.encodePut((i % keys) * 7919, -i) for i in range(pairs)
    )
    (directory / journalName(2)).write_bytes(journal.encodeHeader(journal.MAGIC, 2) + records)


def timeOpen(directory: Path) -> tuple[float, int]:
    started = time.perf_counter()
    journaled = JournaledStore(openDirectory(str(directory)))
    elapsed = time.perf_counter() - started
    count = len(journaled)
    journaled.close()
    return elapsed, count


def timeServerStart(directory: Path) -> float:
    """Seconds from spawning ``twistd kvstore --data`` until it logs that it listens."""
    twistd = str(Path(sys.executable).with_name("twistd"))
    log = directory.parent / "server.log"
    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "kvstore", "--port", "tcp:0:interface=127.0.0.1", "--data", str(directory)],
            stdout=out, stderr=subprocess.STDOUT, cwd=directory.parent,
        )
    try:
        while b"kvstore listening on" not in log.read_bytes():
            if proc.poll() is not None:
                raise RuntimeError(log.read_text())
            time.sleep(0.005)
        return time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(30)


def measureStalls(directory: Path, compact: bool, window: float) -> tuple[float, float]:
    """Run the reactor with a 5 ms timer and light writes, with or without a compaction.

    Returns (longest gap between timer runs beyond 5 ms, seconds run);
    without a compaction it runs ``window`` seconds.
    """
    from twisted.internet import reactor, task

    from kvtwist.storage.durable import DurableService, DurableStore

    store = DurableStore(openDirectory(str(directory)), "everysec", reactor)
    durable = DurableService(store)
    durable.startService()
    last = [time.perf_counter()]
    worst = [0.0]
    counter = iter(range(10**12))
    batch = Batch()

    def tick() -> None:
        now = time.perf_counter()
        worst[0] = max(worst[0], now - last[0] - TICK)
        last[0] = now
        for _ in range(20):
            n = next(counter)
            store.put(-1 - n, n, batch)

    ticker = task.LoopingCall(tick)
    result: list[float] = []

    def run() -> None:
        ticker.start(TICK)
        started = time.perf_counter()
        done = store.compactor.start() if compact else task.deferLater(reactor, window, lambda: None)

        def finished(_: object) -> None:
            result.append(time.perf_counter() - started)
            ticker.stop()
            durable.stopService().addBoth(lambda _: reactor.stop())

        done.addBoth(finished)

    reactor.callWhenRunning(run)
    reactor.run()
    return worst[0], result[0]


def _childStalls(directory: str, compact: str, window: str) -> None:
    worst, seconds = measureStalls(Path(directory), compact == "1", float(window))
    print(f"{worst} {seconds}")


def stallsInChild(directory: Path, compact: bool, window: float) -> tuple[float, float]:
    """Each measurement in a fresh process: a reactor runs only once per process."""
    code = "import sys; from kvtwist.bench import storage as b; b._childStalls(*sys.argv[1:])"
    out = subprocess.run(
        [sys.executable, "-c", code, str(directory), "1" if compact else "0", str(window)],
        capture_output=True, text=True, check=True,
    ).stdout
    worst, seconds = map(float, out.split()[-2:])
    return worst, seconds


def _statusBytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _childMemory(directory: str) -> None:
    from kvtwist.storage.journaled import openDirectory

    before = _statusBytes("VmRSS")
    # As the server opens it: into the compiled path's map where it is built.
    opened = openDirectory(directory)
    print(before, _statusBytes("VmHWM"), _statusBytes("VmRSS"), len(opened.memory))
    opened.writer.close()
    opened.lock.release()


def memoryInChild(directory: Path) -> tuple[int, int, int, int]:
    """(resident before, peak, resident once open, keys) of a fresh process that recovers ``directory``.

    The process keeps what a server keeps afterwards, the map, so its
    resident memory once open is what the server starts serving with.
    """
    code = "import sys; from kvtwist.bench import storage as b; b._childMemory(sys.argv[1])"
    out = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, check=True).stdout
    before, peak, after, keys = map(int, out.split()[-4:])
    return before, peak, after, keys


def reportRecoveryMemory(directories: dict[str, Path]) -> None:
    for name, directory in directories.items():
        before, peak, after, keys = memoryInChild(directory)
        print(
            f"recovery memory, {name}: peak {peak / 1e6:.1f} MB, resident once open {after / 1e6:.1f} MB "
            f"(peak / resident {peak / after:.2f}); the map {(after - before) / max(keys, 1):.0f} B/key"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtwist.bench.storage", description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-only", action="store_true", help="measure only the recovery peak memory")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kvtwist-durablebench-"))
    try:
        journalOnly, withSnapshot = work / "journal-only", work / "snapshot"
        buildJournalOnly(journalOnly, args.keys)
        buildSnapshotAndJournal(withSnapshot, args.keys)
        # A running server's journal is on disk already (everysec); do not
        # let the first fsync of a compaction pay for writing the test data.
        os.sync()
        size = sum(p.stat().st_size for p in withSnapshot.iterdir())
        print(f"{args.keys:,} keys; snapshot + journal case: {size / 1e6:.1f} MB on disk")
        reportRecoveryMemory({"journal only": journalOnly, "snapshot + journal": withSnapshot})
        if args.memory_only:
            return 0

        opens: dict[str, list[float]] = {"journal only": [], "snapshot + journal": [], "twistd start-up": []}
        for _ in range(args.rounds):
            opens["journal only"].append(timeOpen(journalOnly)[0])
            opens["snapshot + journal"].append(timeOpen(withSnapshot)[0])
            opens["twistd start-up"].append(timeServerStart(withSnapshot))
        for name, times in opens.items():
            print(f"recovery, {name}: median {statistics.median(times):.2f} s (rounds: "
                  + ", ".join(f"{t:.2f}" for t in times) + ")")

        stalls: dict[str, list[float]] = {"compaction": [], "no compaction": []}
        durations = []
        for _ in range(args.rounds):
            copy = work / "copy"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(withSnapshot, copy)
            os.sync()
            worst, seconds = stallsInChild(copy, True, 0)
            stalls["compaction"].append(worst)
            durations.append(seconds)
            worst, _ = stallsInChild(copy, False, seconds)
            stalls["no compaction"].append(worst)
        print(f"compaction of {args.keys:,} keys: median {statistics.median(durations):.2f} s")
        for name, worsts in stalls.items():
            print(f"longest reactor stall, {name}: median {statistics.median(worsts) * 1000:.0f} ms (rounds: "
                  + ", ".join(f"{w * 1000:.0f}" for w in worsts) + ")")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
