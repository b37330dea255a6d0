"""``kvtwist-repair DIR``: make a damaged data directory loadable again.

By default it keeps everything up to the first bad record and moves the
rest aside into side files next to the originals (``<file>.aside-<offset>``),
so nothing is thrown away: the moved bytes can still be examined or
restored by hand.  Journals after the damaged one are moved aside whole,
because replaying them without the records that were lost would give a
state the server never had; what is left is a state the server really had.

With ``--salvage`` it also keeps the records after the damage that still
check out, and the journals after it: more of the data, but possibly a
state the server never had (a put kept whose del was lost).  Every byte
range it skips is saved to a side file and listed.

A missing journal is recreated empty when only the changes it held are
lost (the state before it is whole); a missing snapshot cannot be rebuilt,
and the directory is left alone.  Run it only while no server uses the
directory (it takes the directory's lock to make sure).
"""

from __future__ import annotations

import argparse
import mmap
import os
import re
import struct
import sys
import zlib
from dataclasses import dataclass, field
from typing import Callable

from kvtwist.storage import journal, snapshot
from kvtwist.storage.datadir import (
    LOCK_NAME,
    DataDirLocked,
    DirectoryLock,
    Listing,
    createPrivateFile,
    fsyncDir,
    journalName,
    listFiles,
    truncateFile,
    writeAll,
    writeFileAtomically,
    writeTemporary,
)
from kvtwist.storage.recovery import RecoveryError, recover
from kvtwist.version import version

ASIDE = ".aside"
_COPY_CHUNK = 1 << 20

# The journal's record layout (see kvtwist.storage.journal): salvage reads
# records at any offset, not only where the journal's reader expects them.
_RECORD = struct.Struct("<BqqI")
_BODY_SIZE = _RECORD.size - 4
_RECORD_SIZE = journal.RECORD_SIZE
assert _RECORD.size == _RECORD_SIZE
# Where a record may start: its first byte is an operation.
_OPERATION = re.compile(b"[" + re.escape(bytes([journal.OP_PUT, journal.OP_DEL, journal.OP_END])) + b"]")


def _asideName(name: str) -> str:
    """``name``, or ``name.1``, ``name.2``...: never overwrite what an earlier repair put aside."""
    candidate, number = name, 0
    while os.path.lexists(candidate):
        number += 1
        candidate = f"{name}.{number}"
    return candidate


def _moveAside(path: str) -> str:
    side = _asideName(path + ASIDE)
    os.replace(path, side)
    return side


def _copyInto(fd: int, path: str, start: int, stop: int | None) -> None:
    """Append bytes ``start`` to ``stop`` (None: the end) of ``path`` to the file ``fd``."""
    with journal.openNoFollow(path) as source:
        source.seek(start)
        left = None if stop is None else stop - start
        while left is None or left > 0:
            chunk = source.read(_COPY_CHUNK if left is None else min(left, _COPY_CHUNK))
            if not chunk:
                break
            writeAll(fd, chunk)
            if left is not None:
                left -= len(chunk)


def _saveRange(path: str, start: int, stop: int | None = None) -> str:
    """Copy bytes ``start`` to ``stop`` (None: the end) of ``path`` into a new side file, and name it.

    The side file and its name are durable before this returns: the
    caller is about to cut or rewrite ``path``, after which the side file
    is the only copy of those bytes.
    """
    side = _asideName(f"{path}{ASIDE}-{start}")
    fd = createPrivateFile(side)
    try:
        _copyInto(fd, path, start, stop)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsyncDir(os.path.dirname(side) or ".")
    return side


def _moveTailAside(path: str, offset: int) -> str:
    """Save ``path`` from ``offset`` on into a side file, then cut ``path`` there."""
    side = _saveRange(path, offset)
    truncateFile(path, offset)
    return side


def _replaceWith(path: str, fill: Callable[[int], None]) -> None:
    """Replace ``path`` by a file that ``fill`` writes: whole, or not at all, after a crash."""
    os.replace(writeTemporary(path, fill), path)
    fsyncDir(os.path.dirname(path) or ".")


