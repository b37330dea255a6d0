"""Recovery: rebuild the store's contents from a data directory.

Load the newest snapshot, then replay its journal and every later one.
A torn last record in the newest journal (the process died mid-write) is
dropped and, when asked, cut off the file, with a warning naming file and
offset.  Anything else that is wrong stops recovery with a
``RecoveryError`` that says where and what to do: nothing is ever dropped
silently.  No Twisted imports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from kvtwist.storage import journal, snapshot
from kvtwist.storage.datadir import listFiles


T = TypeVar("T")


class RecoveryError(Exception):
    """The data directory cannot be loaded as it is; the message says why and what to do."""


@dataclass
class Recovered:
    """The state found in a data directory, and where writing goes on."""

    data: dict[int, int]
    snapshotGeneration: int
    snapshotSize: int
    journalGeneration: int | None
    journalBytes: int
    warnings: list[str] = field(default_factory=list)
    obsolete: list[str] = field(default_factory=list)


def repairHint(dirpath: str) -> str:
    return (
        f"Nothing was changed. To keep everything before that offset and move the rest aside, "
        f"stop the server and run: kvtwist-repair {dirpath}"
    )


def corruptionMessage(dirpath: str, path: str, offset: int, detail: str, size: int) -> str:
    return (
        f"corrupt data in {path} at offset {offset}: {detail} "
        f"({size - offset} bytes from there to the end of the file). {repairHint(dirpath)}"
    )


def recover(dirpath: str, truncateTorn: bool = True) -> Recovered:
    """Read the data directory ``dirpath`` and return what it holds.

    With ``truncateTorn``, a torn tail is also cut off the newest journal
    (and the cut made durable), so appends continue from a good record.
    """
    listing = listFiles(dirpath)
    data: dict[int, int] = {}
    base = max(listing.snapshots, default=0)
    snapshotSize = 0
    if base:
        path = os.path.join(dirpath, listing.snapshots[base])
        scan = _checked(dirpath, lambda: snapshot.readSnapshot(path, data))
        if not scan.complete:
            raise RecoveryError(corruptionMessage(dirpath, path, scan.goodEnd, scan.detail, scan.size))
        _checkGeneration(path, scan.generation, base)
        snapshotSize = scan.size

    generations = sorted(g for g in listing.journals if g >= base)
    expected = list(range(generations[0], generations[0] + len(generations))) if generations else []
    if generations != expected or (base and generations and generations[0] != base):
        names = ", ".join(listing.journals[g] for g in generations) or "none"
        raise RecoveryError(
            f"journals in {dirpath} are not a continuous sequence after snapshot {base} "
            f"(found: {names}); a journal file is missing: restore it from a backup"
        )

    recovered = Recovered(data, base, snapshotSize, generations[-1] if generations else None, 0)
    for generation in generations:
        path = os.path.join(dirpath, listing.journals[generation])
        scan = _checked(dirpath, lambda: journal.readJournal(path, data))
        _checkGeneration(path, scan.generation, generation)
        if not scan.clean:
            if not scan.torn or generation != generations[-1]:
                raise RecoveryError(corruptionMessage(dirpath, path, scan.goodEnd, scan.detail, scan.size))
            action = "the file was truncated there" if truncateTorn else "the file was left as it is"
            recovered.warnings.append(
                f"dropped a torn record at the end of {path} at offset {scan.goodEnd} "
                f"({scan.size - scan.goodEnd} bytes: {scan.detail}); {action}"
            )
            if truncateTorn:
                _truncate(path, scan.goodEnd)
        recovered.journalBytes += scan.goodEnd

    recovered.obsolete = [
        os.path.join(dirpath, name)
        for name in (
            [n for g, n in listing.journals.items() if g < base]
            + [n for g, n in listing.snapshots.items() if g < base]
            + listing.temporaries
        )
    ]
    return recovered


def _checked(dirpath: str, read: Callable[[], T]) -> T:
    """Run ``read``, turning a bad header into the operator's message."""
    try:
        return read()
    except journal.JournalFormatError as e:
        raise RecoveryError(corruptionMessage(dirpath, e.path, e.offset, e.detail, os.path.getsize(e.path))) from e


def _checkGeneration(path: str, found: int, expected: int) -> None:
    if found != expected:
        raise RecoveryError(
            f"{path} says it is generation {found}, but its name says {expected}; "
            f"the file was renamed or copied by hand: move it back or away"
        )


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())
