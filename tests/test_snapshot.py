"""The snapshot format: whole snapshots round-trip; damaged ones are never taken as complete."""

from __future__ import annotations

import errno
import os
import stat
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtwist.storage import snapshot
from kvtwist.storage.intmap import IntMap
from kvtwist.storage.journal import HEADER_SIZE

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
STATES = st.dictionaries(INT64, INT64, max_size=50)


@given(STATES)
def test_round_trip(state) -> None:
    loaded: dict[int, int] = {}
    scan = snapshot.load("s", snapshot.encodeSnapshot(3, state.items()), loaded)
    assert loaded == state
    assert (scan.complete, scan.entries, scan.generation) == (True, len(state), 3)


def test_writer_writes_blocks_that_load_back(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(snapshot, "MAX_BLOCK", 3)
    path = str(tmp_path / "s")
    writer = snapshot.SnapshotWriter(path, 9)
    writer.write([(1, 10), (2, 20)])
    writer.write([])
    writer.write([(k, -k) for k in range(3, 11)])
    writer.finish()
    writer.sync()
    writer.close()
    loaded: dict[int, int] = {}
    scan = snapshot.readSnapshot(path, loaded)
    assert scan.complete and scan.size == writer.size
    assert loaded == {1: 10, 2: 20, **{k: -k for k in range(3, 11)}}


@settings(max_examples=60)
@given(st.dictionaries(INT64, INT64, min_size=1, max_size=20), st.data())
def test_any_damage_makes_the_snapshot_incomplete(state, data) -> None:
    whole = bytearray(snapshot.encodeSnapshot(1, state.items()))
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(min_value=HEADER_SIZE, max_value=len(whole) - 1))
        damaged = bytes(whole[:cut])
    else:
        bit = data.draw(st.integers(min_value=HEADER_SIZE * 8, max_value=len(whole) * 8 - 1))
        whole[bit // 8] ^= 1 << (bit % 8)
        damaged = bytes(whole)
    loaded: dict[int, int] = {}
    scan = snapshot.load("s", damaged, loaded)
    assert not scan.complete and scan.detail


def test_good_blocks_before_a_bad_one_still_load(monkeypatch) -> None:
    """Repair keeps them; recovery refuses the snapshot anyway."""
    monkeypatch.setattr(snapshot, "MAX_BLOCK", 2)
    state = {k: k * 2 for k in range(6)}
    whole = bytearray(snapshot.encodeSnapshot(1, state.items()))
    second_block = HEADER_SIZE + 8 + 2 * 16
    whole[second_block + 8] ^= 1
    loaded: dict[int, int] = {}
    scan = snapshot.load("s", bytes(whole), loaded)
    assert not scan.complete and scan.goodEnd == second_block
    assert loaded == {0: 0, 1: 2}


def test_the_trailer_says_how_many_entries_to_make_room_for(tmp_path) -> None:
    path = tmp_path / "s"
    whole = snapshot.encodeSnapshot(1, ((k, k) for k in range(1000)))
    path.write_bytes(whole)
    assert snapshot.claimedEntries(str(path)) == 1000
    path.write_bytes(whole[:-1])
    assert snapshot.claimedEntries(str(path)) is None
    path.write_bytes(whole[:-3] + bytes([whole[-3] ^ 1]) + whole[-2:])
    assert snapshot.claimedEntries(str(path)) is None
    path.write_bytes(whole[:HEADER_SIZE])
    assert snapshot.claimedEntries(str(path)) is None


@pytest.mark.parametrize("load", [False, True], ids=["check only", "load"])
def test_reading_a_snapshot_holds_only_a_piece_of_it_in_memory(tmp_path, load, tracemalloc: ModuleType) -> None:
    """Even of one block of 1 MB: it is checked, then loaded, a piece at a time."""
    path = tmp_path / "s"
    path.write_bytes(snapshot.encodeSnapshot(1, ((k, -k) for k in range(snapshot.MAX_BLOCK))))
    into = IntMap() if load else None
    if into is not None:
        into.reserve(snapshot.MAX_BLOCK)
    tracemalloc.start()
    try:
        scan = snapshot.readSnapshot(str(path), into)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scan.complete and scan.entries == snapshot.MAX_BLOCK
    assert peak < 200_000
    assert into is None or (len(into) == snapshot.MAX_BLOCK and into.get(7) == -7)


def test_a_symbolic_link_is_not_read(tmp_path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(snapshot.encodeSnapshot(1, [(1, 1)]))
    (tmp_path / "s").symlink_to(target)
    with pytest.raises(OSError) as caught:
        snapshot.readSnapshot(str(tmp_path / "s"), {})
    assert caught.value.errno == errno.ELOOP


def test_the_writer_never_writes_through_a_planted_link(tmp_path) -> None:
    """A link planted under the temporary name must make the write fail, never reach its target."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    temp = tmp_path / "snapshot-00000002.kvs.tmp"
    temp.symlink_to(victim)
    with pytest.raises(FileExistsError):
        snapshot.SnapshotWriter(str(temp), 2)
    assert victim.read_bytes() == b"precious" and temp.is_symlink()


def test_the_writer_refuses_a_left_over_file(tmp_path) -> None:
    temp = tmp_path / "snapshot-00000002.kvs.tmp"
    temp.write_bytes(b"left over")
    with pytest.raises(FileExistsError):
        snapshot.SnapshotWriter(str(temp), 2)
    assert temp.read_bytes() == b"left over"


def test_the_writer_creates_an_owner_only_file_whatever_the_umask(tmp_path) -> None:
    old = os.umask(0)
    try:
        writer = snapshot.SnapshotWriter(str(tmp_path / "s"), 2)
        writer.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o600
