"""Compaction: replace the journals with a fresh snapshot, from trigger to cleanup.

The sequence (``compactionSteps``), for a store writing journal N:

1. Create journal N+1, empty and durable (off the event loop).
2. Fsync journal N (off the event loop), then, in one quick step, end it
   with a record naming N+1, fsync what was appended meanwhile, and
   switch writes to journal N+1.  From here on journal N+1 holds every
   change.
3. Write snapshot N+1 from the store's keys, given in parts: each part is
   the keys of one part of the store at the moment the part is taken.
   Values are looked up when their turn comes, so the snapshot is written
   in small pieces while the store keeps changing.  That is safe because
   journal N+1 holds every change made since it began, and replaying it
   is a series of blind writes: for each key, the last change in journal
   N+1 wins over whatever the snapshot caught, and a key with no change in
   journal N+1 was there, with the same value, the whole time, so its
   part listed it.
4. Fsync it, rename it into place, and remove the older files.

A crash at any step leaves a directory that recovers to the right state.
The steps are a generator, free of Twisted: it yields ``None`` between
pieces of work and ``Blocking(fn)`` for work that waits on the disk, which
an event loop runs in a thread and a plain loop just calls.  ``Compactor``
drives it on the reactor, and decides when to start.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Iterator, Sequence

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvtwist.storage.datadir import TEMP_SUFFIX, createJournal, fsyncDir, listFiles, snapshotName
from kvtwist.storage.interface import Batch
from kvtwist.storage.journaled import JournaledStore
from kvtwist.storage.journalwriter import JournalWriter
from kvtwist.storage.snapshot import SnapshotWriter

# Compact once the journals are at least this big and as big as the
# snapshot (Redis's default rewrite point), which bounds what recovery
# replays to about one record per key.
COMPACT_MIN_BYTES = 8 * 1024 * 1024
COMPACT_RATIO = 1
# Keys looked up and written per step of the snapshot.
CHUNK = 1024

Crashpoint = Callable[[str], None]
RunBlocking = Callable[[Callable[[], object]], "defer.Deferred[Any]"]

_log = Logger()


def noCrash(step: str) -> None:
    """The default crash point: carry on."""


@dataclass(frozen=True)
class Blocking:
    """A step that waits on the disk; run it off the event loop if there is one."""

    fn: Callable[[], object]


def isDue(store: JournaledStore, minBytes: int = COMPACT_MIN_BYTES) -> bool:
    """Whether the journals have grown enough, against the snapshot, to be worth compacting."""
    return store.readOnlyReason is None and store.journalBytes >= max(minBytes, COMPACT_RATIO * store.snapshotSize)


Steps = Generator["Blocking | None", None, None]


def compactionSteps(store: JournaledStore, crashpoint: Crashpoint = noCrash, chunk: int = CHUNK) -> Steps:
    """The whole compaction of ``store``, step by step (see the module docstring)."""
    dirPath = store.dirPath
    generation = store.generation + 1
    created: list[JournalWriter] = []
    try:
        yield Blocking(lambda: created.append(createJournal(dirPath, generation, crashpoint)))
        crashpoint("new journal durable")
        yield Blocking(store.writer.sync)
        store.switchJournal(created.pop(), generation)
        crashpoint("old journal synced")
    finally:
        for unused in created:
            # Stopped before the switch: the empty new journal stays, and
            # recovery removes it and goes on writing the current one.
            unused.close()
    memory, batch = store.memory, Batch()
    yield from snapshotSteps(
        dirPath, generation, memory.keyParts(), lambda key: memory.get(key, batch), crashpoint, chunk
    )
    store.snapshotWritten(os.path.getsize(os.path.join(dirPath, snapshotName(generation))))


def snapshotSteps(
    dirPath: str,
    generation: int,
    keyParts: Iterable[Sequence[int]],
    lookup: Callable[[int], int | None],
    crashpoint: Crashpoint = noCrash,
    chunk: int = CHUNK,
) -> Steps:
    """Write snapshot ``generation``, make it current, and remove older files.

    Before the rename the old snapshot and all journals are still there;
    after it, the new snapshot and journal ``generation`` are.  Closing
    the generator early removes the unfinished temporary file.
    """
    final = os.path.join(dirPath, snapshotName(generation))
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
    yield Blocking(lambda: fsyncDir(dirPath))
    crashpoint("snapshot durable")
    # Unlinking big files takes a while on some file systems: off the loop too.
    yield Blocking(lambda: removeObsolete(dirPath, generation))
    crashpoint("old files removed")
    yield Blocking(lambda: fsyncDir(dirPath))


def removeObsolete(dirPath: str, current: int) -> list[str]:
    """Remove journals and snapshots older than generation ``current``; name them."""
    listing = listFiles(dirPath)
    removed = []
    for generation, name in [*listing.journals.items(), *listing.snapshots.items()]:
        if generation < current:
            os.remove(os.path.join(dirPath, name))
            removed.append(name)
    return removed


class Compactor:
    """
    Runs compactions of one store on the reactor: a piece of work per
    reactor turn, and the disk waits through ``runBlocking`` (a thread).

    A failed compaction turns the store read-only: its journal may no
    longer be trusted.
    """

    def __init__(
        self,
        store: JournaledStore,
        reactor: IReactorTime,
        runBlocking: RunBlocking,
        crashpoint: Crashpoint = noCrash,
        minBytes: int = COMPACT_MIN_BYTES,
    ) -> None:
        self.store = store
        self.reactor = reactor
        self.minBytes = minBytes
        self._runBlocking = runBlocking
        self._crashpoint = crashpoint
        self._running: defer.Deferred[None] | None = None
        self._stopping = False
        # Compactions finished, for --metrics.
        self.completed = 0

    @property
    def running(self) -> bool:
        return self._running is not None

    def startIfDue(self) -> None:
        """Start a compaction if none runs and the journals have grown enough."""
        if self._running is None and not self._stopping and isDue(self.store, self.minBytes):
            self.start()

    def start(self) -> defer.Deferred[None]:
        """Start a compaction, unless one is under way; fires when it has ended, either way."""
        if self._running is None:
            started = time.monotonic()
            # Begin on a reactor turn of its own, never in the middle of a request.
            self._running = task.deferLater(self.reactor, 0, lambda: None).addCallback(lambda _: self._run())
            self._running.addCallbacks(lambda _: self._done(started), self._failed)
        return _whenEnded(self._running)

    def stop(self) -> defer.Deferred[None]:
        """Stop after the step under way (a stopped compaction leaves a directory that recovers)."""
        self._stopping = True
        if self._running is None:
            return defer.succeed(None)
        return _whenEnded(self._running)

    def _run(self) -> defer.Deferred[None]:
        if self._stopping:
            return defer.succeed(None)
        steps = compactionSteps(self.store, self._crashpoint)
        cooperator = task.Cooperator(scheduler=lambda f: self.reactor.callLater(0, f))
        return cooperator.cooperate(self._drive(steps)).whenDone().addCallback(lambda _: None)

    def _drive(self, steps: Steps) -> Iterator[defer.Deferred[Any] | None]:
        while not self._stopping:
            try:
                step = next(steps)
            except StopIteration:
                return
            yield self._runBlocking(step.fn) if isinstance(step, Blocking) else None
        steps.close()

    def _done(self, started: float) -> None:
        self._running = None
        if not self._stopping:
            self.completed += 1
            _log.info(
                "kvstore: compaction done: snapshot {generation} holds {count} keys ({seconds:.2f} s)",
                generation=self.store.generation, count=len(self.store), seconds=time.monotonic() - started,
            )

    def _failed(self, failure: Failure) -> None:
        self._running = None
        _log.failure("kvstore: compaction failed", failure)
        self.store.turnReadOnly(f"compaction failed: {failure.value}")


def _whenEnded(running: defer.Deferred[None]) -> defer.Deferred[None]:
    """A new Deferred that fires (with None) when ``running`` does, leaving its result alone."""
    ended: defer.Deferred[None] = defer.Deferred()

    def fire(result: object) -> object:
        ended.callback(None)
        return result

    running.addBoth(fire)
    return ended
