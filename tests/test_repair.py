"""``kvtwist-repair``: keep everything before the first bad record, move the rest aside."""

from __future__ import annotations

import subprocess
import sys

from journalfiles import chop, flip_byte, puts, record_offset, write_journal, write_snapshot
from kvtwist.storage import repair
from kvtwist.storage.datadir import DirectoryLock
from kvtwist.storage.recovery import recover


def test_corrupt_middle_keeps_the_prefix_and_saves_the_rest(tmp_path, capsys) -> None:
    path = write_journal(tmp_path, 1, puts(0, 6))
    original = path.read_bytes()
    flip_byte(path, record_offset(3) + 1)
    damaged = path.read_bytes()
    assert repair.main([str(tmp_path)]) == 0
    side = tmp_path / f"{path.name}.aside-{record_offset(3)}"
    assert side.read_bytes() == damaged[record_offset(3) :]
    assert path.read_bytes() == original[: record_offset(3)]
    assert recover(str(tmp_path)).data == {k: k * 10 for k in range(3)}
    out = capsys.readouterr().out
    assert str(side) in out and "loads 3 keys" in out


def test_journals_after_the_damaged_one_are_moved_aside_whole(tmp_path) -> None:
    first = write_journal(tmp_path, 1, puts(0, 4))
    second = write_journal(tmp_path, 2, puts(4, 6))
    flip_byte(first, record_offset(1))
    assert repair.main([str(tmp_path)]) == 0
    assert not second.exists()
    assert (tmp_path / f"{second.name}.aside").exists()
    assert recover(str(tmp_path)).data == {0: 0}


def test_a_damaged_snapshot_keeps_its_good_blocks(tmp_path, monkeypatch) -> None:
    from kvtwist.storage import snapshot

    monkeypatch.setattr(snapshot, "MAX_BLOCK", 2)
    path = write_snapshot(tmp_path, 1, {k: k for k in range(6)})
    write_journal(tmp_path, 1, [("put", 100, 1)])
    flip_byte(path, path.stat().st_size - 30)
    assert repair.main([str(tmp_path)]) == 0
    data = recover(str(tmp_path)).data
    assert data == {0: 0, 1: 1, 2: 2, 3: 3, 100: 1}
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
