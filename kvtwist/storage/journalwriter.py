"""Appending to one open journal file, and forcing it to the disk.

``kvtwist.storage.journal`` says what a record is; this module writes
records to a file, one ``write`` each, and syncs the file when told to.
When to sync is the fsync policy's decision (``kvtwist.storage.durability``).
No Twisted imports.
"""

from __future__ import annotations

import os
import threading


class JournalWriteError(Exception):
    """Appending to the journal failed; the record is not in the journal."""


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
        self._lock = threading.Lock()
        self._syncing = 0
        self._closing = False

    @classmethod
    def open(cls, path: str) -> "JournalWriter":
        """Open an existing journal (already checked by recovery) for appending."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
        return cls(path, fd, os.fstat(fd).st_size)

    def append(self, record: bytes) -> None:
        """Write one record, or raise JournalWriteError having written none of it."""
        try:
            written = os.write(self._fd, record)
            while written < len(record):
                written += os.write(self._fd, record[written:])
        except OSError as e:
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

    def sync(self) -> None:
        """Make every record written so far durable (fdatasync where available).

        Safe to call from another thread while appends go on: what was
        written before the call is durable when it returns.  After
        ``close`` it does nothing: closing syncs first.
        """
        with self._lock:
            if self._closing:
                return
            self._syncing += 1
        try:
            _datasync(self._fd)
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
