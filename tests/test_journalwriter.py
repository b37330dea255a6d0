"""The journal writer: one write per record, nothing partial left behind, syncs from another thread."""

from __future__ import annotations

import os
import threading

import pytest

from kvtwist.storage import journal
from kvtwist.storage.journalwriter import JournalWriteError, JournalWriter


def test_writer_appends_records_that_read_back(tmp_path) -> None:
    path = str(tmp_path / "j")
    with open(path, "wb") as f:
        f.write(journal.encodeHeader(journal.MAGIC, 1))
    writer = JournalWriter.open(path)
    writer.append(journal.encodePut(5, 6))
    writer.append(journal.encodeDel(5))
    writer.append(journal.encodePut(-1, 2**63 - 1))
    writer.sync()
    writer.close()
    state: dict[int, int] = {}
    scan = journal.readJournal(path, state)
    assert state == {-1: 2**63 - 1} and scan.records == 3 and scan.size == writer.size


def test_a_failed_append_leaves_no_partial_record(tmp_path, monkeypatch) -> None:
    """A short write followed by ENOSPC is cut off, so later appends stay aligned."""
    path = str(tmp_path / "j")
    with open(path, "wb") as f:
        f.write(journal.encodeHeader(journal.MAGIC, 1))
    writer = JournalWriter.open(path)
    writer.append(journal.encodePut(1, 1))
    real_write = os.write
    calls = []

    def short_then_full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[:5])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(JournalWriteError, match="No space left"):
        writer.append(journal.encodePut(2, 2))
    monkeypatch.undo()
    writer.append(journal.encodePut(3, 3))
    writer.close()
    state: dict[int, int] = {}
    assert journal.readJournal(path, state).clean
    assert state == {1: 1, 3: 3}


def test_close_waits_for_a_sync_running_in_another_thread(tmp_path, monkeypatch) -> None:
    """The compaction closes the old journal while the fsync policy may still sync it."""

    path = str(tmp_path / "j")
    with open(path, "wb") as f:
        f.write(journal.encodeHeader(journal.MAGIC, 1))
    writer = JournalWriter.open(path)
    fd = writer._fd
    entered, release = threading.Event(), threading.Event()
    real = getattr(os, "fdatasync", os.fsync)

    def slow_sync(n: int) -> None:
        entered.set()
        release.wait(10)
        real(n)

    monkeypatch.setattr(os, "fdatasync" if hasattr(os, "fdatasync") else "fsync", slow_sync)
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(writer.sync, errors))
    thread.start()
    assert entered.wait(10)
    writer.close()
    os.fstat(fd)  # still open: the sync is using it
    release.set()
    thread.join(10)
    assert errors == []
    with pytest.raises(OSError):
        os.fstat(fd)
    writer.sync()  # after close: nothing to do, no error


def _capture(fn, errors: list[BaseException]) -> None:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - reported to the test
        errors.append(e)