def _holdsData(dirPath: str) -> bool:
    """Whether ``dirPath`` holds anything of kvtwist's to repair: a journal, a snapshot, an unfinished file."""
    listing = listFiles(dirPath)
    return bool(listing.journals or listing.snapshots or listing.temporaries)


def repair(dirPath: str, salvage: bool = False) -> list[str]:
    """Repair ``dirPath`` in place and return one line per change made.

    ``salvage``: keep the records after damage that still check out, and
    the journals after it, instead of cutting at the first bad record.
    """
    listing = listFiles(dirPath)
    actions: list[str] = []
    for name in listing.temporaries:
        # Unfinished, and in the way of the files repair writes: a server
        # would remove them at start-up too.
        os.remove(os.path.join(dirPath, name))
        actions.append(f"removed the unfinished {os.path.join(dirPath, name)}")
    base = max(listing.snapshots, default=0)
    if base:
        actions += _repairSnapshot(dirPath, listing.snapshots[base])
    generations = sorted(g for g in listing.journals if g >= base)
    if not base and generations and generations[0] != 1:
        return actions  # a missing snapshot: recovery says what to do
    if base and not os.path.exists(os.path.join(dirPath, listing.snapshots[base])):
        return actions  # moved aside just now: the same

    repairJournals = _salvageJournals if salvage else _truncateJournals
    missing = repairJournals(dirPath, listing, base, generations, actions)
    if missing is not None:
        name = journalName(missing)
        writeFileAtomically(dirPath, name, journal.encodeHeader(journal.MAGIC, missing))
        actions.append(
            f"created {os.path.join(dirPath, name)} empty in place of the missing journal; the changes it held are lost"
        )
    if actions:
        fsyncDir(dirPath)
    return actions


def _truncateJournals(
    dirPath: str, listing: Listing, base: int, generations: list[int], actions: list[str]
) -> int | None:
    """Keep every journal up to the first bad record, and move the rest aside.

    Returns the generation of a missing journal the directory ends with,
    to be created empty, if any.
    """
    kept: list[journal.JournalScan] = []
    damaged = False
    expected = base or 1
    for generation in generations:
        path = os.path.join(dirPath, listing.journals[generation])
        if damaged or generation != expected:
            why = "it follows the damaged journal" if damaged else f"it follows the missing {journalName(expected)}"
            actions.append(f"moved {path} aside to {_moveAside(path)} ({why})")
            damaged = True
            continue
        expected += 1
        try:
            scan = journal.readJournal(path)
        except journal.JournalFormatError as e:
            actions.append(f"moved {path} aside to {_moveAside(path)} (bad header: {e.detail})")
            damaged = True
            continue
        previous = kept[-1] if kept else None
        unused = generation == generations[-1] and scan.empty
        if previous and previous.nextGeneration is None and previous.version >= 2 and not unused:
            actions.append(
                f"moved {path} aside to {_moveAside(path)} ({previous.path} has no end record, "
                f"so the records at its end were lost)"
            )
            damaged = True
            continue
        if not scan.clean:
            side = _moveTailAside(path, scan.goodEnd)
            actions.append(
                f"kept {scan.records} records of {path}; moved {scan.size - scan.goodEnd} bytes "
                f"from offset {scan.goodEnd} ({scan.detail}) aside to {side}"
            )
            # Bytes after an end record hide no change: the journals after it are whole.
            damaged = scan.nextGeneration is None
        kept.append(scan)
    if not kept:
        return base or None
    return kept[-1].nextGeneration


# Salvage: keep every record that checks out, wherever it is.


@dataclass(frozen=True)
class SkippedRange:
    """Bytes of a journal that salvage leaves out: ``length`` bytes from ``offset``, and why."""

    offset: int
    length: int
    detail: str


