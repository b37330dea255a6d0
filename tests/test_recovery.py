"""Recovery: snapshot plus journals, torn tails dropped loudly, corruption refused."""

from __future__ import annotations

import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from journalfiles import chop, flip_byte, puts, record_offset, write_journal, write_snapshot
from kvtwist.storage.compaction import Blocking
from kvtwist.storage.datadir import journalName
from kvtwist.storage.journaled import JournaledStore
from kvtwist.storage.recovery import RecoveryError, recover


def test_an_empty_directory_recovers_empty(tmp_path) -> None:
    recovered = recover(str(tmp_path))
    assert recovered.data == {} and recovered.journalGeneration is None and not recovered.warnings


def test_snapshot_then_journals_in_order(tmp_path) -> None:
    write_snapshot(tmp_path, 2, {1: 1, 2: 2, 3: 3})
    write_journal(tmp_path, 2, [("del", 1, 0), ("put", 4, 4)])
    write_journal(tmp_path, 3, [("put", 1, 100), ("del", 4, 0)])
    recovered = recover(str(tmp_path))
    assert recovered.data == {1: 100, 2: 2, 3: 3}
    assert recovered.journalGeneration == 3 and recovered.snapshotGeneration == 2


def test_files_older_than_the_snapshot_and_temporaries_are_obsolete(tmp_path) -> None:
    write_snapshot(tmp_path, 1, {9: 9})
    write_journal(tmp_path, 1, [("put", 8, 8)])
    write_snapshot(tmp_path, 2, {1: 1})
    write_journal(tmp_path, 2, [])
    (tmp_path / "snapshot-00000003.kvs.tmp").write_bytes(b"half")
    recovered = recover(str(tmp_path))
    assert recovered.data == {1: 1}
    assert sorted(p.rsplit("/", 1)[1] for p in recovered.obsolete) == [
        "journal-00000001.kvj", "snapshot-00000001.kvs", "snapshot-00000003.kvs.tmp",
    ]


def test_torn_tail_is_dropped_with_a_warning_and_truncated(tmp_path) -> None:
    path = write_journal(tmp_path, 1, puts(0, 5))
    chop(path, 4)
    recovered = recover(str(tmp_path))
    assert recovered.data == {k: k * 10 for k in range(4)}
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
    old = write_journal(tmp_path, 1, puts(0, 3))
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


def test_a_missing_journal_is_refused(tmp_path) -> None:
    write_journal(tmp_path, 1, puts(0, 1))
    write_journal(tmp_path, 3, puts(1, 2))
    with pytest.raises(RecoveryError, match="missing"):
        recover(str(tmp_path))


def test_a_renamed_journal_is_refused(tmp_path) -> None:
    write_journal(tmp_path, 1, puts(0, 1)).rename(tmp_path / journalName(2))
    with pytest.raises(RecoveryError, match="generation 1"):
        recover(str(tmp_path))


def test_a_journal_with_a_bad_header_is_refused(tmp_path) -> None:
    path = write_journal(tmp_path, 1, puts(0, 1))
    flip_byte(path, 2)
    with pytest.raises(RecoveryError, match="offset 0"):
        recover(str(tmp_path))


# Whatever happens, reopening gives back exactly what was acknowledged.

KEYS = st.integers(min_value=-3, max_value=3)
ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), KEYS, st.integers(min_value=-(2**63), max_value=2**63 - 1)),
        st.tuples(st.just("del"), KEYS, st.just(0)),
        st.tuples(st.just("compact"), st.integers(min_value=1, max_value=3), st.just(0)),
        st.tuples(st.just("step"), st.just(0), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(ACTIONS)
def test_reopening_gives_back_what_was_acknowledged(actions) -> None:
    model: dict[int, int] = {}
    with tempfile.TemporaryDirectory() as directory:
        journaled = JournaledStore.open(directory)
        steps = None
        for action, a, b in actions:
            if action == "put":
                if journaled.put(a, b):
                    model[a] = b
            elif action == "del":
                if journaled.delete(a):
                    del model[a]
            elif action == "compact" and steps is None:
                steps = journaled.compaction(chunk=a)
            elif action == "step" and steps is not None:
                step = next(steps, "done")
                if isinstance(step, Blocking):
                    step.fn()
                elif step == "done":
                    steps = None
            elif action == "reopen":
                if steps is not None:
                    steps.close()
                    steps = None
                journaled.close()
                journaled = JournaledStore.open(directory)
                assert dict(journaled.items()) == model
        assert dict(journaled.items()) == model
        if steps is not None:
            steps.close()
        journaled.close()
        assert recover(directory).data == model


def test_a_store_that_lists_its_keys_in_parts_is_snapshotted_part_by_part(tmp_path, monkeypatch) -> None:
    """Each part is taken when its turn comes, while the store changes in between."""
    from kvtwist.storage.memory import Store

    taken: list[int] = []
    done = [0]

    def keyParts(store):
        for part in range(4):
            taken.append(done[0])
            yield [k for k, _ in store.items() if k % 4 == part]

    monkeypatch.setattr(Store, "keyParts", keyParts, raising=False)
    journaled = JournaledStore.open(str(tmp_path))
    for key in range(100):
        journaled.put(key, key)
    model = dict(journaled.items())
    steps = journaled.compaction(chunk=10)
    churn = iter(range(100, 10**6))
    for step in steps:
        if isinstance(step, Blocking):
            step.fn()
        done[0] += 1
        n = next(churn)
        for key in (n % 100, n):
            if journaled.delete(key):
                del model[key]
            elif journaled.put(key, -n):
                model[key] = -n
    assert taken == sorted(set(taken)) and len(taken) == 4, "one part at a time, as the steps go"
    assert dict(journaled.items()) == model
    journaled.close()
    assert recover(str(tmp_path)).data == model


def test_a_store_that_loads_in_bulk_is_filled_in_one_call(tmp_path, monkeypatch) -> None:
    from kvtwist.storage.memory import Store

    calls: list[int] = []

    def load(store, pairs, count):
        pairs = list(pairs)
        assert count == len(pairs)
        calls.append(len(pairs))
        for key, value in pairs:
            store.put(key, value)

    write_journal(tmp_path, 1, puts(0, 5))
    monkeypatch.setattr(Store, "load", load, raising=False)
    journaled = JournaledStore.open(str(tmp_path))
    assert calls == [5] and dict(journaled.items()) == {k: k * 10 for k in range(5)}
    journaled.close()
