"""Appending to one open journal file, and forcing it to the disk.

``kvtwist.storage.journal`` says what a record is; this module writes
records to a file, one ``write`` each, and syncs the file when told to.
When to sync is the fsync policy's decision (``kvtwist.storage.fsync``).

The writer is the one owner of "this journal is broken": once a write or
an fsync of its file has failed, no later fsync of it is trusted.  Linux
reports a writeback error to one fsync only, so a retry, or another
thread's fsync of the same file, may return success for data that never
reached the disk.  No Twisted imports.
"""

from __future__ import annotations

import os
import threading


class JournalWriteError(Exception):
    """Appending to the journal failed; the record is not in the journal."""


class JournalSyncError(OSError):
    """The journal cannot be made durable: this fsync, or an earlier write or fsync of it, failed."""


class JournalWriter:
    """Appends records to one open journal file.

    Each append is one ``write`` to the operating system, done before the
    caller changes its in-memory state, so a record that was not written
    is never acknowledged.  ``sync`` makes what was written durable; when
    to call it is up to the fsync policy.  ``sync`` may run in another
    thread; ``close`` then waits for it before the file descriptor goes.
    """

    def __init__(self, path: str, fd: int, size: int) -> None:
        self.path = path
        self._fd = fd
        self.size = size
        # Why this file can never again be trusted to be durable, if it can't.
        self.failure: str | None = None
        self._lock = threading.Lock()
        # One fsync of the file at a time, so that an error is always
        # recorded before another fsync starts (see the module docstring).
        self._syncLock = threading.Lock()
        self._syncing = 0
        self._closing = False

    @classmethod
    def open(cls, path: str) -> "JournalWriter":
        """Open an existing journal (already checked by recovery) for appending."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        return cls(path, fd, os.fstat(fd).st_size)

    def append(self, record: bytes) -> None:
        """Write one record, or raise JournalWriteError having written none of it."""
        try:
            written = os.write(self._fd, record)
            while written < len(record):
                written += os.write(self._fd, record[written:])
        except OSError as e:
            self._fail(f"journal write failed: {e.strerror or e}")
            self._undoPartial()
            raise JournalWriteError(e.strerror or str(e)) from e
        self.size += len(record)

    def _undoPartial(self) -> None:
        # A partial record left in place would sit in the middle of the
        # journal once anything else is appended; cut it off.  If even that
        # fails, the store turns read-only and nothing more is appended, so
        # recovery sees it as a torn tail.
        try:
            os.ftruncate(self._fd, self.size)
        except OSError:
            pass

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = reason

    def sync(self) -> None:
        """Make every record written so far durable (fdatasync where available).

        Returns only if it did: it raises ``JournalSyncError`` when this
        fsync fails, and also, after any earlier failed write or fsync of
        the file, every time (it still asks the disk, but promises nothing).
        Safe to call from another thread while appends go on.  After
        ``close`` it does nothing: closing syncs first.
        """
        with self._lock:
            if self._closing:
                return
            self._syncing += 1
        try:
            with self._syncLock:
                try:
                    _datasync(self._fd)
                except OSError as e:
                    self._fail(f"journal fsync failed: {e.strerror or e}")
                if self.failure is not None:
                    raise JournalSyncError(self.failure)
        finally:
            with self._lock:
                self._syncing -= 1
                if self._closing and not self._syncing:
                    self._release()

    def close(self) -> None:
        """Close the file; if a sync is running in another thread, once it returns.

        The caller syncs first when it wants what it wrote on disk.
        """
        with self._lock:
            self._closing = True
            if not self._syncing:
                self._release()

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _datasync(fd: int) -> None:
    # fdatasync also flushes the file size, which is all the metadata an
    # append needs; it skips the timestamps that fsync would write.
    sync = getattr(os, "fdatasync", os.fsync)
    sync(fd)
