"""The store with its journal: every change is journaled before it is applied.

A put or del that changes something is first appended to the journal (one
write to the operating system), then applied to the in-memory store, which
stays the source of truth for reads.  If the append fails, nothing is
applied, and the store turns read-only.

When replies wait for an fsync anyway (``holdReplies``: ``--fsync
always``), a write per change would only cost a system call: the change
is applied at once and its record kept pending, to be written with the
others (``writePending``, one write) before the fsync that its replies
wait for.  If that write fails, the changes are taken back, newest first,
so that again nothing stays applied that is not in the journal, and the
store turns read-only; the replies that waited are never sent.

On the compiled path (``kvtwist.compiled``) the in-memory store is a
``CompiledStore``, and a chunk's common requests run in C
(``runJournaledChunk``), which keeps the records of its changes pending in
the same way; ``runChunk`` writes them at once when replies are not held.

What this module does not decide: when records reach the disk and which
replies wait for them (the fsync policies in ``kvtwist.storage.fsync``),
and when and how to compact (``kvtwist.storage.compaction``, which tells
this store when to switch journals).  No Twisted imports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from kvtwist.compiled import CompiledStore
from kvtwist.storage.datadir import DirectoryLock, createJournal, journalName, makeDataDir
from kvtwist.storage.interface import Batch, StoreFull, StoreReadOnly
from kvtwist.storage.journal import encodeDel, encodeEnd, encodePut
from kvtwist.storage.journalwriter import JournalSyncError, JournalWriteError, JournalWriter
from kvtwist.storage.intmap import IntMap
from kvtwist.storage.memory import STORE_FULL, MemoryStore
from kvtwist.storage.recovery import recover

if TYPE_CHECKING:
    from kvtwist.compiled._chunk import CompiledStore as _CompiledStore


@dataclass
class OpenedDirectory:
    """A locked and recovered data directory, ready for appending."""

    path: str
    lock: DirectoryLock
    # A CompiledStore on the compiled path.
    memory: MemoryStore | _CompiledStore
    writer: JournalWriter
    generation: int
    snapshotSize: int
    olderJournalBytes: int
    warnings: list[str] = field(default_factory=list)


def openDirectory(dirPath: str, maxKeys: int | None = None, compiled: bool = CompiledStore is not None) -> OpenedDirectory:
    """Lock ``dirPath``, recover its contents, and open its newest journal.

    ``maxKeys`` limits the store as ``MemoryStore`` says; a directory that
    already holds more keys still opens, and only refuses new ones. With
    ``compiled`` (where the compiled path is built), recovery fills a
    ``CompiledStore`` straight away, else an ``IntMap`` for a ``MemoryStore``.

    Raises ``DataDirLocked`` or ``RecoveryError`` with a message for the
    operator; ``warnings`` lists what recovery dropped.
    """
    makeDataDir(dirPath)
    lock = DirectoryLock(dirPath)
    lock.acquire()
    try:
        memory: MemoryStore | _CompiledStore
        if compiled:
            assert CompiledStore is not None, "the compiled path is not built"
            memory = CompiledStore(maxKeys=maxKeys)
            recovered = recover(dirPath, into=memory)
        else:
            entries = IntMap()
            recovered = recover(dirPath, into=entries)
            memory = MemoryStore(entries, maxKeys)
        for path in recovered.obsolete:
            os.remove(path)
        generation = recovered.journalGeneration
        if generation is None:
            # Only an empty directory has no journal (recovery refuses a
            # snapshot without its own).
            generation = 1
            writer = createJournal(dirPath, generation)
            older = 0
        else:
            writer = JournalWriter.open(os.path.join(dirPath, journalName(generation)))
            older = recovered.journalBytes - writer.size
    except BaseException:
        lock.release()
        raise
    return OpenedDirectory(
        dirPath, lock, memory, writer, generation, recovered.snapshotSize, older, recovered.warnings
    )


class JournaledStore:
    """
    The store whose changes are appended to a journal in a data directory.

    It counts the records it appends; the fsync policy tells it, through
    ``markDurable``, how many of them are on disk.  With ``holdReplies``
    (for policies that hold replies back until an fsync covers what they
    depend on) it also notes in each request's ``Batch`` the newest record
    the reply depends on, and keeps records pending until ``writePending``.
    Delivering replies is the policy's business, so this class is
    completed into an ``IStore`` by ``DurableStore``.
    """

    def __init__(self, opened: OpenedDirectory, holdReplies: bool = False) -> None:
        self.dirPath = opened.path
        self.lock = opened.lock
        self.memory = opened.memory
        # The same store when chunks run in C (runChunk), else None.
        self.compiled = opened.memory if CompiledStore is not None and type(opened.memory) is CompiledStore else None
        self.writer = opened.writer
        self.generation = opened.generation
        self.snapshotSize = opened.snapshotSize
        self.warnings = opened.warnings
        # Bytes in the journals before the current one that recovery would replay.
        self.olderJournalBytes = opened.olderJournalBytes
        self.readOnlyReason: str | None = None
        # Records appended so far, and how many of them are known durable.
        self.appended = 0
        self.durable = 0
        self.holdReplies = holdReplies
        # With held replies: each key changed by a record not yet durable,
        # with that record's number.  None: replies are not held.
        self._dirty: dict[int, int] | None = {} if holdReplies else None
        # On the Python path with held replies: the records of changes
        # applied but not yet written, and what undoes each (the key, and
        # its value before the change, None if it had none).
        self._holdRecords = holdReplies and self.compiled is None
        self._pending: list[bytes] = []
        self._undo: list[tuple[int, int | None]] = []

    # The store methods

    def put(self, key: int, value: int, batch: Batch) -> bool:
        self._checkWritable()
        if key in self.memory:
            if self._dirty:
                self._dependOn(key, batch)
            return False
        if self.memory.full:
            raise StoreFull(STORE_FULL)
        self._append(encodePut(key, value), key, None, batch)
        self.memory.put(key, value, batch)
        return True

    def get(self, key: int, batch: Batch) -> int | None:
        dirty = self._dirty
        if dirty:
            # _dependOn, in line: this is most of the requests.
            number = dirty.get(key, 0)
            if number > batch.waitFor:
                batch.waitFor = number
        return self.memory.get(key, batch)

    def delete(self, key: int, batch: Batch) -> bool:
        self._checkWritable()
        # One lookup: whether the key is there, and the value that undoes the delete.
        previous = self.memory.get(key, batch)
        if previous is None:
            if self._dirty:
                self._dependOn(key, batch)
            return False
        self._append(encodeDel(key), key, previous, batch)
        self.memory.delete(key, batch)
        return True

    def items(self) -> Iterator[tuple[int, int]]:
        return self.memory.items()

    def __len__(self) -> int:
        return len(self.memory)

    def __contains__(self, key: object) -> bool:
        return key in self.memory

    # Journaling

    def _checkWritable(self) -> None:
        if self.readOnlyReason is not None:
            raise StoreReadOnly(f"store is read-only ({self.readOnlyReason})")

    def _append(self, record: bytes, key: int, previous: int | None, batch: Batch) -> None:
        """Journal a change of ``key`` (whose value before it is ``previous``), before the caller applies it."""
        if self._holdRecords:
            self._pending.append(record)
            self._undo.append((key, previous))
        else:
            try:
                self.writePending()
                self.writer.append(record)
            except JournalWriteError as e:
                self.turnReadOnly(f"journal write failed: {e}")
                raise StoreReadOnly(f"store is read-only ({self.readOnlyReason})") from e
        self.appended += 1
        if self._dirty is not None:
            self._dirty[key] = batch.waitFor = self.appended

    def runChunk(self, data: bytes, start: int, maxRequest: int, counts: list[int], batch: Batch) -> tuple[bytes, int]:
        """
        Run the common requests of ``data`` from ``start`` in C, as
        ``CompiledStore.runChunk`` does (what it returns, and where it
        stops), noting in ``batch`` what the replies depend on. Their
        records are written at once, unless replies are held for an fsync
        anyway (``holdReplies``: the fsync writes them, one write for the
        turn); if that write fails, the chunk's changes were taken back:
        nothing ran, and the Python path answers the chunk as a read-only
        store. Runs nothing when the store is not on the compiled path or
        is read-only.
        """
        compiled = self.compiled
        if compiled is None or self.readOnlyReason is not None:
            return b"", start
        replies, done, self.appended, waitFor = compiled.runJournaledChunk(
            data, start, maxRequest, counts, self._dirty, self.appended
        )
        if waitFor > batch.waitFor:
            batch.waitFor = waitFor
        if done != start and not self.holdReplies:
            try:
                self.writePending()
            except JournalWriteError:
                return b"", start
        return replies, done

    def writePending(self) -> None:
        """
        Write the records left pending, in one write. If that fails, their
        changes are taken back and the store turns read-only; the
        ``JournalWriteError`` goes on to the caller.
        """
        compiled = self.compiled
        if compiled is None:
            if self._pending:
                self._writeHeld()
            return
        records = compiled.pendingRecords()
        if not records:
            return
        try:
            self.writer.append(records)
        except JournalWriteError as e:
            compiled.undoPending()
            self.turnReadOnly(f"journal write failed: {e}")
            raise
        compiled.confirmPending()

    def _writeHeld(self) -> None:
        """``writePending`` on the Python path."""
        records, undo = self._pending, self._undo
        self._pending, self._undo = [], []
        try:
            self.writer.append(b"".join(records))
        except JournalWriteError as e:
            # Newest first: each change is undone on the state it left.
            unapplied = Batch()
            for key, previous in reversed(undo):
                if previous is None:
                    self.memory.delete(key, unapplied)
                else:
                    self.memory.put(key, previous, unapplied)
            self.turnReadOnly(f"journal write failed: {e}")
            raise

    def _dependOn(self, key: int, batch: Batch) -> None:
        """A reply about ``key`` depends on the record that last changed it, if not yet durable."""
        number = self._dirty.get(key, 0) if self._dirty else 0
        if number > batch.waitFor:
            batch.waitFor = number

    def turnReadOnly(self, reason: str) -> None:
        """Refuse all further changes; reads go on.  Only a restart undoes it."""
        if self.readOnlyReason is None:
            self.readOnlyReason = reason
            self.readOnlyStarted(reason)

    def readOnlyStarted(self, reason: str) -> None:
        """Called once, when the store turns read-only; subclasses tell the operator."""

    @property
    def unsynced(self) -> bool:
        return self.appended > self.durable

    def sync(self) -> None:
        """Make every journaled change durable, or turn read-only and raise ``JournalSyncError``."""
        target = self.appended
        try:
            self.writePending()
        except JournalWriteError as e:
            raise JournalSyncError(str(e)) from e
        try:
            self.writer.sync()
        except JournalSyncError as e:
            self.turnReadOnly(str(e))
            raise
        self.markDurable(target)

    def markDurable(self, count: int) -> None:
        """The first ``count`` records are on disk: replies that depend on them only may leave."""
        self.durable = durable = max(self.durable, count)
        if self._dirty:
            if durable >= self.appended:
                self._dirty.clear()
            else:
                self._dirty = {key: n for key, n in self._dirty.items() if n > durable}

    def close(self) -> None:
        """Sync, close the journal and release the lock.

        The sync is tried whatever happened before (what was written still
        deserves the disk), but after a failed write or fsync it counts
        for nothing (see ``JournalWriter.sync``).  Requests that still
        arrive while the server shuts down get a read-only error: nothing
        is appended to a closed journal.
        """
        try:
            if self.unsynced:
                self.sync()
        finally:
            if self.readOnlyReason is None:
                self.readOnlyReason = "the server is shutting down"
            self.writer.close()
            self.lock.release()

    # Switching journals, when the compaction says so

    @property
    def journalBytes(self) -> int:
        """Bytes of journal that recovery would replay now."""
        return self.olderJournalBytes + self.writer.size

    def switchJournal(self, writer: JournalWriter, generation: int) -> None:
        """
        From now on append to ``writer``, the new, empty journal ``generation``.

        The current journal gets an end record naming its successor, so
        that recovery can tell it was not cut short, and is synced, in
        line, so that everything it holds is durable before anything goes
        to the new one.  If either fails, the store turns read-only and
        nothing switches.
        """
        try:
            self.writePending()
            self.writer.append(encodeEnd(generation))
        except JournalWriteError as e:
            self.turnReadOnly(f"journal write failed: {e}")
            raise
        self.sync()
        old, self.writer = self.writer, writer
        self.olderJournalBytes += old.size
        old.close()
        self.generation = generation

    def snapshotWritten(self, size: int) -> None:
        """The snapshot of the current generation is in place: older journals no longer count."""
        self.snapshotSize = size
        self.olderJournalBytes = 0

