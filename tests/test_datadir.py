"""The data directory: everything created owner-only, nothing written through a planted link."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtwist.storage import datadir, journal
from kvtwist.storage.datadir import DirectoryLock, createJournal, makeDataDir, writeFileAtomically


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture(params=[0o000, 0o277], ids=["umask 000", "umask 277"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """A umask that would leave files open to all, or shut their owner out."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_the_data_directory_and_its_missing_parents_are_owner_only(tmp_path, umask) -> None:
    top = tmp_path / "srv" / "kv" / "data"
    makeDataDir(str(top))
    assert [mode(p) for p in (tmp_path / "srv", tmp_path / "srv" / "kv", top)] == [0o700] * 3


def test_an_existing_data_directory_is_left_as_it_is(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data").chmod(0o750)
    makeDataDir(str(tmp_path / "data"))
    assert mode(tmp_path / "data") == 0o750


def test_a_file_where_the_directory_should_be_is_an_error(tmp_path) -> None:
    (tmp_path / "data").write_bytes(b"")
    with pytest.raises(FileExistsError):
        makeDataDir(str(tmp_path / "data"))


def test_journals_and_the_lock_are_owner_only(tmp_path, umask) -> None:
    createJournal(str(tmp_path), 1).close()
    lock = DirectoryLock(str(tmp_path))
    lock.acquire()
    lock.release()
    assert mode(tmp_path / "journal-00000001.kvj") == 0o600 and mode(tmp_path / "LOCK") == 0o600
    assert (tmp_path / "LOCK").read_text().strip() == str(os.getpid())


def test_a_lock_file_left_by_an_older_kvtwist_becomes_owner_only(tmp_path) -> None:
    (tmp_path / "LOCK").write_text("123\n")
    (tmp_path / "LOCK").chmod(0o644)
    lock = DirectoryLock(str(tmp_path))
    lock.acquire()
    lock.release()
    assert mode(tmp_path / "LOCK") == 0o600


def test_a_new_journal_is_in_the_current_format(tmp_path) -> None:
    createJournal(str(tmp_path), 4).close()
    scan = journal.readJournal(str(tmp_path / "journal-00000004.kvj"))
    assert (scan.generation, scan.version, scan.records, scan.clean) == (4, journal.VERSION, 0, True)


def test_a_link_planted_as_the_temporary_journal_makes_the_creation_fail(tmp_path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "journal-00000002.kvj.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        createJournal(str(tmp_path), 2)
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "journal-00000002.kvj").exists()


def test_a_link_planted_as_the_lock_is_not_followed(tmp_path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    victim.chmod(0o644)
    (tmp_path / "LOCK").symlink_to(victim)
    with pytest.raises(OSError) as caught:
        DirectoryLock(str(tmp_path)).acquire()
    assert caught.value.errno == errno.ELOOP
    assert victim.read_bytes() == b"precious" and mode(victim) == 0o644


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch) -> None:
    """Otherwise the next attempt, which insists on a new file, could never succeed."""

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datadir.os, "write", full)
    with pytest.raises(OSError, match="No space"):
        writeFileAtomically(str(tmp_path), "journal-00000002.kvj", b"data")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == []
    writeFileAtomically(str(tmp_path), "journal-00000002.kvj", b"data")
    assert (tmp_path / "journal-00000002.kvj").read_bytes() == b"data"
