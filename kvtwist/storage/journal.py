"""The journal: what goes in the log, and how it is read back.

A journal file is a header followed by fixed-size records, one per
successful mutation.  Each record carries its own CRC32, which is how a
torn or corrupt record is told apart from a good one.  This module knows
nothing about *when* records reach the disk: that is the fsync policy's
job.  It has no Twisted imports, so it can be tested and used (by
recovery and repair) on its own.

Layout (all integers little-endian)::

    header  = magic "KVTWJRNL" | version u32 | generation u64 | crc32 u32
    record  = op u8 | key i64 | value i64 | crc32 u32      (21 bytes)

``op`` is 1 for put and 2 for del (whose value is 0).  The record CRC
covers the 17 bytes before it; the header CRC covers the 20 before it.

Version 2 adds the end record, ``op`` 3 with the next generation as its
key and 0 as its value: it is appended to a journal when writes switch to
the next one, so a journal that is followed by a newer one but lacks it
was cut short, even when the cut fell exactly between two records.  It
is always the last record.  Version 1 journals (written before end
records existed) are still read; one may end with an end record too,
appended when writes switched away from it.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Protocol

MAGIC = b"KVTWJRNL"
VERSION = 2
# The versions this code reads: 1 has no end records.
READABLE_VERSIONS = (1, 2)

OP_PUT = 1
OP_DEL = 2
OP_END = 3

_HEADER = struct.Struct("<8sIQI")
_BODY = struct.Struct("<Bqq")
_RECORD = struct.Struct("<BqqI")

HEADER_SIZE = _HEADER.size
RECORD_SIZE = _RECORD.size
# Journals are read this many records at a time, so reading a big one
# never holds more than a small piece of it in memory.
_CHUNK = 1024 * RECORD_SIZE


class JournalFormatError(Exception):
    """A journal or snapshot file is not what it must be.

    ``path`` and ``offset`` say where; ``detail`` says what was found.
    """

    def __init__(self, path: str, offset: int, detail: str) -> None:
        super().__init__(f"{path} at offset {offset}: {detail}")
        self.path = path
        self.offset = offset
        self.detail = detail


class ReplayTarget(Protocol):
    """Where replay writes: a plain dict, or the store's ``IntMap``.

    Puts are blind writes (set or overwrite), many at a time with
    ``update``; a del is ``pop(key, None)`` (remove if present).
    """

    def update(self, pairs: Iterable[tuple[int, int]], /) -> None: ...

    def pop(self, key: int, default: None, /) -> int | None: ...


def encodeHeader(magic: bytes, generation: int, version: int = VERSION) -> bytes:
    """Return a file header (shared by journals and snapshots)."""
    head = _HEADER.pack(magic, version, generation, 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(head))


def decodeHeader(path: str, data: bytes, magic: bytes, versions: tuple[int, ...]) -> tuple[int, int]:
    """Check a file header and return the generation and format version it names."""
    if len(data) < HEADER_SIZE:
        raise JournalFormatError(path, 0, f"file is {len(data)} bytes, shorter than its header")
    found, version, generation, crc = _HEADER.unpack_from(data)
    if found != magic:
        raise JournalFormatError(path, 0, f"not a kvtwist file (magic {found!r})")
    if crc != zlib.crc32(data[: HEADER_SIZE - 4]):
        raise JournalFormatError(path, 0, "header checksum mismatch")
    if version not in versions:
        readable = " and ".join(str(v) for v in versions)
        raise JournalFormatError(
            path, 0, f"format version {version} is not supported (this kvtwist reads version {readable})"
        )
    return generation, version


def _record(op: int, key: int, value: int) -> bytes:
    body = _BODY.pack(op, key, value)
    return body + struct.pack("<I", zlib.crc32(body))


def encodePut(key: int, value: int) -> bytes:
    """Return the record for a successful ``put key value``."""
    return _record(OP_PUT, key, value)


def encodeDel(key: int) -> bytes:
    """Return the record for a successful ``del key``."""
    return _record(OP_DEL, key, 0)


def encodeEnd(nextGeneration: int) -> bytes:
    """Return the record that ends a journal: writes go on in journal ``nextGeneration``.

    Append it (and fsync) once that journal is durable and before
    anything is written to it; nothing may follow it.
    """
    return _record(OP_END, nextGeneration, 0)


@dataclass(frozen=True)
class JournalScan:
    """What reading a journal found.

    ``goodEnd`` is the offset just after the last good record.  When the
    file has bytes after that, ``badOffset`` equals ``goodEnd`` and
    ``torn`` says whether they are a torn tail (safe to drop) or
    corruption in the middle (must not be dropped silently).
    ``records`` counts puts and dels; ``nextGeneration`` is what the end
    record names, or None when the journal has none.
    """

    path: str
    generation: int
    records: int
    goodEnd: int
    size: int
    torn: bool
    detail: str = ""
    version: int = VERSION
    nextGeneration: int | None = None

    @property
    def clean(self) -> bool:
        return self.goodEnd == self.size

    @property
    def badOffset(self) -> int | None:
        return None if self.clean else self.goodEnd

    @property
    def empty(self) -> bool:
        """Nothing after the header: a journal no write ever went to."""
        return self.size == HEADER_SIZE


def replay(path: str, data: bytes, into: ReplayTarget | None) -> JournalScan:
    """Check a journal file's bytes, applying each good record to ``into``.

    Records are applied as blind writes (a put sets, a del removes if
    present), so replaying on top of a snapshot that was taken while this
    journal was being written gives the right final state.
    ``into`` may be None to only check.
    """
    return _scan(path, io.BytesIO(data), len(data), into)


def readJournal(path: str, into: ReplayTarget | None = None) -> JournalScan:
    """Read and replay one journal file a piece at a time (see ``replay``).

    A symbolic link is refused (``OSError``, ``ELOOP``): data files are
    never followed out of their directory.
    """
    with openNoFollow(path) as f:
        return _scan(path, f, os.fstat(f.fileno()).st_size, into)


def openNoFollow(path: str) -> BinaryIO:
    """Open a data file for reading, refusing a symbolic link in its place."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.fdopen(os.open(path, flags), "rb")


