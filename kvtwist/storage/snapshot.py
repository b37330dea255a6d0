"""Snapshots: the whole store written out once, so the journal can restart.

A snapshot is written block by block (so a large store can be written a
little at a time between other work), to a temporary name; it only gets
its real name once it is complete and on disk (see ``kvtwist.storage.compaction``).
No Twisted imports.

Layout (all integers little-endian)::

    header  = magic "KVTWSNAP" | version u32 | generation u64 | crc32 u32
    block   = count u32 (> 0) | crc32(entries) u32 | entries
    entries = count * (key i64 | value i64)
    trailer = 0 u32 | crc32(total) u32 | total u64

The trailer says the snapshot is complete and how many entries it holds.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from array import array
from dataclasses import dataclass
from itertools import chain
from typing import Iterable, MutableMapping

from kvtwist.storage.journal import HEADER_SIZE, decodeHeader, encodeHeader

MAGIC = b"KVTWSNAP"
MAX_BLOCK = 65536

_BLOCK = struct.Struct("<II")
_TOTAL = struct.Struct("<Q")
_ENTRY_SIZE = 16
_BIG_ENDIAN = sys.byteorder == "big"


def encodeBlock(pairs: Iterable[tuple[int, int]]) -> bytes:
    """Return the bytes of blocks holding ``pairs`` (empty input: no bytes)."""
    flat = array("q", chain.from_iterable(pairs))
    if _BIG_ENDIAN:
        flat.byteswap()
    out = []
    step = 2 * MAX_BLOCK
    for start in range(0, len(flat), step):
        payload = flat[start : start + step].tobytes()
        out.append(_BLOCK.pack(len(payload) // _ENTRY_SIZE, zlib.crc32(payload)))
        out.append(payload)
    return b"".join(out)


def encodeTrailer(total: int) -> bytes:
    """Return the trailer that closes a snapshot of ``total`` entries."""
    packed = _TOTAL.pack(total)
    return _BLOCK.pack(0, zlib.crc32(packed)) + packed


def encodeSnapshot(generation: int, pairs: Iterable[tuple[int, int]]) -> bytes:
    """Return a whole snapshot in one piece (for small stores and tests)."""
    pairs = list(pairs)
    return encodeHeader(MAGIC, generation) + encodeBlock(pairs) + encodeTrailer(len(pairs))


@dataclass(frozen=True)
class SnapshotScan:
    """What reading a snapshot found.

    ``goodEnd`` is the offset after the last good block; ``entries``
    counts the entries before it.  A snapshot is usable only when
    ``complete``: it ends with a good trailer whose total matches.
    """

    path: str
    generation: int
    entries: int
    goodEnd: int
    size: int
    complete: bool
    detail: str = ""


def readSnapshot(path: str, into: MutableMapping[int, int] | None) -> SnapshotScan:
    """Read a snapshot file, loading the entries of its good blocks into ``into``."""
    with open(path, "rb") as f:
        data = f.read()
    return load(path, data, into)


def load(path: str, data: bytes, into: MutableMapping[int, int] | None) -> SnapshotScan:
    """Check a snapshot's bytes, loading the entries of its good blocks into ``into``."""
    generation = decodeHeader(path, data, MAGIC)
    view = memoryview(data)
    size = len(data)
    offset = HEADER_SIZE
    total = 0

    def result(complete: bool, detail: str = "") -> SnapshotScan:
        return SnapshotScan(path, generation, total, offset, size, complete, detail)

    while True:
        if size - offset < _BLOCK.size:
            return result(False, "snapshot ends before its trailer")
        count, crc = _BLOCK.unpack_from(view, offset)
        if count == 0:
            packed = view[offset + _BLOCK.size : offset + _BLOCK.size + _TOTAL.size]
            if len(packed) < _TOTAL.size or crc != zlib.crc32(packed):
                return result(False, "bad snapshot trailer")
            (claimed,) = _TOTAL.unpack(packed)
            if claimed != total:
                return result(False, f"trailer counts {claimed} entries, blocks hold {total}")
            if offset + _BLOCK.size + _TOTAL.size != size:
                return result(False, "unexpected bytes after the snapshot trailer")
            offset = size
            return result(True)
        start = offset + _BLOCK.size
        payload = view[start : start + count * _ENTRY_SIZE]
        if count > MAX_BLOCK or len(payload) < count * _ENTRY_SIZE or crc != zlib.crc32(payload):
            return result(False, "block checksum mismatch")
        if into is not None:
            flat = array("q")
            flat.frombytes(payload)
            if _BIG_ENDIAN:
                flat.byteswap()
            it = iter(flat)
            into.update(zip(it, it))
        total += count
        offset = start + count * _ENTRY_SIZE


class SnapshotWriter:
    """Writes one snapshot file a block at a time.

    The caller writes blocks, then ``finish`` (trailer) and ``sync``;
    ``close`` always.  It never renames: making the file visible is the
    compaction's step.
    """

    def __init__(self, path: str, generation: int) -> None:
        self.path = path
        self.entries = 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(path, flags, 0o644)
        self.size = 0
        self._write(encodeHeader(MAGIC, generation))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += len(data)

    def write(self, pairs: list[tuple[int, int]]) -> None:
        """Append the entries ``pairs``."""
        if pairs:
            self._write(encodeBlock(pairs))
            self.entries += len(pairs)

    def finish(self) -> None:
        """Write the trailer: after this the file is a complete snapshot."""
        self._write(encodeTrailer(self.entries))

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