@dataclass
class Salvage:
    """What salvage keeps of one journal file.

    ``header`` is the header to write: the file's own, or one rebuilt from
    the file's name when its own is damaged.  ``kept`` holds the
    ``(start, stop)`` byte ranges of good records, in order; ``skipped``
    every other byte after the header (and the header itself when it is
    rebuilt).  ``records`` counts the puts and dels kept.
    """

    header: bytes
    version: int
    size: int
    kept: list[tuple[int, int]] = field(default_factory=list)
    skipped: list[SkippedRange] = field(default_factory=list)
    records: int = 0
    nextGeneration: int | None = None

    @property
    def empty(self) -> bool:
        """Nothing after the header: a journal no write ever went to."""
        return self.size == journal.HEADER_SIZE and not self.skipped


def salvageJournal(path: str, generation: int) -> Salvage:
    """Find the good records of the journal at ``path``, also after damage.

    ``generation`` is the one the file's name gives, for a header that is
    damaged.  A header that is intact but of another kind of file or
    another format version, or a file shorter than a header, raises
    ``JournalFormatError``: it is not damage, and is never rewritten.
    """
    with journal.openNoFollow(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < journal.HEADER_SIZE:
            journal.decodeHeader(path, f.read(), journal.MAGIC, journal.READABLE_VERSIONS)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _salvageRecords(path, data, size, generation)


def _salvageRecords(path: str, data: mmap.mmap, size: int, generation: int) -> Salvage:
    head = data[: journal.HEADER_SIZE]
    try:
        generation, version = journal.decodeHeader(path, head, journal.MAGIC, journal.READABLE_VERSIONS)
        result = Salvage(head, version, size)
    except journal.JournalFormatError as e:
        (crc,) = struct.unpack_from("<I", head, journal.HEADER_SIZE - 4)
        if crc == zlib.crc32(head[:-4]):
            raise  # an intact header of something else
        result = Salvage(journal.encodeHeader(journal.MAGIC, generation), journal.VERSION, size)
        result.skipped.append(SkippedRange(0, journal.HEADER_SIZE, f"bad header: {e.detail}"))
    at = runStart = journal.HEADER_SIZE
    while at < size:
        op, detail = _readRecord(data, at, size, generation, strict=False)
        if op in (journal.OP_PUT, journal.OP_DEL):
            result.records += 1
            at += _RECORD_SIZE
            continue
        if op == journal.OP_END:
            result.nextGeneration = generation + 1
            at += _RECORD_SIZE
            result.kept.append((runStart, at))
            if at < size:
                # Nothing is ever written after an end record, so nothing there is replayed.
                result.skipped.append(SkippedRange(at, size - at, "data after the end record"))
            return result
        if at > runStart:
            result.kept.append((runStart, at))
        resume = _resynchronise(data, at + 1, size, generation)
        stop = size if resume is None else resume
        result.skipped.append(SkippedRange(at, stop - at, detail))
        at = runStart = stop
    if at > runStart:
        result.kept.append((runStart, at))
    return result


def _readRecord(data: mmap.mmap, at: int, size: int, generation: int, strict: bool) -> tuple[int | None, str]:
    """The operation of a good record at ``at``, or None and what is wrong with it.

    The rules are the journal reader's, so that what salvage keeps reads
    back.  ``strict`` adds one more a real record always meets (a del's
    value is 0), to tell records from garbage when resynchronising.
    """
    if at + _RECORD_SIZE > size:
        return None, f"incomplete record ({size - at} of {_RECORD_SIZE} bytes)"
    op, key, value, crc = _RECORD.unpack_from(data, at)
    if crc != zlib.crc32(data[at : at + _BODY_SIZE]):
        return None, "record checksum mismatch"
    if op == journal.OP_PUT or (op == journal.OP_DEL and (value == 0 or not strict)):
        return op, ""
    if op == journal.OP_END and key == generation + 1 and value == 0:
        return op, ""
    if op == journal.OP_END:
        return None, f"bad end record (next generation {key}, value {value}; expected {generation + 1}, 0)"
    return None, f"unknown record type {op}"


def _resynchronise(data: mmap.mmap, start: int, size: int, generation: int) -> int | None:
    """The first offset from ``start`` where good records begin again; None if none do.

    A good record is accepted there only when the record right after it
    checks out too, since among the many offsets tried one random 21-byte
    window in about 2**32 passes a CRC32 by chance; or when it ends
    exactly at the end of the file, a single place, so no likelier to be
    garbage than any record read the usual way.  An end record is always
    a journal's last.
    """
    for match in _OPERATION.finditer(data, start, size - _RECORD_SIZE + 1):
        at = match.start()
        op, _ = _readRecord(data, at, size, generation, strict=True)
        if op is None:
            continue
        if at + _RECORD_SIZE == size:
            return at
        if op != journal.OP_END and _readRecord(data, at + _RECORD_SIZE, size, generation, strict=True)[0] is not None:
            return at
    return None


def _salvageJournals(
    dirPath: str, listing: Listing, base: int, generations: list[int], actions: list[str]
) -> int | None:
    """Keep every good record of every journal, and every journal; save and list what is skipped.

    A journal that is missing, or moved aside for a header that is not
    damage, is recreated holding only an end record when others follow
    it, and a kept journal followed by another gets an end record if it
    lost its own: both so the directory loads with the later journals.
    Returns the generation of a missing journal the directory ends with,
    to be created empty, if any.
    """
    found: list[tuple[int, str, Salvage | None]] = []
    expected = base or 1
    for generation in generations:
        while expected < generation:
            found.append((expected, os.path.join(dirPath, journalName(expected)), None))
            expected += 1
        expected += 1
        path = os.path.join(dirPath, listing.journals[generation])
        try:
            found.append((generation, path, salvageJournal(path, generation)))
        except journal.JournalFormatError as e:
            actions.append(f"moved {path} aside to {_moveAside(path)} (bad header: {e.detail})")
            found.append((generation, path, None))
    # With nothing after them to keep, the journals missing at the end are
    # the directory's end; the one before says whether they are needed.
    while found and found[-1][2] is None:
        found.pop()

    newest = found[-1][2] if found else None
    for i, (generation, path, salvage) in enumerate(found):
        following = found[i + 1] if i + 1 < len(found) else None
        if salvage is None:
            writeFileAtomically(
                dirPath,
                journalName(generation),
                journal.encodeHeader(journal.MAGIC, generation) + journal.encodeEnd(generation + 1),
            )
            actions.append(
                f"created {path} holding only an end record, in place of the missing journal, so that the "
                f"journals after it are kept; the changes it held are lost"
            )
            continue
        # An empty newest journal after one without an end record was never
        # written to: recovery removes it, so it needs no end record before it.
        unused = i == len(found) - 2 and newest is not None and newest.empty
        needsEnd = following is not None and not unused and salvage.nextGeneration is None and salvage.version >= 2
        actions += _applySalvage(path, salvage, generation + 1 if needsEnd else None)

    if not found:
        return base or None
    last = found[-1][2]
    return None if last is None else last.nextGeneration


def _applySalvage(path: str, salvage: Salvage, endWith: int | None) -> list[str]:
    """Save what ``salvage`` skips to side files, then leave ``path`` with only its good records.

    ``endWith``: append an end record naming that generation, since a
    journal follows that the directory keeps.
    """
    actions = []
    for skipped in salvage.skipped:
        side = _saveRange(path, skipped.offset, skipped.offset + skipped.length)
        actions.append(
            f"skipped {skipped.length} bytes of {path} at offset {skipped.offset} ({skipped.detail}); "
            f"saved them to {side}"
        )
    tail = salvage.skipped[0] if len(salvage.skipped) == 1 else None
    if tail and tail.offset >= journal.HEADER_SIZE and tail.offset + tail.length == salvage.size and endWith is None:
        # Only a damaged end: cut it off in place, as the default does.
        truncateFile(path, tail.offset)
        actions.append(f"kept {salvage.records} records of {path}; cut it at offset {tail.offset}")
    elif salvage.skipped or endWith is not None:

        def goodRecords(fd: int) -> None:
            writeAll(fd, salvage.header)
            for start, stop in salvage.kept:
                _copyInto(fd, path, start, stop)
            if endWith is not None:
                writeAll(fd, journal.encodeEnd(endWith))

        _replaceWith(path, goodRecords)
        how = "with only those" if salvage.skipped else "with them"
        if endWith is not None:
            how += f", and an end record (its own was lost, and {journalName(endWith)} follows it)"
        actions.append(f"kept {salvage.records} records of {path}; rewrote it {how}")
    return actions


def _repairSnapshot(dirPath: str, name: str) -> list[str]:
    path = os.path.join(dirPath, name)
    try:
        scan = snapshot.readSnapshot(path, None)
    except journal.JournalFormatError as e:
        return [f"moved {path} aside to {_moveAside(path)} (bad header: {e.detail}); its keys cannot be read"]
    if scan.complete:
        return []
    side = _saveRange(path, scan.goodEnd)

    def goodBlocks(fd: int) -> None:
        # The good blocks as they are, then a trailer that counts them.
        _copyInto(fd, path, 0, scan.goodEnd)
        writeAll(fd, snapshot.encodeTrailer(scan.entries))

    _replaceWith(path, goodBlocks)
    return [
        f"kept {scan.entries} entries of {path}; moved {scan.size - scan.goodEnd} bytes from offset "
        f"{scan.goodEnd} ({scan.detail}) aside to {side}; the keys stored there are lost"
    ]


def _lockHolder(dirPath: str) -> str:
    """`` (pid N)`` from the lock file, for the message, or nothing."""
    try:
        with journal.openNoFollow(os.path.join(dirPath, LOCK_NAME)) as f:
            holder = f.read(32).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {holder})" if holder.isdigit() else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kvtwist-repair",
        description="Make a damaged kvtwist data directory load again. By default, keep everything up to the "
        "first bad record (a state the server really had) and move the rest aside to side files.",
    )
    parser.add_argument("directory", help="the data directory given to the server with --data")
    parser.add_argument(
        "--salvage",
        action="store_true",
        help="also keep the records after the damage that still check out, and the journals after it: more "
        "data, but possibly a state the server never had (a put kept whose del was lost)",
    )
    parser.add_argument("--version", action="version", version=f"kvtwist {version()}")
    args = parser.parse_args(argv)
    dirPath = args.directory
    if not os.path.isdir(dirPath):
        print(f"kvtwist-repair: {dirPath} is not a directory", file=sys.stderr)
        return 2
    if not _holdsData(dirPath) and not os.path.lexists(os.path.join(dirPath, LOCK_NAME)):
        # Checked before taking the lock, which would create a LOCK file here.
        print(f"{dirPath}: nothing to repair; it holds no kvtwist journal or snapshot")
        return 0
    lock = DirectoryLock(dirPath)
    try:
        lock.acquire()
    except DataDirLocked:
        print(
            f"kvtwist-repair: {dirPath} is in use by a running kvtwist server{_lockHolder(dirPath)}; "
            f"nothing was changed. Stop that server, then run kvtwist-repair again.",
            file=sys.stderr,
        )
        return 1
    except OSError as e:
        print(f"kvtwist-repair: cannot lock {dirPath}: {e}", file=sys.stderr)
        return 1
    try:
        if not _holdsData(dirPath):
            print(f"{dirPath}: nothing to repair; it holds no kvtwist journal or snapshot")
            return 0
        actions = repair(dirPath, salvage=args.salvage)
        for line in actions:
            print(line)
        recovered = recover(dirPath, truncateTorn=False)
    except (RecoveryError, OSError) as e:
        print(f"kvtwist-repair: {e}", file=sys.stderr)
        return 1
    finally:
        lock.release()
    state = "repaired; it now loads" if actions else "nothing to repair; it loads"
    print(f"{dirPath}: {state} {len(recovered.map)} keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
