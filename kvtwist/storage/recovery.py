"""Recovery: rebuild the store's contents from a data directory.

Load the newest snapshot, then replay its journal and every later one,
straight into the map the store will serve from (an ``IntMap``, or on
the compiled path a ``CompiledStore``): nothing is held
twice, and files are read a piece at a time.  A torn last record in the
journal being written (the process died mid-write) is dropped and, when
asked, cut off the file, with a warning naming file and offset.
Anything else that is wrong, a missing file included, stops recovery
with a ``RecoveryError`` that says where and what to do: nothing is ever
dropped silently.  No Twisted imports.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Callable, Protocol, TypeVar

from kvtwist.storage import journal, snapshot
from kvtwist.storage.datadir import journalName, listFiles, snapshotName, truncateFile
from kvtwist.storage.intmap import IntMap

T = TypeVar("T")


class RecoveryError(Exception):
    """The data directory cannot be loaded as it is; the message says why and what to do."""


@dataclass
class Recovered:
    """The state found in a data directory, and where writing goes on.

    ``journalGeneration`` is the journal to append to (None: the
    directory is empty); ``journalBytes`` counts the bytes replayed from
    it and the journals before it.  ``obsolete`` names files to remove
    before writing: left-overs of older generations, unfinished
    temporaries, and an empty journal that a compaction created but never
    switched to.
    """

    map: RecoveryTarget
    snapshotGeneration: int
    snapshotSize: int
    journalGeneration: int | None
    journalBytes: int
    warnings: list[str] = field(default_factory=list)
    obsolete: list[str] = field(default_factory=list)


def repairHint(dirPath: str) -> str:
    return (
        f"Nothing was changed. To keep everything before that offset and move the rest aside, run: "
        f"kvtwist-repair {dirPath} (or kvtwist-repair --salvage {dirPath} to also keep the good records "
        f"after the damage; docs/durability.md says when each is right)"
    )


def corruptionMessage(dirPath: str, path: str, offset: int, detail: str, size: int) -> str:
    return (
        f"corrupt data in {path} at offset {offset}: {detail} "
        f"({size - offset} bytes from there to the end of the file). {repairHint(dirPath)}"
    )


class RecoveryTarget(journal.ReplayTarget, Protocol):
    """What recovery fills: a map that replay writes to, and that can make room for a snapshot's entries first."""

    def reserve(self, count: int, /) -> None: ...

    def __len__(self) -> int: ...


def recover(dirPath: str, truncateTorn: bool = True, into: RecoveryTarget | None = None) -> Recovered:
    """Read the data directory ``dirPath`` and return what it holds, in ``into`` (a new ``IntMap`` by default).

    With ``truncateTorn``, a torn tail is also cut off the journal being
    written (and the cut made durable), so appends continue from a good
    record.  Nothing is changed unless the whole directory checks out.
    """
    listing = listFiles(dirPath)
    base = max(listing.snapshots, default=0)
    generations = sorted(g for g in listing.journals if g >= base)
    _checkNothingMissing(dirPath, base, generations)
    paths = [os.path.join(dirPath, listing.journals[g]) for g in generations]

    target: RecoveryTarget = IntMap() if into is None else into
    snapshotSize = 0
    if base:
        path = os.path.join(dirPath, listing.snapshots[base])
        claimed = _checked(dirPath, path, lambda: snapshot.claimedEntries(path))
        if claimed:
            target.reserve(claimed)
        snap = _checked(dirPath, path, lambda: snapshot.readSnapshot(path, target))
        if not snap.complete:
            raise RecoveryError(corruptionMessage(dirPath, path, snap.goodEnd, snap.detail, snap.size))
        _checkGeneration(path, snap.generation, base)
        snapshotSize = snap.size

    scans: list[journal.JournalScan] = []
    for generation, path in zip(generations, paths):
        scan = _checked(dirPath, path, lambda: journal.readJournal(path, target))
        _checkGeneration(path, scan.generation, generation)
        if not scan.clean and not scan.torn:
            raise RecoveryError(corruptionMessage(dirPath, path, scan.goodEnd, scan.detail, scan.size))
        scans.append(scan)
    for i, scan in enumerate(scans):
        # Only the journal being written can have a torn tail: the newest,
        # or the one before an empty newest that a compaction created but
        # never switched to.  Older ones were fsynced before the next began.
        beingWritten = i == len(scans) - 1 or (i == len(scans) - 2 and scans[-1].empty)
        if not scan.clean and not beingWritten:
            raise RecoveryError(corruptionMessage(dirPath, scan.path, scan.goodEnd, scan.detail, scan.size))

    unused = _checkEnds(dirPath, scans)
    live = scans[: len(scans) - len(unused)]
    recovered = Recovered(
        target, base, snapshotSize, live[-1].generation if live else None, sum(s.goodEnd for s in live)
    )
    for scan in live:
        if not scan.clean:
            action = "the file was truncated there" if truncateTorn else "the file was left as it is"
            recovered.warnings.append(
                f"dropped a torn record at the end of {scan.path} at offset {scan.goodEnd} "
                f"({scan.size - scan.goodEnd} bytes: {scan.detail}); {action}"
            )
            if truncateTorn:
                truncateFile(scan.path, scan.goodEnd)

    recovered.obsolete = [
        os.path.join(dirPath, name)
        for name in (
            [n for g, n in listing.journals.items() if g < base]
            + [n for g, n in listing.snapshots.items() if g < base]
            + listing.temporaries
        )
    ] + [scan.path for scan in unused]
    return recovered


