"""The data directory: file names, the lock, and making files durable and private.

A data directory holds at most one current snapshot and the journals
written since it began::

    LOCK                     held by the one server using the directory
    snapshot-00000003.kvs    the store as of the start of journal 3
    journal-00000003.kvj     mutations since then, in order
    journal-00000004.kvj     (while a compaction runs: newer mutations)

Generation numbers only grow.  Snapshot N is paired with journal N;
files of older generations are left-overs of a finished compaction.

Everything kvtwist creates here is its owner's alone (directories 0700,
files 0600, whatever the umask), and new files are created with
``O_EXCL | O_NOFOLLOW``: a file or symbolic link planted under a name
kvtwist is about to create makes the creation fail, so it never writes
through a link to a file outside the directory.  No Twisted imports.
"""

from __future__ import annotations

import contextlib
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
DIR_MODE = 0o700
FILE_MODE = 0o600
_NAME = re.compile(r"^(journal|snapshot)-(\d{8,})\.(kvj|kvs)$")
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


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


def listFiles(dirPath: str) -> Listing:
    """Name the journals, snapshots and unfinished temporary files in ``dirPath``."""
    listing = Listing()
    for name in sorted(os.listdir(dirPath)):
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


def makeDataDir(dirPath: str) -> None:
    """Create ``dirPath`` and any missing parents, each owner-only (0700) whatever the umask.

    A directory that exists already is left as it is: its owner chose
    its mode.
    """
    missing = []
    path = os.path.abspath(dirPath)
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for path in reversed(missing):
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(path):
                raise
            continue  # made meanwhile by someone else: theirs
        # The umask may have taken bits away, even the owner's own.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC)
        try:
            os.fchmod(fd, DIR_MODE)
        finally:
            os.close(fd)


def createPrivateFile(path: str) -> int:
    """Create ``path`` owner-only (0600) for writing and return its descriptor.

    ``O_EXCL | O_NOFOLLOW``: if anything is already there, a symbolic
    link included, it raises ``FileExistsError`` and writes nothing.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # the umask may have taken bits away
    except BaseException:
        os.close(fd)
        os.remove(path)
        raise
    return fd


def fsyncDir(dirPath: str) -> None:
    """Make the directory's entries (creations, renames, removals) durable."""
    fd = os.open(dirPath, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writeAll(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def writeTemporary(path: str, fill: Callable[[int], None]) -> str:
    """Create ``path`` + ``.tmp`` (see ``createPrivateFile``), ``fill`` it, fsync it, and return its name.

    If any of that fails, the temporary file is removed: a next attempt,
    which insists on a new file, must not find it in the way.
    """
    temp = path + TEMP_SUFFIX
    fd = createPrivateFile(temp)
    try:
        fill(fd)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise
    os.close(fd)
    return temp


def writeFileAtomically(
    dirPath: str, name: str, data: bytes, crashpoint: Callable[[str], None] = lambda step: None, label: str = "file"
) -> None:
    """Create ``name`` with ``data`` so that a crash leaves it whole or absent.

    Written to a temporary name (``writeTemporary``), renamed, then the
    directory is fsynced.  ``crashpoint`` is called with a step name
    between the steps (tests use it to kill the process there), prefixed
    with ``label``.
    """
    final = os.path.join(dirPath, name)
    temp = writeTemporary(final, lambda fd: writeAll(fd, data))
    crashpoint(f"{label} written")
    os.replace(temp, final)
    crashpoint(f"{label} renamed")
    fsyncDir(dirPath)


def truncateFile(path: str, size: int) -> None:
    """Cut ``path`` to ``size`` bytes, durably; a symbolic link is refused (``ELOOP``)."""
    fd = os.open(path, os.O_WRONLY | _NOFOLLOW | _CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def createJournal(
    dirPath: str, generation: int, crashpoint: Callable[[str], None] = lambda step: None
) -> JournalWriter:
    """Create an empty journal for ``generation`` (current format) and open it for appending."""
    name = journalName(generation)
    writeFileAtomically(dirPath, name, encodeHeader(JOURNAL_MAGIC, generation), crashpoint, "new journal")
    return JournalWriter.open(os.path.join(dirPath, name))


class DataDirLocked(Exception):
    """Another server holds the data directory's lock."""


class DirectoryLock:
    """An exclusive lock on a data directory, held for the life of a server.

    It is an ``flock`` on ``DIR/LOCK``, so the kernel releases it when the
    process dies: a crash never leaves a stale lock behind.  The file
    holds the owner's pid, for the error message.
    """

    def __init__(self, dirPath: str) -> None:
        self.path = os.path.join(dirPath, LOCK_NAME)
        self._fd = -1

    def acquire(self) -> None:
        # No O_EXCL: the file outlives the servers that lock it.  No
        # O_NOFOLLOW would let a planted link have the pid written through it.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, FILE_MODE)
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
        try:
            # Also a LOCK left by an older kvtwist, created 0644; one that
            # belongs to someone else still locks, so it is left alone.
            with contextlib.suppress(PermissionError):
                os.fchmod(fd, FILE_MODE)
            self.recordOwner()
        except BaseException:
            self.release()
            raise

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
