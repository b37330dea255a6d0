"""Build data directories by hand, for recovery and repair tests."""

from __future__ import annotations

import os
from pathlib import Path

from kvtwist.storage import journal, snapshot
from kvtwist.storage.datadir import journalName, snapshotName
from kvtwist.storage.journal import HEADER_SIZE, RECORD_SIZE


def write_journal(directory: Path, generation: int, ops: list[tuple[str, int, int]]) -> Path:
    """Write a journal of ``ops`` (("put", k, v) or ("del", k, 0)) and return its path."""
    path = directory / journalName(generation)
    records = [journal.encodePut(k, v) if op == "put" else journal.encodeDel(k) for op, k, v in ops]
    path.write_bytes(journal.encodeHeader(journal.MAGIC, generation) + b"".join(records))
    return path


def write_snapshot(directory: Path, generation: int, state: dict[int, int]) -> Path:
    path = directory / snapshotName(generation)
    path.write_bytes(snapshot.encodeSnapshot(generation, state.items()))
    return path


def record_offset(index: int) -> int:
    """Where record number ``index`` starts in a journal."""
    return HEADER_SIZE + index * RECORD_SIZE


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def chop(path: Path, count: int) -> None:
    """Cut ``count`` bytes off the end of ``path``, as a write cut short would."""
    os.truncate(path, path.stat().st_size - count)


def puts(start: int, stop: int) -> list[tuple[str, int, int]]:
    return [("put", k, k * 10) for k in range(start, stop)]
