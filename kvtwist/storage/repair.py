"""``kvtwist-repair DIR``: make a damaged data directory loadable again.

It keeps everything up to the first bad record and moves the rest aside
into side files next to the originals (``<file>.aside-<offset>``), so
nothing is thrown away: the moved bytes can still be examined or
restored by hand.  Journals after the damaged one are moved aside whole,
because replaying them without the records that were lost would give a
state the server never had.  Run it only while no server uses the
directory (it takes the directory's lock to make sure).
"""

from __future__ import annotations

import argparse
import os
import sys

from kvtwist.storage import journal, snapshot
from kvtwist.storage.datadir import DataDirLocked, DirectoryLock, fsyncDir, listFiles, writeFileAtomically
from kvtwist.storage.recovery import RecoveryError, recover

ASIDE = ".aside"


def _saveTail(path: str, offset: int) -> str:
    """Copy ``path`` from ``offset`` on into a durable side file, and name it."""
    side = f"{path}{ASIDE}-{offset}"
    with open(path, "rb") as f:
        f.seek(offset)
        tail = f.read()
    with open(side, "wb") as f:
        f.write(tail)
        f.flush()
        os.fsync(f.fileno())
    return side


def _moveTailAside(path: str, offset: int) -> str:
    """Save ``path`` from ``offset`` on into a side file, then cut ``path`` there."""
    side = _saveTail(path, offset)
    with open(path, "r+b") as f:
        f.truncate(offset)
        f.flush()
        os.fsync(f.fileno())
    return side


def repair(dirpath: str) -> list[str]:
    """Repair ``dirpath`` in place and return one line per change made."""
    listing = listFiles(dirpath)
    actions: list[str] = []
    base = max(listing.snapshots, default=0)
    if base:
        actions += _repairSnapshot(dirpath, listing.snapshots[base])

    damaged = False
    for generation in sorted(g for g in listing.journals if g >= base):
        path = os.path.join(dirpath, listing.journals[generation])
        if damaged:
            os.replace(path, path + ASIDE)
            actions.append(f"moved {path} aside to {path + ASIDE} (it follows the damaged journal)")
            continue
        try:
            scan = journal.readJournal(path)
        except journal.JournalFormatError as e:
            os.replace(path, path + ASIDE)
            actions.append(f"moved {path} aside to {path + ASIDE} (bad header: {e.detail})")
            damaged = True
            continue
        if not scan.clean:
            side = _moveTailAside(path, scan.goodEnd)
            actions.append(
                f"kept {scan.records} records of {path}; moved {scan.size - scan.goodEnd} bytes "
                f"from offset {scan.goodEnd} ({scan.detail}) aside to {side}"
            )
            damaged = True
    if actions:
        fsyncDir(dirpath)
    return actions


def _repairSnapshot(dirpath: str, name: str) -> list[str]:
    path = os.path.join(dirpath, name)
    good: dict[int, int] = {}
    try:
        scan = snapshot.readSnapshot(path, good)
    except journal.JournalFormatError as e:
        os.replace(path, path + ASIDE)
        return [f"moved {path} aside to {path + ASIDE} (bad header: {e.detail}); its keys are lost"]
    if scan.complete:
        return []
    side = _saveTail(path, scan.goodEnd)
    writeFileAtomically(dirpath, name, snapshot.encodeSnapshot(scan.generation, good.items()))
    return [
        f"kept {scan.entries} entries of {path}; moved {scan.size - scan.goodEnd} bytes from offset "
        f"{scan.goodEnd} ({scan.detail}) aside to {side}; the keys stored there are lost"
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kvtwist-repair",
        description="Keep everything in a kvtwist data directory up to the first bad record; "
        "move the rest aside to side files.",
    )
    parser.add_argument("directory", help="the data directory given to the server with --data")
    args = parser.parse_args(argv)
    dirpath = args.directory
    if not os.path.isdir(dirpath):
        print(f"kvtwist-repair: {dirpath} is not a directory", file=sys.stderr)
        return 2
    lock = DirectoryLock(dirpath)
    try:
        lock.acquire()
    except DataDirLocked as e:
        print(f"kvtwist-repair: {e}", file=sys.stderr)
        return 1
    try:
        actions = repair(dirpath)
        for line in actions:
            print(line)
        recovered = recover(dirpath, truncateTorn=False)
    except (RecoveryError, OSError) as e:
        print(f"kvtwist-repair: {e}", file=sys.stderr)
        return 1
    finally:
        lock.release()
    state = "repaired; it now loads" if actions else "nothing to repair; it loads"
    print(f"{dirpath}: {state} {len(recovered.data)} keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
