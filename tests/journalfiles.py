"""Build data directories by hand, for recovery and repair tests."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kvtwist.storage import journal, snapshot
from kvtwist.storage.datadir import journalName, snapshotName
from kvtwist.storage.journal import HEADER_SIZE, RECORD_SIZE

# Written by the code of commit 148747c (journal format version 1): see tests/data/make_v1_datadir.py.
V1_DATADIR = Path(__file__).with_name("data") / "v1-datadir"


def encode_ops(ops: list[tuple[str, int, int]]) -> bytes:
    return b"".join(journal.encodePut(k, v) if op == "put" else journal.encodeDel(k) for op, k, v in ops)


def write_journal(
    directory: Path,
    generation: int,
    ops: list[tuple[str, int, int]],
    ended: bool = False,
    version: int = journal.VERSION,
) -> Path:
    """Write a journal of ``ops`` (("put", k, v) or ("del", k, 0)) and return its path.

    ``ended``: it ends with the end record that names the next generation.
    """
    path = directory / journalName(generation)
    end = journal.encodeEnd(generation + 1) if ended else b""
    path.write_bytes(journal.encodeHeader(journal.MAGIC, generation, version) + encode_ops(ops) + end)
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


def copy_v1_datadir(destination: Path) -> Path:
    """A copy of the version 1 test directory that tests may change; return its path."""
    shutil.copytree(V1_DATADIR, destination, ignore=shutil.ignore_patterns("*.json"))
    return destination


def v1_expected() -> dict[int, int]:
    """What the version 1 test directory held when the old server closed it."""
    return {k: v for k, v in json.loads((V1_DATADIR / "expected.json").read_text())}
