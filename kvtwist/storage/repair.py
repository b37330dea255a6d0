"""``kvtwist-repair DIR``: make a damaged data directory loadable again.

It keeps everything up to the first bad record and moves the rest aside
into side files next to the originals (``<file>.aside-<offset>``), so
nothing is thrown away: the moved bytes can still be examined or
restored by hand.  Journals after the damaged one are moved aside whole,
because replaying them without the records that were lost would give a
state the server never had.  A missing journal is recreated empty when
only the changes it held are lost (the state before it is whole); a
missing snapshot cannot be rebuilt, and the directory is left alone.
Run it only while no server uses the directory (it takes the directory's
lock to make sure).
"""

from __future__ import annotations

import argparse
import os
import sys

from kvtwist.storage import journal, snapshot
from kvtwist.storage.datadir import (
    DataDirLocked,
    DirectoryLock,
    createPrivateFile,
    fsyncDir,
    journalName,
    listFiles,
    truncateFile,
    writeAll,
    writeFileAtomically,
    writeTemporary,
)
from kvtwist.storage.recovery import RecoveryError, recover

ASIDE = ".aside"
_COPY_CHUNK = 1 << 20


def _asideName(name: str) -> str:
    """``name``, or ``name.1``, ``name.2``...: never overwrite what an earlier repair put aside."""
    candidate, number = name, 0
    while os.path.lexists(candidate):
        number += 1
        candidate = f"{name}.{number}"
    return candidate


def _moveAside(path: str) -> str:
    side = _asideName(path + ASIDE)
    os.replace(path, side)
    return side


def _copyInto(fd: int, path: str, start: int, stop: int | None) -> None:
    """Append bytes ``start`` to ``stop`` (None: the end) of ``path`` to the file ``fd``."""
    with journal.openNoFollow(path) as source:
        source.seek(start)
        left = None if stop is None else stop - start
        while left is None or left > 0:
            chunk = source.read(_COPY_CHUNK if left is None else min(left, _COPY_CHUNK))
            if not chunk:
                break
            writeAll(fd, chunk)
            if left is not None:
                left -= len(chunk)


def _saveTail(path: str, offset: int) -> str:
    """Copy ``path`` from ``offset`` on into a new durable side file, and name it."""
    side = _asideName(f"{path}{ASIDE}-{offset}")
    fd = createPrivateFile(side)
    try:
        _copyInto(fd, path, offset, None)
        os.fsync(fd)
    finally:
        os.close(fd)
    return side


def _moveTailAside(path: str, offset: int) -> str:
    """Save ``path`` from ``offset`` on into a side file, then cut ``path`` there."""
    side = _saveTail(path, offset)
    truncateFile(path, offset)
    return side


def repair(dirPath: str) -> list[str]:
    """Repair ``dirPath`` in place and return one line per change made."""
    listing = listFiles(dirPath)
    actions: list[str] = []
    for name in listing.temporaries:
        # Unfinished, and in the way of the files repair writes: a server
        # would remove them at start-up too.
        os.remove(os.path.join(dirPath, name))
        actions.append(f"removed the unfinished {os.path.join(dirPath, name)}")
    base = max(listing.snapshots, default=0)
    if base:
        actions += _repairSnapshot(dirPath, listing.snapshots[base])
    generations = sorted(g for g in listing.journals if g >= base)
    if not base and generations and generations[0] != 1:
        return actions  # a missing snapshot: recovery says what to do
    if base and not os.path.exists(os.path.join(dirPath, listing.snapshots[base])):
        return actions  # moved aside just now: the same

    kept: list[journal.JournalScan] = []
    damaged = False
    expected = base or 1
    for generation in generations:
        path = os.path.join(dirPath, listing.journals[generation])
        if damaged or generation != expected:
            why = "it follows the damaged journal" if damaged else f"it follows the missing {journalName(expected)}"
            actions.append(f"moved {path} aside to {_moveAside(path)} ({why})")
            damaged = True
            continue
        expected += 1
        try:
            scan = journal.readJournal(path)
        except journal.JournalFormatError as e:
            actions.append(f"moved {path} aside to {_moveAside(path)} (bad header: {e.detail})")
            damaged = True
            continue
        previous = kept[-1] if kept else None
        unused = generation == generations[-1] and scan.empty
        if previous and previous.nextGeneration is None and previous.version >= 2 and not unused:
            actions.append(
                f"moved {path} aside to {_moveAside(path)} ({previous.path} has no end record, "
                f"so the records at its end were lost)"
            )
            damaged = True
            continue
        if not scan.clean:
            side = _moveTailAside(path, scan.goodEnd)
            actions.append(
                f"kept {scan.records} records of {path}; moved {scan.size - scan.goodEnd} bytes "
                f"from offset {scan.goodEnd} ({scan.detail}) aside to {side}"
            )
            # Bytes after an end record hide no change: the journals after it are whole.
            damaged = scan.nextGeneration is None
        kept.append(scan)

    missing = None
    if not kept and base:
        missing = base
    elif kept and kept[-1].nextGeneration is not None:
        missing = kept[-1].nextGeneration
    if missing is not None:
        name = journalName(missing)
        writeFileAtomically(dirPath, name, journal.encodeHeader(journal.MAGIC, missing))
        actions.append(
            f"created {os.path.join(dirPath, name)} empty in place of the missing journal; the changes it held are lost"
        )
    if actions:
        fsyncDir(dirPath)
    return actions


def _repairSnapshot(dirPath: str, name: str) -> list[str]:
    path = os.path.join(dirPath, name)
    try:
        scan = snapshot.readSnapshot(path, None)
    except journal.JournalFormatError as e:
        return [f"moved {path} aside to {_moveAside(path)} (bad header: {e.detail}); its keys cannot be read"]
    if scan.complete:
        return []
    side = _saveTail(path, scan.goodEnd)

    def goodBlocks(fd: int) -> None:
        # The good blocks as they are, then a trailer that counts them.
        _copyInto(fd, path, 0, scan.goodEnd)
        writeAll(fd, snapshot.encodeTrailer(scan.entries))

    os.replace(writeTemporary(path, goodBlocks), path)
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
    dirPath = args.directory
    if not os.path.isdir(dirPath):
        print(f"kvtwist-repair: {dirPath} is not a directory", file=sys.stderr)
        return 2
    lock = DirectoryLock(dirPath)
    try:
        lock.acquire()
    except DataDirLocked as e:
        print(f"kvtwist-repair: {e}", file=sys.stderr)
        return 1
    try:
        actions = repair(dirPath)
        for line in actions:
            print(line)
        recovered = recover(dirPath, truncateTorn=False)
    except (RecoveryError, OSError) as e:
        print(f"kvtwist-repair: {e}", file=sys.stderr)
        return 1
    finally:
        lock.release()
    state = "repaired; it now loads" if actions else "nothing to repair; it loads"
    print(f"{dirPath}: {state} {len(recovered.map)} keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
