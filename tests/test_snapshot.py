"""The snapshot format: whole snapshots round-trip; damaged ones are never taken as complete."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvtwist.storage import snapshot
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
