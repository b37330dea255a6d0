"""``kvtwist-repair``: keep everything before the first bad record, move the rest aside; or, with
``--salvage``, keep every record that still checks out."""

from __future__ import annotations

import os
import subprocess
import sys
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
from kvtwist.storage import journal, repair
from kvtwist.storage.datadir import DirectoryLock, journalName, snapshotName
from kvtwist.storage.journal import HEADER_SIZE, RECORD_SIZE
from kvtwist.storage.recovery import recover
from kvtwist.version import version


def loaded(directory) -> dict[int, int]:
    return dict(recover(str(directory)).map.items())


def whileLocked(directory: Path, argv: list[str]) -> int:
    """Run ``kvtwist-repair`` while this process holds ``directory``'s lock, as a server would."""
    lock = DirectoryLock(str(directory))
    lock.acquire()
    try:
        return repair.main(argv)
    finally:
        lock.release()


def test_corrupt_middle_keeps_the_prefix_and_saves_the_rest(tmp_path, capsys) -> None:
    path = write_journal(tmp_path, 1, puts(0, 6))
    original = path.read_bytes()
    flip_byte(path, record_offset(3) + 1)
    damaged = path.read_bytes()
    assert repair.main([str(tmp_path)]) == 0
    side = tmp_path / f"{path.name}.aside-{record_offset(3)}"
    assert side.read_bytes() == damaged[record_offset(3) :]
    assert path.read_bytes() == original[: record_offset(3)]
    assert loaded(tmp_path) == {k: k * 10 for k in range(3)}
    out = capsys.readouterr().out
    assert str(side) in out and "loads 3 keys" in out


def test_journals_after_the_damaged_one_are_moved_aside_whole(tmp_path) -> None:
    first = write_journal(tmp_path, 1, puts(0, 4), ended=True)
    second = write_journal(tmp_path, 2, puts(4, 6))
    flip_byte(first, record_offset(1))
    assert repair.main([str(tmp_path)]) == 0
    assert not second.exists()
    assert (tmp_path / f"{second.name}.aside").exists()
    assert loaded(tmp_path) == {0: 0}


def test_a_damaged_snapshot_keeps_its_good_blocks(tmp_path, monkeypatch) -> None:
    from kvtwist.storage import snapshot

    monkeypatch.setattr(snapshot, "MAX_BLOCK", 2)
    path = write_snapshot(tmp_path, 1, {k: k for k in range(6)})
    write_journal(tmp_path, 1, [("put", 100, 1)])
    flip_byte(path, path.stat().st_size - 30)
    assert repair.main([str(tmp_path)]) == 0
    assert loaded(tmp_path) == {0: 0, 1: 1, 2: 2, 3: 3, 100: 1}
    assert list(tmp_path.glob("snapshot-00000001.kvs.aside-*"))


def test_a_torn_tail_is_repaired_too(tmp_path) -> None:
    path = write_journal(tmp_path, 1, puts(0, 2))
    chop(path, 5)
    assert repair.main([str(tmp_path)]) == 0
    assert recover(str(tmp_path), truncateTorn=False).warnings == []


def test_a_healthy_directory_is_left_alone(tmp_path, capsys) -> None:
    path = write_journal(tmp_path, 1, puts(0, 2))
    before = path.read_bytes()
    assert repair.main([str(tmp_path)]) == 0
    assert path.read_bytes() == before
    assert "nothing to repair" in capsys.readouterr().out


def test_refuses_while_a_server_holds_the_directory(tmp_path, capsys) -> None:
    path = write_journal(tmp_path, 1, puts(0, 3))
    flip_byte(path, record_offset(0))
    before = path.read_bytes()
    assert whileLocked(tmp_path, [str(tmp_path)]) == 1
    assert path.read_bytes() == before
    assert "in use" in capsys.readouterr().err


def test_says_a_server_uses_the_directory_only_when_one_holds_its_lock(tmp_path, capsys) -> None:
    write_journal(tmp_path, 3, puts(0, 2))  # its snapshot is missing: repair cannot help
    assert repair.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.replace(str(tmp_path), "DIR")
    assert "is missing" in err and "server" not in err and "stop" not in err.lower()
    assert whileLocked(tmp_path, [str(tmp_path)]) == 1
    assert f"{tmp_path} is in use by a running kvtwist server (pid {os.getpid()})" in capsys.readouterr().err


