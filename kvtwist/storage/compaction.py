"""Compaction: replace the journals with a fresh snapshot, step by step.

The caller has already started a new journal (generation N).  The steps
here write snapshot N from the store's keys, given in parts: each part is
the keys of one part of the store at the moment the part is taken (the
whole store, taken when journal N began, is one part).  Values are looked
up when their turn comes, so the snapshot is written in small pieces while
the store keeps changing.  That is safe because journal N holds every
change made since it began, and replaying it is a series of blind writes:
for each key, the last change in journal N wins over whatever the snapshot
caught, and a key with no change in journal N was there, with the same
value, the whole time, so its part listed it.

The steps are a generator.  It yields ``None`` between pieces of work and
``Blocking(fn)`` for work that waits on the disk (fsync), which an event
loop should run in a thread; a plain loop may just call ``fn()``.
No Twisted imports.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from kvtwist.storage.datadir import TEMP_SUFFIX, fsyncDir, listFiles, snapshotName
from kvtwist.storage.snapshot import SnapshotWriter

CHUNK = 1024

Crashpoint = Callable[[str], None]


def noCrash(step: str) -> None:
    """The default crash point: carry on."""


@dataclass(frozen=True)
class Blocking:
    """A step that waits on the disk; run it off the event loop if there is one."""

    fn: Callable[[], object]


def snapshotSteps(
    dirpath: str,
    generation: int,
    keyParts: Iterable[Sequence[int]],
    lookup: Callable[[int], int | None],
    crashpoint: Crashpoint = noCrash,
    chunk: int = CHUNK,
) -> Iterator[Blocking | None]:
    """Write snapshot ``generation``, make it current, and remove older files.

    A crash at any step leaves a directory that recovers to the right
    state: before the rename the old snapshot and all journals are still
    there; after it, the new snapshot and journal ``generation`` are.
    Closing the generator early removes the unfinished temporary file.
    """
    final = os.path.join(dirpath, snapshotName(generation))
    temp = final + TEMP_SUFFIX
    writer = SnapshotWriter(temp, generation)
    try:
        for keys in keyParts:
            for start in range(0, len(keys), chunk):
                pairs = []
                for key in keys[start : start + chunk]:
                    value = lookup(key)
                    if value is not None:
                        pairs.append((key, value))
                writer.write(pairs)
                crashpoint("snapshot partly written")
                yield None
        writer.finish()
        crashpoint("snapshot written")
        yield Blocking(writer.sync)
        crashpoint("snapshot synced")
    except BaseException:
        writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise
    writer.close()
    os.replace(temp, final)
    crashpoint("snapshot renamed")
    yield Blocking(lambda: fsyncDir(dirpath))
    crashpoint("snapshot durable")
    # Unlinking big files takes a while on some file systems: off the loop too.
    yield Blocking(lambda: removeObsolete(dirpath, generation))
    crashpoint("old files removed")
    yield Blocking(lambda: fsyncDir(dirpath))


def removeObsolete(dirpath: str, current: int) -> list[str]:
    """Remove journals and snapshots older than generation ``current``; name them."""
    listing = listFiles(dirpath)
    removed = []
    for generation, name in [*listing.journals.items(), *listing.snapshots.items()]:
        if generation < current:
            os.remove(os.path.join(dirpath, name))
            removed.append(name)
    return removed
