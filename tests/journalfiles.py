"""Build data directories by hand, for recovery and repair tests."""

from __future__ import annotations

import os
from pathlib import Path

from kvtwist import journal, snapshot
from kvtwist.datadir import journal_name, snapshot_name
from kvtwist.journal import HEADER_SIZE, RECORD_SIZE


def write_journal(directory: Path, generation: int, ops: list[tuple[str, int, int]]) -> Path:
    """Write a journal of ``ops`` (("put", k, v) or ("del", k, 0)) and return its path."""
    path = directory / journal_name(generation)
    records = [journal.encode_put(k, v) if op == "put" else journal.encode_del(k) for op, k, v in ops]
    path.write_bytes(journal.encode_header(journal.MAGIC, generation) + b"".join(records))
    return path


def write_snapshot(directory: Path, generation: int, state: dict[int, int]) -> Path:
    path = directory / snapshot_name(generation)
    path.write_bytes(snapshot.encode_snapshot(generation, state.items()))
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
