"""Recovery: snapshot plus journals into the store's map, torn tails dropped loudly, anything else refused."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from journalfiles import (
    chop,
    copy_v1_datadir,
    encode_ops,
    flip_byte,
    puts,
    record_offset,
    v1_expected,
    write_journal,
    write_snapshot,
)
from kvtwist.storage import intmap, journal, snapshot
from kvtwist.storage.datadir import journalName, snapshotName
from kvtwist.storage.intmap import IntMap
from kvtwist.storage.recovery import Recovered, RecoveryError, recover


def contents(recovered: Recovered) -> dict[int, int]:
    return dict(recovered.map.items())


def test_an_empty_directory_recovers_empty(tmp_path) -> None:
    recovered = recover(str(tmp_path))
    assert contents(recovered) == {} and recovered.journalGeneration is None and not recovered.warnings


def test_snapshot_then_journals_in_order(tmp_path) -> None:
    write_snapshot(tmp_path, 2, {1: 1, 2: 2, 3: 3})
    write_journal(tmp_path, 2, [("del", 1, 0), ("put", 4, 4)], ended=True)
    write_journal(tmp_path, 3, [("put", 1, 100), ("del", 4, 0)])
    recovered = recover(str(tmp_path))
    assert contents(recovered) == {1: 100, 2: 2, 3: 3}
    assert recovered.journalGeneration == 3 and recovered.snapshotGeneration == 2


def test_the_store_map_is_filled_directly(tmp_path) -> None:
    write_journal(tmp_path, 1, puts(0, 3))
    recovered = recover(str(tmp_path))
    assert isinstance(recovered.map, IntMap) and len(recovered.map) == 3 and recovered.map.get(2) == 20


def test_the_map_is_sized_for_the_snapshot_up_front(tmp_path, monkeypatch) -> None:
    write_snapshot(tmp_path, 2, {k: k for k in range(1, 20_001)})
    write_journal(tmp_path, 2, [("del", 5, 0), ("put", 5, 6)])
    grown = []
    real = intmap._Shard.grown
    monkeypatch.setattr(intmap._Shard, "grown", lambda shard, *a: grown.append(1) or real(shard, *a))
    recovered = recover(str(tmp_path))
    assert len(recovered.map) == 20_000 and recovered.map.get(5) == 6
    assert len({shard.mask for shard in recovered.map._shards}) == 1
    assert not grown, "reserve() makes every shard big enough before the entries go in"


@pytest.mark.parametrize("withSnapshot", [False, True], ids=["journal only", "snapshot + journal"])
def test_recovery_holds_little_beside_the_map(tmp_path, withSnapshot, tracemalloc) -> None:
    """The peak while recovering stays close to what the map keeps afterwards: no copy, no whole file."""
    keys = 100_000
    if withSnapshot:
        write_snapshot(tmp_path, 2, {k * 7919: k for k in range(keys)})
        ops = [(op, k * 7919, -k) for k in range(0, keys, 2) for op in ("del", "put")]
        write_journal(tmp_path, 2, ops)
    else:
        write_journal(tmp_path, 1, [("put", k * 7919, k) for k in range(keys)])
    tracemalloc.start()
    try:
        recovered = recover(str(tmp_path))
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(recovered.map) == keys
    assert peak < 1.1 * kept, (peak, kept)


def test_files_older_than_the_snapshot_and_temporaries_are_obsolete(tmp_path) -> None:
    write_snapshot(tmp_path, 1, {9: 9})
    write_journal(tmp_path, 1, [("put", 8, 8)], ended=True)
    write_snapshot(tmp_path, 2, {1: 1})
    write_journal(tmp_path, 2, [])
    (tmp_path / "snapshot-00000003.kvs.tmp").write_bytes(b"half")
    recovered = recover(str(tmp_path))
    assert contents(recovered) == {1: 1}
    assert sorted(p.rsplit("/", 1)[1] for p in recovered.obsolete) == [
        "journal-00000001.kvj", "snapshot-00000001.kvs", "snapshot-00000003.kvs.tmp",
    ]


def test_torn_tail_is_dropped_with_a_warning_and_truncated(tmp_path) -> None:
    path = write_journal(tmp_path, 1, puts(0, 5))
    chop(path, 4)
    recovered = recover(str(tmp_path))
    assert contents(recovered) == {k: k * 10 for k in range(4)}
    [warning] = recovered.warnings
    assert str(path) in warning and f"offset {record_offset(4)}" in warning
    assert path.stat().st_size == record_offset(4)
    assert not recover(str(tmp_path)).warnings


def test_torn_tail_is_left_alone_when_asked(tmp_path) -> None:
    path = write_journal(tmp_path, 1, puts(0, 2))
    chop(path, 1)
    size = path.stat().st_size
    assert recover(str(tmp_path), truncateTorn=False).warnings
    assert path.stat().st_size == size


def test_corrupt_middle_refuses_with_file_offset_and_repair_command(tmp_path) -> None:
    path = write_journal(tmp_path, 1, puts(0, 5))
    flip_byte(path, record_offset(2) + 3)
    size = path.stat().st_size
    with pytest.raises(RecoveryError) as caught:
        recover(str(tmp_path))
    message = str(caught.value)
    assert str(path) in message and f"offset {record_offset(2)}" in message
    assert f"kvtwist-repair {tmp_path}" in message
    assert path.stat().st_size == size


def test_a_torn_tail_in_an_older_journal_is_corruption(tmp_path) -> None:
    """Older journals were fsynced before the next began: damage there is not a torn write."""
    old = write_journal(tmp_path, 1, puts(0, 3), ended=True)
    chop(old, 2)
    write_journal(tmp_path, 2, puts(3, 4))
    with pytest.raises(RecoveryError, match=journalName(1)):
        recover(str(tmp_path))


def test_a_damaged_snapshot_is_refused(tmp_path) -> None:
    path = write_snapshot(tmp_path, 1, {1: 1, 2: 2})
    flip_byte(path, path.stat().st_size - 20)
    write_journal(tmp_path, 1, [])
    with pytest.raises(RecoveryError, match="snapshot-00000001.kvs at offset"):
        recover(str(tmp_path))


def test_a_renamed_journal_is_refused(tmp_path) -> None:
    write_journal(tmp_path, 1, puts(0, 1)).rename(tmp_path / journalName(2))
    write_snapshot(tmp_path, 2, {})
    with pytest.raises(RecoveryError, match="generation 1"):
        recover(str(tmp_path))


def test_a_journal_with_a_bad_header_is_refused(tmp_path) -> None:
    path = write_journal(tmp_path, 1, puts(0, 1))
    flip_byte(path, 2)
    with pytest.raises(RecoveryError, match="offset 0"):
        recover(str(tmp_path))


def test_a_symbolic_link_in_place_of_a_journal_is_refused(tmp_path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = write_journal(elsewhere, 1, puts(0, 1))
    data = tmp_path / "data"
    data.mkdir()
    (data / journalName(1)).symlink_to(target)
    with pytest.raises(RecoveryError, match="symbolic link"):
        recover(str(data))


# A missing file is never taken for a shorter history.


def refusal(directory: Path) -> str:
    before = sorted((p.name, p.stat().st_size) for p in directory.iterdir())
    with pytest.raises(RecoveryError) as caught:
        recover(str(directory))
    assert sorted((p.name, p.stat().st_size) for p in directory.iterdir()) == before, "nothing is changed"
    return str(caught.value)


def test_a_journal_without_the_snapshot_it_continues_from_is_refused(tmp_path) -> None:
    """The snapshot of a compacted directory was deleted: its keys must not vanish without a word."""
    write_journal(tmp_path, 3, puts(0, 2))
    message = refusal(tmp_path)
    assert f"{tmp_path / snapshotName(3)} is missing" in message
    assert "backup" in message and "kvtwist-repair cannot" in message


def test_a_snapshot_without_its_journal_is_refused(tmp_path) -> None:
    write_snapshot(tmp_path, 3, {1: 1})
    message = refusal(tmp_path)
    assert f"{tmp_path / journalName(3)} is missing" in message
    assert "backup" in message and f"kvtwist-repair {tmp_path}" in message


def test_a_snapshot_whose_own_journal_is_missing_is_refused_even_with_later_ones(tmp_path) -> None:
    write_snapshot(tmp_path, 3, {1: 1})
    write_journal(tmp_path, 4, puts(0, 2))
    assert f"{tmp_path / journalName(3)} is missing" in refusal(tmp_path)


def test_a_missing_journal_between_two_is_refused(tmp_path) -> None:
    write_journal(tmp_path, 1, puts(0, 1), ended=True)
    write_journal(tmp_path, 3, puts(1, 2))
    message = refusal(tmp_path)
    assert f"{tmp_path / journalName(2)} is missing" in message and "backup" in message


def test_a_journal_that_names_a_missing_next_one_is_refused(tmp_path) -> None:
    """The newest journal was deleted: the end record of the one before says it existed."""
    write_snapshot(tmp_path, 2, {1: 1})
    write_journal(tmp_path, 2, puts(5, 9), ended=True)
    message = refusal(tmp_path)
    assert f"{tmp_path / journalName(3)} is missing" in message and f"kvtwist-repair {tmp_path}" in message


# The end record: a journal followed by another says so.


def test_a_journal_cut_at_a_record_boundary_before_a_newer_one_is_refused(tmp_path) -> None:
    first = write_journal(tmp_path, 1, puts(0, 4), ended=True)
    chop(first, journal.RECORD_SIZE * 2)  # the end record and the last put, whole
    write_journal(tmp_path, 2, puts(4, 6))
    message = refusal(tmp_path)
    assert f"corrupt data in {first} at offset {record_offset(3)}" in message
    assert "without an end record" in message and f"kvtwist-repair {tmp_path}" in message


def test_a_version_1_journal_needs_no_end_record(tmp_path) -> None:
    write_journal(tmp_path, 1, puts(0, 4), version=1)
    write_journal(tmp_path, 2, puts(4, 6))
    recovered = recover(str(tmp_path))
    assert contents(recovered) == {k: k * 10 for k in range(6)} and recovered.journalGeneration == 2


def test_an_end_record_before_the_last_record_is_refused(tmp_path) -> None:
    path = tmp_path / journalName(1)
    path.write_bytes(
        journal.encodeHeader(journal.MAGIC, 1) + encode_ops(puts(0, 2)) + journal.encodeEnd(2) + encode_ops(puts(2, 3))
    )
    write_journal(tmp_path, 2, [])
    assert f"corrupt data in {path} at offset {record_offset(2) + journal.RECORD_SIZE}" in refusal(tmp_path)


def test_an_empty_journal_never_switched_to_is_obsolete(tmp_path) -> None:
    """A compaction stopped (or killed) after creating the next journal, before the switch."""
    current = write_journal(tmp_path, 1, puts(0, 3))
    unused = write_journal(tmp_path, 2, [])
    recovered = recover(str(tmp_path))
    assert contents(recovered) == {k: k * 10 for k in range(3)}
    assert recovered.journalGeneration == 1 and recovered.journalBytes == current.stat().st_size
    assert recovered.obsolete == [str(unused)] and not recovered.warnings


def test_a_torn_tail_before_an_empty_journal_never_switched_to_is_dropped(tmp_path) -> None:
    current = write_journal(tmp_path, 1, puts(0, 3))
    chop(current, 5)
    write_journal(tmp_path, 2, [])
    recovered = recover(str(tmp_path))
    assert contents(recovered) == {0: 0, 1: 10}
    assert recovered.journalGeneration == 1 and len(recovered.warnings) == 1
    assert current.stat().st_size == record_offset(2)


def test_an_empty_journal_after_an_end_record_is_where_writes_go(tmp_path) -> None:
    write_journal(tmp_path, 1, puts(0, 3), ended=True)
    write_journal(tmp_path, 2, [])
    recovered = recover(str(tmp_path))
    assert recovered.journalGeneration == 2 and not recovered.obsolete


def test_nothing_is_truncated_unless_the_whole_directory_loads(tmp_path) -> None:
    write_journal(tmp_path, 1, puts(0, 2))
    newest = write_journal(tmp_path, 2, puts(2, 4))
    chop(newest, 3)
    refusal(tmp_path)


# Directories written before end records existed.


def test_a_version_1_directory_loads(tmp_path) -> None:
    directory = copy_v1_datadir(tmp_path / "data")
    assert [journal.readJournal(str(p)).version for p in sorted(directory.glob("journal-*"))] == [1, 1]
    recovered = recover(str(directory))
    assert contents(recovered) == v1_expected() and len(recovered.map) == 81
    assert (recovered.snapshotGeneration, recovered.journalGeneration) == (2, 3)
    assert not recovered.warnings and not recovered.obsolete


def test_a_version_1_directory_loads_once_its_journals_got_end_records(tmp_path) -> None:
    """The first compaction after an upgrade ends the old journal; a later one ends the next."""
    directory = copy_v1_datadir(tmp_path / "data")
    with open(directory / journalName(2), "ab") as f:
        f.write(journal.encodeEnd(3))
    assert contents(recover(str(directory))) == v1_expected()
    with open(directory / journalName(3), "ab") as f:
        f.write(journal.encodeEnd(4))
    write_journal(directory, 4, [("put", 10**12, 1)])
    recovered = recover(str(directory))
    assert contents(recovered) == {**v1_expected(), 10**12: 1} and recovered.journalGeneration == 4


# Every state a writer and its compactions can leave recovers to what was acknowledged.


class SimulatedDirectory:
    """Writes a data directory the way the store and its compactions do, and remembers what it acknowledged.

    A compaction of journal N: (1) create journal N+1 empty, (2) end
    journal N and switch writes to N+1, (3) write snapshot N+1 under its
    temporary name, (4) rename it, (5) remove the older files.  It may be
    stopped after any step; the directory may be recovered at any moment.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.model: dict[int, int] = {}
        self.generation = 1
        write_journal(path, 1, [])

    def _append(self, data: bytes) -> None:
        with open(self.path / journalName(self.generation), "ab") as f:
            f.write(data)

    def put(self, key: int, value: int) -> None:
        if key not in self.model:
            self._append(journal.encodePut(key, value))
            self.model[key] = value

    def delete(self, key: int) -> None:
        if key in self.model:
            self._append(journal.encodeDel(key))
            del self.model[key]

    def compact(self, steps: int) -> None:
        following = self.generation + 1
        if steps >= 1:
            write_journal(self.path, following, [])
        if steps >= 2:
            self._append(journal.encodeEnd(following))
            self.generation = following
            state = dict(self.model)
        if steps == 3:
            (self.path / (snapshotName(following) + ".tmp")).write_bytes(b"unfinished")
        if steps >= 4:
            write_snapshot(self.path, following, state)
        if steps >= 5:
            for old in [*self.path.glob("journal-*.kvj"), *self.path.glob("snapshot-*.kvs")]:
                if int(old.name.split("-")[1].split(".")[0]) < following:
                    old.unlink()

    def tornWrite(self, cut: int) -> None:
        """A put that died part-way through its write: never acknowledged."""
        self._append(journal.encodePut(10**6, 1)[:cut])

    def reopen(self) -> None:
        """What a server does at start-up: recover, remove what is obsolete, write on."""
        recovered = recover(str(self.path))
        assert contents(recovered) == self.model
        for obsolete in recovered.obsolete:
            os.remove(obsolete)
        assert recovered.journalGeneration is not None
        self.generation = recovered.journalGeneration


KEYS = st.integers(min_value=-3, max_value=3)
ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), KEYS, st.integers(min_value=-(2**63), max_value=2**63 - 1)),
        st.tuples(st.just("del"), KEYS, st.just(0)),
        st.tuples(st.just("compact"), st.integers(min_value=0, max_value=5), st.just(0)),
        st.tuples(st.just("torn"), st.integers(min_value=1, max_value=journal.RECORD_SIZE - 1), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ACTIONS)
def test_every_state_a_writer_leaves_recovers_to_what_it_acknowledged(actions) -> None:
    with tempfile.TemporaryDirectory() as directory:
        simulated = SimulatedDirectory(Path(directory))
        for action, a, b in actions:
            if action == "put":
                simulated.put(a, b)
            elif action == "del":
                simulated.delete(a)
            elif action == "compact":
                simulated.compact(a)
            elif action == "torn":
                simulated.tornWrite(a)
                simulated.reopen()  # a torn write is a crash: the server restarts
            else:
                simulated.reopen()
            # A crash can come at any moment: what is on disk must load.
            assert contents(recover(directory, truncateTorn=False)) == simulated.model
        simulated.reopen()
