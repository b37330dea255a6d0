"""The store with its journal: every change is journaled before it is applied.

``JournaledStore`` has the ``Store`` interface, so the protocol talks to
it unchanged.  A put or del that changes something is first appended to
the journal (one write to the operating system), then applied to the
in-memory ``Store``, which stays the source of truth for reads.  If the
append fails, nothing is applied, and the store turns read-only.

When records reach the disk (fsync) is not decided here but by the fsync
policy in ``kvtwist.durable``, which is told of each append through
``on_append``.  No Twisted imports.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

from kvtwist import compaction
from kvtwist.datadir import DirectoryLock, create_journal, journal_name, snapshot_name
from kvtwist.journal import JournalWriteError, JournalWriter, encode_del, encode_put
from kvtwist.recovery import recover
from kvtwist.store import Store, StoreError

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
        snapshot_size: int = 0,
        older_journal_bytes: int = 0,
        compact_min_bytes: int = COMPACT_MIN_BYTES,
    ) -> None:
        self.dirpath = dirpath
        self.store = store
        self.writer = writer
        self.generation = generation
        self.lock = lock
        self.snapshot_size = snapshot_size
        # Bytes in the journals before the current one that recovery would replay.
        self._older_journal_bytes = older_journal_bytes
        self.compact_min_bytes = compact_min_bytes
        self.read_only_reason: str | None = None
        self.sync_broken = False
        self.compacting = False
        # Records appended so far, and how many of them are known durable.
        self.appended = 0
        self.durable = 0
        # ``get`` goes straight to the store: reads are most of the traffic.
        self.get: Callable[[int], int | None] = store.get
        # With dependency tracking (see ``track_dependencies``): each key
        # changed by a record not yet durable, with that record's number;
        # and the highest such number read or written since the last
        # ``take_dependency``.
        self.dirty: dict[int, int] | None = None
        self.dependency = 0
        self.on_append: Callable[[], None] = lambda: None
        self.on_read_only: Callable[[str], None] = lambda reason: None
        self.warnings: list[str] = []

    @classmethod
    def open(cls, dirpath: str, compact_min_bytes: int = COMPACT_MIN_BYTES) -> "JournaledStore":
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
            generation = recovered.journal_generation
            if generation is None:
                generation = max(recovered.snapshot_generation, 1)
                writer = create_journal(dirpath, generation)
                older = 0
            else:
                writer = JournalWriter.open(os.path.join(dirpath, journal_name(generation)))
                older = recovered.journal_bytes - writer.size
            store = _loaded_store(recovered.data)
        except BaseException:
            lock.release()
            raise
        journaled = cls(
            dirpath, store, writer, generation, lock,
            recovered.snapshot_size, older, compact_min_bytes,
        )
        journaled.warnings = recovered.warnings
        return journaled

    # The Store interface

    def put(self, key: int, value: int) -> bool:
        self._check_writable()
        if key in self.store:
            self._depend_on(key)
            return False
        self._append(encode_put(key, value), key)
        self.store.put(key, value)
        self.on_append()
        return True

    def delete(self, key: int) -> bool:
        self._check_writable()
        if key not in self.store:
            self._depend_on(key)
            return False
        self._append(encode_del(key), key)
        self.store.delete(key)
        self.on_append()
        return True

    def items(self) -> Iterator[tuple[int, int]]:
        return self.store.items()

    def __len__(self) -> int:
        return len(self.store)

    def __contains__(self, key: object) -> bool:
        return key in self.store

    # Journaling

    def _check_writable(self) -> None:
        if self.read_only_reason is not None:
            raise StoreError(f"store is read-only ({self.read_only_reason})")

    def _append(self, record: bytes, key: int) -> None:
        try:
            self.writer.append(record)
        except JournalWriteError as e:
            self.turn_read_only(f"journal write failed: {e}")
            raise StoreError(f"store is read-only ({self.read_only_reason})") from e
        self.appended += 1
        if self.dirty is not None:
            self.dirty[key] = self.dependency = self.appended

    # Which replies depend on which records

    def track_dependencies(self) -> None:
        """Start noting, for each reply, the newest record it depends on.

        A reply depends on a record that changed the key it reads or
        writes: ``2`` after an unsynced ``put 1 2`` depends on that put;
        ``Key not found`` after an unsynced ``del`` depends on the del.
        Replies that touch only durable keys depend on nothing.
        """
        self.dirty = {}
        self.get = self._tracked_get  # type: ignore[method-assign]

    def _tracked_get(self, key: int) -> int | None:
        if self.dirty:
            self._depend_on(key)
        return self.store.get(key)

    def _depend_on(self, key: int) -> None:
        dirty = self.dirty
        if dirty:
            number = dirty.get(key, 0)
            if number > self.dependency:
                self.dependency = number

    def take_dependency(self) -> int:
        """The newest record the replies produced since the last call depend on (0: none)."""
        number, self.dependency = self.dependency, 0
        return number

    def turn_read_only(self, reason: str) -> None:
        """Refuse all further changes; reads go on.  Only a restart undoes it."""
        if self.read_only_reason is None:
            self.read_only_reason = reason
            self.on_read_only(reason)

    def sync(self) -> None:
        """Make every journaled change durable; on failure turn read-only and re-raise."""
        target, sync = self.pending_sync()
        try:
            sync()
        except OSError as e:
            self.sync_failed(e)
            raise
        self.mark_durable(target)

    def pending_sync(self) -> tuple[int, Callable[[], None]]:
        """What a sync started now covers, and the call that does it.

        The call may run in another thread while appends go on; once it
        returns, pass the count to ``mark_durable``.
        """
        return self.appended, self.writer.sync

    def mark_durable(self, count: int) -> None:
        self.durable = durable = max(self.durable, count)
        if self.dirty:
            if durable >= self.appended:
                self.dirty.clear()
            else:
                self.dirty = {key: n for key, n in self.dirty.items() if n > durable}

    def sync_failed(self, error: OSError) -> None:
        self.sync_broken = True
        self.turn_read_only(f"journal fsync failed: {error.strerror or error}")

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
            if self.unsynced and not self.sync_broken:
                self.sync()
        finally:
            if self.read_only_reason is None:
                self.read_only_reason = "the server is shutting down"
            self.writer.close()
            if self.lock is not None:
                self.lock.release()

    # Compaction

    @property
    def journal_bytes(self) -> int:
        """Bytes of journal that recovery would replay now."""
        return self._older_journal_bytes + self.writer.size

    def wants_compaction(self) -> bool:
        return (
            not self.compacting
            and self.read_only_reason is None
            and self.journal_bytes >= max(self.compact_min_bytes, COMPACT_RATIO * self.snapshot_size)
        )

    def compaction(
        self, crashpoint: compaction.Crashpoint = compaction.no_crash, chunk: int = compaction.CHUNK
    ) -> Iterator[compaction.Blocking | None]:
        """The steps of a compaction, for the caller to drive (see ``kvtwist.compaction``).

        First, off the event loop, the new journal is created and the
        current one is fsynced; then, in one quick step, the rest of the
        current journal is fsynced and writes switch to the new one; then
        the snapshot is written.
        """
        self.compacting = True
        return self._compaction_steps(crashpoint, chunk)

    def _compaction_steps(self, crashpoint: compaction.Crashpoint, chunk: int) -> Iterator[compaction.Blocking | None]:
        generation = self.generation + 1
        created: list[JournalWriter] = []
        try:
            yield compaction.Blocking(lambda: created.append(create_journal(self.dirpath, generation, crashpoint)))
            crashpoint("new journal durable")
            yield compaction.Blocking(self.writer.sync)
            self.sync()
            crashpoint("old journal synced")
            # The switch: from here on, journal N+1 holds every change.
            old, self.writer = self.writer, created.pop()
            self._older_journal_bytes += old.size
            old.close()
            self.generation = generation
            parts = self.store.key_parts()
            yield from compaction.snapshot_steps(self.dirpath, generation, parts, self.store.get, crashpoint, chunk)
            self.snapshot_size = os.path.getsize(os.path.join(self.dirpath, snapshot_name(generation)))
            self._older_journal_bytes = 0
        finally:
            self.compacting = False
            for unused in created:
                # Stopped before the switch: the empty new journal stays, and
                # recovery replays it (empty) after the current one.
                unused.close()


def _loaded_store(data: dict[int, int]) -> Store:
    """A new ``Store`` holding ``data``, filled in bulk."""
    store = Store()
    store.load(data.items(), len(data))
    return store