def test_an_empty_directory_is_left_empty(tmp_path, capsys) -> None:
    assert repair.main([str(tmp_path)]) == 0
    assert list(tmp_path.iterdir()) == []
    captured = capsys.readouterr()
    assert "nothing to repair" in captured.out and "server" not in (captured.out + captured.err).replace(
        str(tmp_path), "DIR"
    )


def test_a_directory_without_kvtwist_data_is_left_as_it_is(tmp_path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / f"{journalName(1)}.aside").write_bytes(b"put aside earlier")
    assert repair.main([str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{journalName(1)}.aside", "notes.txt"]
    assert "nothing to repair" in capsys.readouterr().out


def test_an_empty_directory_that_a_server_holds_is_in_use(tmp_path, capsys) -> None:
    assert whileLocked(tmp_path, [str(tmp_path)]) == 1
    assert "in use by a running kvtwist server" in capsys.readouterr().err
    assert repair.main([str(tmp_path)]) == 0  # the LOCK a stopped server left
    assert [p.name for p in tmp_path.iterdir()] == ["LOCK"] and "nothing to repair" in capsys.readouterr().out


def test_prints_its_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvtwist.storage.repair", "--version"], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout) == (0, f"kvtwist {version()}\n")
    assert version() != "unknown"


def test_refuses_a_missing_directory(tmp_path, capsys) -> None:
    assert repair.main([str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_runs_as_a_command(tmp_path) -> None:
    path = write_journal(tmp_path, 1, puts(0, 3))
    flip_byte(path, record_offset(1))
    result = subprocess.run(
        [sys.executable, "-m", "kvtwist.storage.repair", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "loads 1 keys" in result.stdout


# Missing files: what repair can make load again, and what it cannot.


def test_a_snapshot_without_its_journal_gets_an_empty_one(tmp_path, capsys) -> None:
    write_snapshot(tmp_path, 3, {1: 1, 2: 2})
    assert repair.main([str(tmp_path)]) == 0
    assert loaded(tmp_path) == {1: 1, 2: 2}
    out = capsys.readouterr().out
    assert f"created {tmp_path / journalName(3)} empty" in out and "loads 2 keys" in out


def test_a_missing_newest_journal_is_created_empty(tmp_path) -> None:
    write_journal(tmp_path, 1, puts(0, 2), ended=True)
    assert repair.main([str(tmp_path)]) == 0
    recovered = recover(str(tmp_path))
    assert dict(recovered.map.items()) == {0: 0, 1: 10} and recovered.journalGeneration == 2


def test_journals_after_a_missing_one_are_moved_aside(tmp_path) -> None:
    write_journal(tmp_path, 1, puts(0, 2), ended=True)
    third = write_journal(tmp_path, 3, puts(2, 4), ended=True)
    fourth = write_journal(tmp_path, 4, puts(4, 6))
    assert repair.main([str(tmp_path)]) == 0
    assert not third.exists() and not fourth.exists()
    assert (tmp_path / f"{third.name}.aside").exists() and (tmp_path / f"{fourth.name}.aside").exists()
    assert loaded(tmp_path) == {0: 0, 1: 10}


def test_a_missing_snapshot_cannot_be_repaired(tmp_path, capsys) -> None:
    path = write_journal(tmp_path, 3, puts(0, 2))
    before = path.read_bytes()
    assert repair.main([str(tmp_path)]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LOCK", path.name] and path.read_bytes() == before
    err = capsys.readouterr().err
    assert f"{tmp_path / snapshotName(3)} is missing" in err and "cannot rebuild" in err


def test_journals_after_one_without_its_end_record_are_moved_aside(tmp_path) -> None:
    """The end of journal 1 was lost at a record boundary: journal 2 cannot be replayed after it."""
    write_journal(tmp_path, 1, puts(0, 3))
    second = write_journal(tmp_path, 2, puts(3, 5))
    assert repair.main([str(tmp_path)]) == 0
    assert not second.exists() and (tmp_path / f"{second.name}.aside").exists()
    assert loaded(tmp_path) == {k: k * 10 for k in range(3)}


def test_bytes_after_an_end_record_are_cut_and_the_next_journal_kept(tmp_path) -> None:
    first = write_journal(tmp_path, 1, puts(0, 2), ended=True)
    with open(first, "ab") as f:
        f.write(journal.encodePut(7, 7))
    write_journal(tmp_path, 2, puts(2, 3))
    assert repair.main([str(tmp_path)]) == 0
    assert loaded(tmp_path) == {0: 0, 1: 10, 2: 20}
    assert (tmp_path / f"{first.name}.aside-{record_offset(3)}").read_bytes() == journal.encodePut(7, 7)


def test_an_earlier_side_file_is_never_overwritten(tmp_path) -> None:
    path = write_journal(tmp_path, 1, puts(0, 4))
    flip_byte(path, record_offset(2))
    assert repair.main([str(tmp_path)]) == 0
    first = (tmp_path / f"{path.name}.aside-{record_offset(2)}").read_bytes()
    with open(path, "ab") as f:
        f.write(journal.encodePut(8, 8) + journal.encodePut(9, 9))
    flip_byte(path, record_offset(2))
    assert repair.main([str(tmp_path)]) == 0
    assert (tmp_path / f"{path.name}.aside-{record_offset(2)}").read_bytes() == first
    assert (tmp_path / f"{path.name}.aside-{record_offset(2)}.1").exists()


def test_a_link_planted_as_a_side_file_is_not_written_through(tmp_path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    data = tmp_path / "data"
    data.mkdir()
    path = write_journal(data, 1, puts(0, 4))
    flip_byte(path, record_offset(1))
    (data / f"{path.name}.aside-{record_offset(1)}").symlink_to(victim)
    assert repair.main([str(data)]) == 0
    assert victim.read_bytes() == b"precious"
    assert loaded(data) == {0: 0}


def test_an_unfinished_temporary_file_does_not_stand_in_the_way(tmp_path, monkeypatch) -> None:
    from kvtwist.storage import snapshot

    monkeypatch.setattr(snapshot, "MAX_BLOCK", 2)
    path = write_snapshot(tmp_path, 2, {k: k for k in range(6)})
    write_journal(tmp_path, 2, [])
    flip_byte(path, path.stat().st_size - 30)
    (tmp_path / f"{path.name}.tmp").write_bytes(b"left by a crash")
    assert repair.main([str(tmp_path)]) == 0
    assert loaded(tmp_path) == {0: 0, 1: 1, 2: 2, 3: 3}
    assert not (tmp_path / f"{path.name}.tmp").exists()


# --salvage: keep every record that still checks out.


def salvage(directory: Path) -> int:
    return repair.main([str(directory), "--salvage"])


# Key 1 is deleted after the record that gets damaged (put 3).
DELETED_AFTER_THE_DAMAGE = [("put", 1, 10), ("put", 2, 20), ("put", 3, 30), ("del", 1, 0), ("put", 4, 40)]


def test_by_default_a_flipped_byte_loses_every_later_record(tmp_path) -> None:
    """The state as of the record before the damage: the server had it, key 1 included."""
    path = write_journal(tmp_path, 1, DELETED_AFTER_THE_DAMAGE)
    flip_byte(path, record_offset(2) + 9)
    assert repair.main([str(tmp_path)]) == 0
    assert loaded(tmp_path) == {1: 10, 2: 20}


def test_salvage_keeps_a_deleted_key_deleted(tmp_path, capsys) -> None:
    path = write_journal(tmp_path, 1, DELETED_AFTER_THE_DAMAGE)
    original = path.read_bytes()
    flip_byte(path, record_offset(2) + 9)
    damaged = path.read_bytes()
    assert salvage(tmp_path) == 0
    assert loaded(tmp_path) == {2: 20, 4: 40}
    assert path.read_bytes() == original[: record_offset(2)] + original[record_offset(3) :]
    side = tmp_path / f"{path.name}.aside-{record_offset(2)}"
    assert side.read_bytes() == damaged[record_offset(2) : record_offset(3)]
    out = capsys.readouterr().out
    assert (
        f"skipped 21 bytes of {path} at offset {record_offset(2)} (record checksum mismatch); saved them to {side}"
        in out
    )
    assert f"kept 4 records of {path}" in out and "loads 2 keys" in out


def test_salvage_lists_every_skipped_range_exactly(tmp_path, capsys) -> None:
    """Two flipped bytes and five bytes slipped in between two records: three ranges, each saved."""
    ops = puts(0, 10)
    garbage = b"\xee\x01\x02\x03\xee"
    records = encode_ops(ops)
    at = 6 * RECORD_SIZE
    path = tmp_path / journalName(1)
    path.write_bytes(journal.encodeHeader(journal.MAGIC, 1) + records[:at] + garbage + records[at:])
    flip_byte(path, record_offset(1))
    flip_byte(path, record_offset(8) + len(garbage) + 20)
    damaged = path.read_bytes()
    assert salvage(tmp_path) == 0
    ranges = [(record_offset(1), RECORD_SIZE), (record_offset(6), len(garbage)), (record_offset(8) + 5, RECORD_SIZE)]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped")]
    assert len(lines) == len(ranges)
    for line, (offset, length) in zip(lines, ranges):
        side = tmp_path / f"{path.name}.aside-{offset}"
        assert line.startswith(f"skipped {length} bytes of {path} at offset {offset} (")
        assert line.endswith(f"saved them to {side}")
        assert side.read_bytes() == damaged[offset : offset + length]
    assert loaded(tmp_path) == {k: k * 10 for k in range(10) if k not in (1, 8)}


def test_salvage_keeps_the_journals_after_the_damaged_one(tmp_path) -> None:
    first = write_journal(tmp_path, 1, puts(0, 4), ended=True)
    second = write_journal(tmp_path, 2, [("del", 0, 0), ("put", 5, 50)])
    before = second.read_bytes()
    flip_byte(first, record_offset(1))
    assert salvage(tmp_path) == 0
    assert second.read_bytes() == before
    assert loaded(tmp_path) == {2: 20, 3: 30, 5: 50}


def test_salvage_ends_a_journal_whose_end_record_was_damaged(tmp_path, capsys) -> None:
    first = write_journal(tmp_path, 1, puts(0, 3), ended=True)
    write_journal(tmp_path, 2, [("del", 1, 0)])
    original = first.read_bytes()
    flip_byte(first, record_offset(3) + 2)
    assert salvage(tmp_path) == 0
    assert first.read_bytes() == original
    assert loaded(tmp_path) == {0: 0, 2: 20}
    out = capsys.readouterr().out
    assert f"rewrote it with only those, and an end record (its own was lost, and {journalName(2)} follows it)" in out


def test_salvage_ends_a_journal_that_lost_its_last_records(tmp_path) -> None:
    write_journal(tmp_path, 1, puts(0, 3))
    write_journal(tmp_path, 2, [("del", 1, 0)])
    assert salvage(tmp_path) == 0
    assert loaded(tmp_path) == {0: 0, 2: 20}


def test_salvage_rebuilds_a_damaged_journal_header_from_the_name(tmp_path) -> None:
    write_snapshot(tmp_path, 2, {7: 7})
    path = write_journal(tmp_path, 2, puts(0, 3))
    original = path.read_bytes()
    flip_byte(path, 12)  # in the generation
    assert salvage(tmp_path) == 0
    assert path.read_bytes() == original
    assert (tmp_path / f"{path.name}.aside-0").read_bytes()[12] == original[12] ^ 0xFF
    assert loaded(tmp_path) == {7: 7, 0: 0, 1: 10, 2: 20}


def test_salvage_moves_aside_a_journal_of_another_format_version(tmp_path) -> None:
    """An intact header of a version this kvtwist does not read is not damage: never rewritten."""
    write_journal(tmp_path, 1, puts(0, 2))
    future = write_journal(tmp_path, 2, puts(2, 4), version=99)
    before = future.read_bytes()
    assert salvage(tmp_path) == 0
    assert (tmp_path / f"{future.name}.aside").read_bytes() == before
    assert loaded(tmp_path) == {0: 0, 1: 10}


def test_salvage_replaces_a_missing_journal_to_keep_the_ones_after_it(tmp_path) -> None:
    write_journal(tmp_path, 1, puts(0, 2), ended=True)
    write_journal(tmp_path, 3, [("del", 0, 0)], ended=True)
    write_journal(tmp_path, 4, puts(4, 5))
    assert salvage(tmp_path) == 0
    assert (tmp_path / journalName(2)).read_bytes() == journal.encodeHeader(journal.MAGIC, 2) + journal.encodeEnd(3)
    assert loaded(tmp_path) == {1: 10, 4: 40}


def test_a_lone_good_record_between_two_damaged_ones_is_skipped_but_not_the_last_one(tmp_path) -> None:
    """Two records in a row must check out to resume, except for a record that ends the file."""
    path = write_journal(tmp_path, 1, puts(0, 6))
    flip_byte(path, record_offset(2))
    flip_byte(path, record_offset(4))
    assert salvage(tmp_path) == 0
    assert loaded(tmp_path) == {0: 0, 1: 10, 5: 50}
    assert (tmp_path / f"{path.name}.aside-{record_offset(2)}").stat().st_size == 3 * RECORD_SIZE


def test_garbage_that_passes_one_checksum_is_not_taken_for_records(tmp_path) -> None:
    fake = journal.encodePut(666, 666)
    records = encode_ops(puts(0, 4))
    path = tmp_path / journalName(1)
    head = journal.encodeHeader(journal.MAGIC, 1)
    path.write_bytes(head + records[:42] + b"\xee" * 5 + fake + b"\xee" * 3 + records[42:])
    assert salvage(tmp_path) == 0
    assert loaded(tmp_path) == {0: 0, 1: 10, 2: 20, 3: 30}
    assert (tmp_path / f"{path.name}.aside-{record_offset(2)}").stat().st_size == 5 + RECORD_SIZE + 3


def test_salvage_cuts_a_torn_tail_as_the_default_does(tmp_path, capsys) -> None:
    path = write_journal(tmp_path, 1, puts(0, 3))
    chop(path, 5)
    assert salvage(tmp_path) == 0
    assert path.stat().st_size == record_offset(2)
    assert f"cut it at offset {record_offset(2)}" in capsys.readouterr().out


def test_salvage_leaves_a_healthy_directory_alone(tmp_path) -> None:
    """Also a compaction's empty newest journal, never switched to, and a version 1 directory."""
    compacting = tmp_path / "compacting"
    compacting.mkdir()
    write_journal(compacting, 1, puts(0, 3))
    write_journal(compacting, 2, [])
    v1 = copy_v1_datadir(tmp_path / "v1")
    for directory in (compacting, v1):
        before = {p.name: p.read_bytes() for p in directory.iterdir()}
        assert salvage(directory) == 0
        after = {p.name: p.read_bytes() for p in directory.iterdir() if p.name != "LOCK"}
        assert after == {name: data for name, data in before.items() if name != "LOCK"}
    assert loaded(v1) == v1_expected()


OPS = st.lists(
    st.tuples(st.sampled_from(["put", "del"]), st.integers(0, 7), st.integers(-100, 100)).map(
        lambda op: op if op[0] == "put" else ("del", op[1], 0)
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=100, deadline=None)
@given(OPS, st.data())
def test_salvage_loses_only_the_records_the_damage_touched(ops, data) -> None:
    """Whatever bytes are overwritten, every record outside them is replayed; the default stops at the first."""
    size = len(ops) * RECORD_SIZE
    start = data.draw(st.integers(0, size - 1))
    stop = data.draw(st.integers(start + 1, min(size, start + 3 * RECORD_SIZE)))
    noise = data.draw(st.binary(min_size=stop - start, max_size=stop - start))
    touched = range(start // RECORD_SIZE, (stop - 1) // RECORD_SIZE + 1)

    def replayed(kept: list[tuple[str, int, int]]) -> dict[int, int]:
        state: dict[int, int] = {}
        journal.replay("expected", journal.encodeHeader(journal.MAGIC, 1) + encode_ops(kept), state)
        return state

    for salvaging in (True, False):
        with tempfile.TemporaryDirectory() as name:
            directory = Path(name)
            path = write_journal(directory, 1, ops)
            damaged = bytearray(path.read_bytes())
            for i, byte in enumerate(noise):
                damaged[HEADER_SIZE + start + i] ^= byte | 1  # every byte changes
            path.write_bytes(bytes(damaged))
            args = [name, "--salvage"] if salvaging else [name]
            assert repair.main(args) == 0
            if salvaging:
                expected = replayed([op for i, op in enumerate(ops) if i not in touched])
            else:
                expected = replayed(ops[: touched[0]])
            assert loaded(directory) == expected
            sides = sum(p.stat().st_size for p in directory.glob("*.aside-*"))
            kept = path.stat().st_size - HEADER_SIZE
            assert kept + sides == size
