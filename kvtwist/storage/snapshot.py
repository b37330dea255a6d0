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

The trailer says the snapshot is complete and how many entries it holds;
recovery also reads it first, to size the map for them.  The format is
still version 1 (journals are at version 2).
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from array import array
from dataclasses import dataclass
from itertools import chain
from typing import BinaryIO, Iterable, Iterator

from kvtwist.storage.datadir import createPrivateFile, writeAll
from kvtwist.storage.journal import HEADER_SIZE, ReplayTarget, decodeHeader, encodeHeader, openNoFollow

MAGIC = b"KVTWSNAP"
VERSION = 1
MAX_BLOCK = 65536

_BLOCK = struct.Struct("<II")
_TOTAL = struct.Struct("<Q")
_TRAILER_SIZE = _BLOCK.size + _TOTAL.size
_ENTRY_SIZE = 16
# Blocks are checked, then loaded, this many bytes (whole entries) at a time.
_PIECE = 4096 * _ENTRY_SIZE
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
    return encodeHeader(MAGIC, generation, VERSION) + encodeBlock(pairs) + encodeTrailer(len(pairs))


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


def readSnapshot(path: str, into: ReplayTarget | None) -> SnapshotScan:
    """Read a snapshot file a block at a time, loading the entries of its good blocks into ``into``.

    A symbolic link is refused (``OSError``, ``ELOOP``).
    """
    with openNoFollow(path) as f:
        return _scan(path, f, os.fstat(f.fileno()).st_size, into)


def load(path: str, data: bytes, into: ReplayTarget | None) -> SnapshotScan:
    """Check a snapshot's bytes, loading the entries of its good blocks into ``into``."""
    return _scan(path, io.BytesIO(data), len(data), into)


def claimedEntries(path: str) -> int | None:
    """How many entries the trailer of the snapshot at ``path`` says it holds; None without a good trailer.

    Only a hint, for sizing a map before reading: the blocks are checked
    against it when the snapshot is read.
    """
    with openNoFollow(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_SIZE + _TRAILER_SIZE:
            return None
        f.seek(size - _TRAILER_SIZE)
        trailer = f.read(_TRAILER_SIZE)
    count, crc = _BLOCK.unpack_from(trailer)
    packed = trailer[_BLOCK.size :]
    if count != 0 or crc != zlib.crc32(packed):
        return None
    (total,) = _TOTAL.unpack(packed)
    return total if total * _ENTRY_SIZE <= size else None


def _scan(path: str, source: BinaryIO, size: int, into: ReplayTarget | None) -> SnapshotScan:
    generation, _ = decodeHeader(path, source.read(HEADER_SIZE), MAGIC, (VERSION,))
    offset = HEADER_SIZE
    total = 0

    def result(complete: bool, detail: str = "") -> SnapshotScan:
        return SnapshotScan(path, generation, total, offset, size, complete, detail)

    while True:
        head = source.read(_BLOCK.size)
        if len(head) < _BLOCK.size:
            return result(False, "snapshot ends before its trailer")
        count, crc = _BLOCK.unpack(head)
        if count == 0:
            packed = source.read(_TOTAL.size)
            if len(packed) < _TOTAL.size or crc != zlib.crc32(packed):
                return result(False, "bad snapshot trailer")
            (claimed,) = _TOTAL.unpack(packed)
            if claimed != total:
                return result(False, f"trailer counts {claimed} entries, blocks hold {total}")
            if source.read(1):
                return result(False, "unexpected bytes after the snapshot trailer")
            offset = size
            return result(True)
        start = offset + _BLOCK.size
        # A count beyond the limit is damage: never read that much on its word.
        if count > MAX_BLOCK or _blockChecksum(source, count * _ENTRY_SIZE) != crc:
            return result(False, "block checksum mismatch")
        if into is not None:
            # Read again, now that the block is known good: only a piece
            # of it is ever held in memory.
            source.seek(start)
            _loadBlock(source, count * _ENTRY_SIZE, into)
        total += count
        offset = start + count * _ENTRY_SIZE


def _pieces(source: BinaryIO, length: int) -> Iterator[bytes]:
    """The next ``length`` bytes of ``source`` in pieces; fewer if it ends first."""
    while length > 0:
        piece = source.read(min(length, _PIECE))
        if not piece:
            return
        length -= len(piece)
        yield piece


def _blockChecksum(source: BinaryIO, length: int) -> int | None:
    """The CRC32 of the next ``length`` bytes; None if the file ends first."""
    crc, seen = 0, 0
    for piece in _pieces(source, length):
        crc = zlib.crc32(piece, crc)
        seen += len(piece)
    return crc if seen == length else None


def _loadBlock(source: BinaryIO, length: int, into: ReplayTarget) -> None:
    for piece in _pieces(source, length):
        if _BIG_ENDIAN:
            flat = array("q")
            flat.frombytes(piece)
            flat.byteswap()
            numbers = iter(flat)
        else:
            numbers = iter(memoryview(piece).cast("q"))
        into.update(zip(numbers, numbers))


class SnapshotWriter:
    """Writes one snapshot file a block at a time.

    The caller writes blocks, then ``finish`` (trailer) and ``sync``;
    ``close`` always.  It never renames: making the file visible is the
    compaction's step.  The file must not exist yet: a file or a symbolic
    link already at ``path`` makes the constructor fail (``FileExistsError``)
    rather than write through it.
    """

    def __init__(self, path: str, generation: int) -> None:
        self.path = path
        self.entries = 0
        self._fd = createPrivateFile(path)
        self.size = 0
        try:
            self._write(encodeHeader(MAGIC, generation, VERSION))
        except BaseException:
            self.close()
            os.remove(path)
            raise

    def _write(self, data: bytes) -> None:
        writeAll(self._fd, data)
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
