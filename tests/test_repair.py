"""``kvtwist-repair``: keep everything before the first bad record, move the rest aside."""

from __future__ import annotations

import subprocess
import sys

from journalfiles import chop, flip_byte, puts, record_offset, write_journal, write_snapshot
from kvtwist.storage import journal, repair
from kvtwist.storage.datadir import DirectoryLock, journalName, snapshotName
from kvtwist.storage.recovery import recover


def loaded(directory) -> dict[int, int]:
    return dict(recover(str(directory)).map.items())


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
    lock = DirectoryLock(str(tmp_path))
    lock.acquire()
    try:
        assert repair.main([str(tmp_path)]) == 1
    finally:
        lock.release()
    assert path.read_bytes() == before
    assert "in use" in capsys.readouterr().err


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
