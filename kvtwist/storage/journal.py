"""The journal: what goes in the log, and how it is read back.

A journal file is a header followed by fixed-size records, one per
successful mutation.  Each record carries its own CRC32, which is how a
torn or corrupt record is told apart from a good one.  This module knows
nothing about *when* records reach the disk: that is the fsync policy's
job (``kvtwist.storage.durable``).  It has no Twisted imports, so it can be tested
and used (by recovery and repair) on its own.

Layout (all integers little-endian)::

    header  = magic "KVTWJRNL" | version u32 | generation u64 | crc32 u32
    record  = op u8 | key i64 | value i64 | crc32 u32      (21 bytes)

``op`` is 1 for put and 2 for del (whose value is 0).  The record CRC
covers the 17 bytes before it; the header CRC covers the 20 before it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import MutableMapping

MAGIC = b"KVTWJRNL"
VERSION = 1

OP_PUT = 1
OP_DEL = 2

_HEADER = struct.Struct("<8sIQI")
_BODY = struct.Struct("<Bqq")
_RECORD = struct.Struct("<BqqI")

HEADER_SIZE = _HEADER.size
RECORD_SIZE = _RECORD.size


class JournalFormatError(Exception):
    """A journal or snapshot file is not what it must be.

    ``path`` and ``offset`` say where; ``detail`` says what was found.
    """

    def __init__(self, path: str, offset: int, detail: str) -> None:
        super().__init__(f"{path} at offset {offset}: {detail}")
        self.path = path
        self.offset = offset
        self.detail = detail


def encodeHeader(magic: bytes, generation: int, version: int = VERSION) -> bytes:
    """Return a file header (shared by journals and snapshots)."""
    head = _HEADER.pack(magic, version, generation, 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(head))


def decodeHeader(path: str, data: bytes, magic: bytes) -> int:
    """Check a file header and return the generation it names."""
    if len(data) < HEADER_SIZE:
        raise JournalFormatError(path, 0, f"file is {len(data)} bytes, shorter than its header")
    found, version, generation, crc = _HEADER.unpack_from(data)
    if found != magic:
        raise JournalFormatError(path, 0, f"not a kvtwist file (magic {found!r})")
    if crc != zlib.crc32(data[: HEADER_SIZE - 4]):
        raise JournalFormatError(path, 0, "header checksum mismatch")
    if version != VERSION:
        raise JournalFormatError(path, 0, f"format version {version} is not supported (expected {VERSION})")
    return generation


def encodePut(key: int, value: int) -> bytes:
    """Return the record for a successful ``put key value``."""
    body = _BODY.pack(OP_PUT, key, value)
    return body + struct.pack("<I", zlib.crc32(body))


def encodeDel(key: int) -> bytes:
    """Return the record for a successful ``del key``."""
    body = _BODY.pack(OP_DEL, key, 0)
    return body + struct.pack("<I", zlib.crc32(body))


@dataclass(frozen=True)
class JournalScan:
    """What reading a journal found.

    ``goodEnd`` is the offset just after the last good record.  When the
    file has bytes after that, ``badOffset`` equals ``goodEnd`` and
    ``torn`` says whether they are a torn tail (safe to drop) or
    corruption in the middle (must not be dropped silently).
    """

    path: str
    generation: int
    records: int
    goodEnd: int
    size: int
    torn: bool
    detail: str = ""

    @property
    def clean(self) -> bool:
        return self.goodEnd == self.size

    @property
    def badOffset(self) -> int | None:
        return None if self.clean else self.goodEnd


def replay(path: str, data: bytes, into: MutableMapping[int, int] | None) -> JournalScan:
    """Check a journal file's bytes, applying each good record to ``into``.

    Records are applied as blind writes (a put sets, a del removes if
    present), so replaying on top of a snapshot that was taken while this
    journal was being written gives the right final state.
    ``into`` may be None to only check.
    """
    generation = decodeHeader(path, data, MAGIC)
    view = memoryview(data)
    size = len(data)
    end = HEADER_SIZE + (size - HEADER_SIZE) // RECORD_SIZE * RECORD_SIZE
    crc32 = zlib.crc32
    offset = HEADER_SIZE
    count = 0
    detail = ""
    pop = into.pop if into is not None else None
    for op, key, value, crc in _RECORD.iter_unpack(view[HEADER_SIZE:end]):
        if crc != crc32(view[offset : offset + RECORD_SIZE - 4]):
            detail = "record checksum mismatch"
            break
        if op == OP_PUT:
            if into is not None:
                into[key] = value
        elif op == OP_DEL:
            if pop is not None:
                pop(key, None)
        else:
            detail = f"unknown record type {op}"
            break
        offset += RECORD_SIZE
        count += 1
    if offset == size:
        return JournalScan(path, generation, count, offset, size, torn=False)
    if not detail:
        detail = f"incomplete record ({size - offset} of {RECORD_SIZE} bytes)"
    return JournalScan(path, generation, count, offset, size, torn=_isTornTail(view, offset), detail=detail)


def _isTornTail(view: memoryview, bad: int) -> bool:
    """Whether the bytes from ``bad`` to the end are a torn last write.

    They are when they are no longer than one record (the process died
    part-way through its last write), or when they are all zero bytes
    (space the file system had allocated but whose data never reached the
    disk before a power loss).  A good record is never all zeros.
    """
    tail = view[bad:]
    return len(tail) <= RECORD_SIZE or not any(tail)


def readJournal(path: str, into: MutableMapping[int, int] | None = None) -> JournalScan:
    """Read and replay one journal file (see ``replay``)."""
    with open(path, "rb") as f:
        data = f.read()
    return replay(path, data, into)