def _scan(path: str, source: BinaryIO, size: int, into: ReplayTarget | None) -> JournalScan:
    generation, version = decodeHeader(path, source.read(HEADER_SIZE), MAGIC, READABLE_VERSIONS)
    crc32 = zlib.crc32
    bodySize = _BODY.size
    offset = HEADER_SIZE
    count = 0
    nextGeneration: int | None = None
    detail = ""
    # Each piece's records are first reduced to the last change of each
    # key (replay is blind writes: the last one wins) in two dicts, then
    # applied to ``into`` in bulk: a del and a put of the same key become
    # one overwrite, and the map is called once a key, not once a record.
    sets: dict[int, int] = {}
    dels: dict[int, None] = {}
    setsPop, delsPop = sets.pop, dels.pop
    while not detail:
        chunk = source.read(_CHUNK)
        view = memoryview(chunk)
        whole = len(chunk) - len(chunk) % RECORD_SIZE
        at = 0
        for op, key, value, crc in _RECORD.iter_unpack(view[:whole]):
            if nextGeneration is not None:
                detail = "data after the end record"
                break
            if crc != crc32(view[at : at + bodySize]):
                detail = "record checksum mismatch"
                break
            if op == OP_PUT:
                sets[key] = value
                if dels:
                    delsPop(key, None)
                count += 1
            elif op == OP_DEL:
                dels[key] = None
                setsPop(key, None)
                count += 1
            elif op == OP_END and key == generation + 1 and value == 0:
                nextGeneration = key
            elif op == OP_END:
                detail = f"bad end record (next generation {key}, value {value}; expected {generation + 1}, 0)"
                break
            else:
                detail = f"unknown record type {op}"
                break
            at += RECORD_SIZE
        offset += at
        if into is not None:
            for key in dels:
                into.pop(key, None)
            into.update(sets.items())
        sets.clear()
        dels.clear()
        if len(chunk) < _CHUNK:
            break

    def result(torn: bool, detail: str = "") -> JournalScan:
        return JournalScan(path, generation, count, offset, size, torn, detail, version, nextGeneration)

    if offset == size:
        return result(torn=False)
    if nextGeneration is not None:
        # Nothing is ever written after an end record, not even by a crash.
        return result(False, "data after the end record")
    if not detail:
        detail = f"incomplete record ({size - offset} of {RECORD_SIZE} bytes)"
    return result(_isTornTail(source, offset, size), detail)


def _isTornTail(source: BinaryIO, bad: int, size: int) -> bool:
    """Whether the bytes from ``bad`` to the end are a torn last write.

    They are when they are no longer than one record (the process died
    part-way through its last write), or when they are all zero bytes
    (space the file system had allocated but whose data never reached the
    disk before a power loss).  A good record is never all zeros.
    """
    if size - bad <= RECORD_SIZE:
        return True
    source.seek(bad)
    while chunk := source.read(_CHUNK):
        if chunk.count(0) != len(chunk):
            return False
    return True