def _checkNothingMissing(dirPath: str, base: int, generations: list[int]) -> None:
    """Refuse a directory that lacks a snapshot or journal the others continue from."""

    def here(name: str) -> str:
        return os.path.join(dirPath, name)

    if not generations:
        if base:
            raise RecoveryError(
                f"{here(journalName(base))} is missing: it holds every change made since "
                f"{here(snapshotName(base))} was taken, and starting without it would silently lose them. "
                f"Nothing was changed. Restore it from a backup. If there is none, run "
                f"kvtwist-repair {dirPath}: it creates the journal empty, and the directory then loads the "
                f"snapshot's keys, without the changes made since."
            )
        return
    first = generations[0]
    if not base and first != 1:
        raise RecoveryError(
            f"{here(snapshotName(first))} is missing: {here(journalName(first))} continues from it "
            f"(only generation 1 starts without a snapshot), and starting without it would silently lose "
            f"every key it held. Nothing was changed. Restore it from a backup; kvtwist-repair cannot "
            f"rebuild a missing snapshot (its keys are nowhere else)."
        )
    expected = base or 1
    for generation in generations:
        if generation != expected:
            after = f"the end of {here(journalName(expected - 1))}" if expected > base else "the snapshot"
            raise RecoveryError(
                f"{here(journalName(expected))} is missing: it comes before {here(journalName(generation))}, "
                f"and starting without it would silently lose the changes it held. Nothing was changed. "
                f"Restore it from a backup. If there is none, run kvtwist-repair {dirPath}: "
                f"it moves {journalName(generation)} and any later journals aside, and the directory then "
                f"loads the state as of {after}, without the changes made since."
            )
        expected += 1


def _checkEnds(dirPath: str, scans: list[journal.JournalScan]) -> list[journal.JournalScan]:
    """Check that each journal followed by another says so; return the empty last one never switched to, if any.

    The end record is what tells a journal cut exactly between two
    records from one that really ended there.  Version 1 journals had
    none, so for them it cannot be checked.
    """
    for i, (earlier, later) in enumerate(zip(scans, scans[1:])):
        if earlier.nextGeneration is not None:
            continue
        if i == len(scans) - 2 and later.empty:
            return [later]
        if earlier.version >= 2:
            raise RecoveryError(
                f"corrupt data in {earlier.path} at offset {earlier.size}: the journal ends without an end "
                f"record, but {later.path} follows it, so its last records were lost. {repairHint(dirPath)}"
            )
    newest = scans[-1] if scans else None
    if newest is not None and newest.nextGeneration is not None:
        missing = os.path.join(dirPath, journalName(newest.nextGeneration))
        raise RecoveryError(
            f"{missing} is missing: {newest.path} ends saying that writes went on in it, and starting "
            f"without it would silently lose them. Nothing was changed. Restore it from a backup. If there "
            f"is none, run kvtwist-repair {dirPath}: it creates the journal empty, and the "
            f"directory then loads the state as of the end of {newest.path}, without the changes made since."
        )
    return []


def _checked(dirPath: str, path: str, read: Callable[[], T]) -> T:
    """Run ``read``, turning a bad header or a symbolic link into the operator's message."""
    try:
        return read()
    except journal.JournalFormatError as e:
        raise RecoveryError(corruptionMessage(dirPath, e.path, e.offset, e.detail, os.path.getsize(e.path))) from e
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise RecoveryError(
            f"{path} is a symbolic link; kvtwist never follows links in its data directory. "
            f"Nothing was changed. Put the file itself there in place of the link."
        ) from e


def _checkGeneration(path: str, found: int, expected: int) -> None:
    if found != expected:
        raise RecoveryError(
            f"{path} says it is generation {found}, but its name says {expected}; "
            f"the file was renamed or copied by hand: move it back or away"
        )
