"""The store with its journal: every change is journaled before it is applied.

``JournaledStore`` has the ``Store`` interface, so the protocol talks to
it unchanged.  A put or del that changes something is first appended to
the journal (one write to the operating system), then applied to the
in-memory ``Store``, which stays the source of truth for reads.  If the
append fails, nothing is applied, and the store turns read-only.

When records reach the disk (fsync) is not decided here but by the fsync
policy in ``kvtwist.storage.durable``, which is told of each append through
``onAppend``.  No Twisted imports.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

from kvtwist.storage import compaction
from kvtwist.storage.datadir import DirectoryLock, createJournal, journalName, snapshotName
from kvtwist.storage.journal import encodeDel, encodePut
from kvtwist.storage.journalwriter import JournalWriteError, JournalWriter
from kvtwist.storage.recovery import recover
from kvtwist.storage.memory import Store, StoreError

# Compact once the journals are at least this big and as big as the
# snapshot (Redis's default rewrite point), which bounds what recovery
# replays to about one record per key.
COMPACT_MIN_BYTES = 8 * 1024 * 1024
COMPACT_RATIO = 1


class JournaledStore:
    """A ``Store`` whose changes are appended to a journal in a data directory."""

    def __init__(
        self,
        dirpath: str,
        store: Store,
        writer: JournalWriter,
        generation: int,
        lock: DirectoryLock | None = None,
        snapshotSize: int = 0,
        olderJournalBytes: int = 0,
        compactMinBytes: int = COMPACT_MIN_BYTES,
    ) -> None:
        self.dirpath = dirpath
        self.store = store
        self.writer = writer
        self.generation = generation
        self.lock = lock
        self.snapshotSize = snapshotSize
        # Bytes in the journals before the current one that recovery would replay.
        self._olderJournalBytes = olderJournalBytes
        self.compactMinBytes = compactMinBytes
        self.readOnlyReason: str | None = None
        self.syncBroken = False
        self.compacting = False
        # Records appended so far, and how many of them are known durable.
        self.appended = 0
        self.durable = 0
        # ``get`` goes straight to the store: reads are most of the traffic.
        self.get: Callable[[int], int | None] = store.get
        # With dependency tracking (see ``trackDependencies``): each key
        # changed by a record not yet durable, with that record's number;
        # and the highest such number read or written since the last
        # ``takeDependency``.
        self.dirty: dict[int, int] | None = None
        self.dependency = 0
        self.onAppend: Callable[[], None] = lambda: None
        self.onReadOnly: Callable[[str], None] = lambda reason: None
        self.warnings: list[str] = []

    @classmethod
    def open(cls, dirpath: str, compactMinBytes: int = COMPACT_MIN_BYTES) -> "JournaledStore":
        """Lock ``dirpath``, recover its contents, and get ready to append.

        Raises ``DataDirLocked`` or ``RecoveryError`` with a message for
        the operator; ``warnings`` lists what recovery dropped.
        """
        os.makedirs(dirpath, exist_ok=True)
        lock = DirectoryLock(dirpath)
        lock.acquire()
        try:
            recovered = recover(dirpath)
            for path in recovered.obsolete:
                os.remove(path)
            generation = recovered.journalGeneration
            if generation is None:
                generation = max(recovered.snapshotGeneration, 1)
                writer = createJournal(dirpath, generation)
                older = 0
            else:
                writer = JournalWriter.open(os.path.join(dirpath, journalName(generation)))
                older = recovered.journalBytes - writer.size
            store = _loadedStore(recovered.data)
        except BaseException:
            lock.release()
            raise
        journaled = cls(
            dirpath, store, writer, generation, lock,
            recovered.snapshotSize, older, compactMinBytes,
        )
        journaled.warnings = recovered.warnings
        return journaled

    # The Store interface

    def put(self, key: int, value: int) -> bool:
        self._checkWritable()
        if key in self.store:
            self._dependOn(key)
            return False
        self._append(encodePut(key, value), key)
        self.store.put(key, value)
        self.onAppend()
        return True

    def delete(self, key: int) -> bool:
        self._checkWritable()
        if key not in self.store:
            self._dependOn(key)
            return False
        self._append(encodeDel(key), key)
        self.store.delete(key)
        self.onAppend()
        return True

    def items(self) -> Iterator[tuple[int, int]]:
        return self.store.items()

    def __len__(self) -> int:
        return len(self.store)

    def __contains__(self, key: object) -> bool:
        return key in self.store

    # Journaling

    def _checkWritable(self) -> None:
        if self.readOnlyReason is not None:
            raise StoreError(f"store is read-only ({self.readOnlyReason})")

    def _append(self, record: bytes, key: int) -> None:
        try:
            self.writer.append(record)
        except JournalWriteError as e:
            self.turnReadOnly(f"journal write failed: {e}")
            raise StoreError(f"store is read-only ({self.readOnlyReason})") from e
        self.appended += 1
        if self.dirty is not None:
            self.dirty[key] = self.dependency = self.appended

    # Which replies depend on which records

    def trackDependencies(self) -> None:
        """Start noting, for each reply, the newest record it depends on.

        A reply depends on a record that changed the key it reads or
        writes: ``2`` after an unsynced ``put 1 2`` depends on that put;
        ``Key not found`` after an unsynced ``del`` depends on the del.
        Replies that touch only durable keys depend on nothing.
        """
        self.dirty = {}
        self.get = self._trackedGet  # type: ignore[method-assign]

    def _trackedGet(self, key: int) -> int | None:
        if self.dirty:
            self._dependOn(key)
        return self.store.get(key)

    def _dependOn(self, key: int) -> None:
        dirty = self.dirty
        if dirty:
            number = dirty.get(key, 0)
            if number > self.dependency:
                self.dependency = number

    def takeDependency(self) -> int:
        """The newest record the replies produced since the last call depend on (0: none)."""
        number, self.dependency = self.dependency, 0
        return number

    def turnReadOnly(self, reason: str) -> None:
        """Refuse all further changes; reads go on.  Only a restart undoes it."""
        if self.readOnlyReason is None:
            self.readOnlyReason = reason
            self.onReadOnly(reason)

    def sync(self) -> None:
        """Make every journaled change durable; on failure turn read-only and re-raise."""
        target, sync = self.pendingSync()
        try:
            sync()
        except OSError as e:
            self.syncFailed(e)
            raise
        self.markDurable(target)

    def pendingSync(self) -> tuple[int, Callable[[], None]]:
        """What a sync started now covers, and the call that does it.

        The call may run in another thread while appends go on; once it
        returns, pass the count to ``markDurable``.
        """
        return self.appended, self.writer.sync

    def markDurable(self, count: int) -> None:
        self.durable = durable = max(self.durable, count)
        if self.dirty:
            if durable >= self.appended:
                self.dirty.clear()
            else:
                self.dirty = {key: n for key, n in self.dirty.items() if n > durable}

    def syncFailed(self, error: OSError) -> None:
        self.syncBroken = True
        self.turnReadOnly(f"journal fsync failed: {error.strerror or error}")

    @property
    def unsynced(self) -> bool:
        return self.appended > self.durable

    def close(self) -> None:
        """Sync, close the journal and release the lock.

        The sync is tried also when the store turned read-only after a
        failed append: what was written before it still deserves the disk.
        Only after a failed fsync is it not retried (see docs/durability.md).
        Requests that still arrive while the server shuts down get a
        read-only error: nothing is appended to a closed journal.
        """
        try:
            if self.unsynced and not self.syncBroken:
                self.sync()
        finally:
            if self.readOnlyReason is None:
                self.readOnlyReason = "the server is shutting down"
            self.writer.close()
            if self.lock is not None:
                self.lock.release()

    # Compaction

    @property
    def journalBytes(self) -> int:
        """Bytes of journal that recovery would replay now."""
        return self._olderJournalBytes + self.writer.size

    def wantsCompaction(self) -> bool:
        return (
            not self.compacting
            and self.readOnlyReason is None
            and self.journalBytes >= max(self.compactMinBytes, COMPACT_RATIO * self.snapshotSize)
        )

    def compaction(
        self, crashpoint: compaction.Crashpoint = compaction.noCrash, chunk: int = compaction.CHUNK
    ) -> Iterator[compaction.Blocking | None]:
        """The steps of a compaction, for the caller to drive (see ``kvtwist.storage.compaction``).

        First, off the event loop, the new journal is created and the
        current one is fsynced; then, in one quick step, the rest of the
        current journal is fsynced and writes switch to the new one; then
        the snapshot is written.
        """
        self.compacting = True
        return self._compactionSteps(crashpoint, chunk)

    def _compactionSteps(self, crashpoint: compaction.Crashpoint, chunk: int) -> Iterator[compaction.Blocking | None]:
        generation = self.generation + 1
        created: list[JournalWriter] = []
        try:
            yield compaction.Blocking(lambda: created.append(createJournal(self.dirpath, generation, crashpoint)))
            crashpoint("new journal durable")
            yield compaction.Blocking(self.writer.sync)
            self.sync()
            crashpoint("old journal synced")
            # The switch: from here on, journal N+1 holds every change.
            old, self.writer = self.writer, created.pop()
            self._olderJournalBytes += old.size
            old.close()
            self.generation = generation
            parts = self.store.keyParts()
            yield from compaction.snapshotSteps(self.dirpath, generation, parts, self.store.get, crashpoint, chunk)
            self.snapshotSize = os.path.getsize(os.path.join(self.dirpath, snapshotName(generation)))
            self._olderJournalBytes = 0
        finally:
            self.compacting = False
            for unused in created:
                # Stopped before the switch: the empty new journal stays, and
                # recovery replays it (empty) after the current one.
                unused.close()


def _loadedStore(data: dict[int, int]) -> Store:
    """A new ``Store`` holding ``data``, filled in bulk."""
    store = Store()
    store.load(data.items(), len(data))
    return store


