"""The data directory: file names, the lock, and making files durable.

A data directory holds at most one current snapshot and the journals
written since it began::

    LOCK                     held by the one server using the directory
    snapshot-00000003.kvs    the store as of the start of journal 3
    journal-00000003.kvj     mutations since then, in order
    journal-00000004.kvj     (while a compaction runs: newer mutations)

Generation numbers only grow.  Snapshot N is paired with journal N;
files of older generations are left-overs of a finished compaction.
No Twisted imports.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from kvtwist.storage.journal import MAGIC as JOURNAL_MAGIC
from kvtwist.storage.journal import encodeHeader
from kvtwist.storage.journalwriter import JournalWriter

LOCK_NAME = "LOCK"
TEMP_SUFFIX = ".tmp"
_NAME = re.compile(r"^(journal|snapshot)-(\d{8,})\.(kvj|kvs)$")


def journalName(generation: int) -> str:
    return f"journal-{generation:08d}.kvj"


def snapshotName(generation: int) -> str:
    return f"snapshot-{generation:08d}.kvs"


@dataclass
class Listing:
    """The kvtwist files found in a data directory, by generation."""

    journals: dict[int, str] = field(default_factory=dict)
    snapshots: dict[int, str] = field(default_factory=dict)
    temporaries: list[str] = field(default_factory=list)


def listFiles(dirpath: str) -> Listing:
    """Name the journals, snapshots and unfinished temporary files in ``dirpath``."""
    listing = Listing()
    for name in sorted(os.listdir(dirpath)):
        if name.endswith(TEMP_SUFFIX) and _NAME.match(name[: -len(TEMP_SUFFIX)]):
            listing.temporaries.append(name)
            continue
        match = _NAME.match(name)
        if match is None:
            continue
        kind, number, ext = match.groups()
        if (kind, ext) == ("journal", "kvj"):
            listing.journals[int(number)] = name
        elif (kind, ext) == ("snapshot", "kvs"):
            listing.snapshots[int(number)] = name
    return listing


def fsyncDir(dirpath: str) -> None:
    """Make the directory's entries (creations, renames, removals) durable."""
    fd = os.open(dirpath, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writeFileAtomically(
    dirpath: str, name: str, data: bytes, crashpoint: Callable[[str], None] = lambda step: None, label: str = "file"
) -> None:
    """Create ``name`` with ``data`` so that a crash leaves it whole or absent.

    Written to a temporary name, fsynced, renamed, then the directory is
    fsynced.  ``crashpoint`` is called with a step name between the steps
    (tests use it to kill the process there), prefixed with ``label``.
    """
    final = os.path.join(dirpath, name)
    temp = final + TEMP_SUFFIX
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    crashpoint(f"{label} written")
    os.replace(temp, final)
    crashpoint(f"{label} renamed")
    fsyncDir(dirpath)


def createJournal(
    dirpath: str, generation: int, crashpoint: Callable[[str], None] = lambda step: None
) -> JournalWriter:
    """Create an empty journal for ``generation`` and open it for appending."""
    name = journalName(generation)
    writeFileAtomically(dirpath, name, encodeHeader(JOURNAL_MAGIC, generation), crashpoint, "new journal")
    return JournalWriter.open(os.path.join(dirpath, name))


class DataDirLocked(Exception):
    """Another server holds the data directory's lock."""


class DirectoryLock:
    """An exclusive lock on a data directory, held for the life of a server.

    It is an ``flock`` on ``DIR/LOCK``, so the kernel releases it when the
    process dies: a crash never leaves a stale lock behind.  The file
    holds the owner's pid, for the error message.
    """

    def __init__(self, dirpath: str) -> None:
        self.path = os.path.join(dirpath, LOCK_NAME)
        self._fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            owner = f" (pid {holder})" if holder.isdigit() else ""
            raise DataDirLocked(
                f"data directory {os.path.dirname(self.path)} is in use by another kvtwist server{owner}; "
                f"stop that server or choose another --data directory"
            ) from None
        self._fd = fd
        self.recordOwner()

    def recordOwner(self) -> None:
        """Write this process's pid into the lock file (again after twistd forks into the background)."""
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0
