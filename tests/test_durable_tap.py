"""The ``--data`` and ``--fsync`` options, and the service they build."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence

import pytest
from twisted.application.service import IService, IServiceCollection
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.logger import LogEvent, LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.python.usage import UsageError

from kvtwist.compiled import CompiledStore
from kvtwist.storage.datadir import DirectoryLock
from kvtwist.server.listening import KVService
from kvtwist.storage.durable import DurableService
from kvtwist.storage.fsync import Always, EverySecond, NoSync
from kvtwist.storage.interface import Batch
from kvtwist.tap import Options, makeService
from kvtwist.version import version


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


@pytest.fixture
def logged() -> Iterator[Sequence[LogEvent]]:
    with capturedLogs() as events:
        yield events


def test_defaults_keep_the_store_in_memory() -> None:
    options = parse()
    assert options["data"] is None and options["fsync"] == "everysec"
    assert isinstance(makeService(options, MemoryReactor()), KVService)


def test_an_unknown_fsync_policy_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="always, everysec, no"):
        parse("--fsync", "sometimes")


@pytest.mark.parametrize("fsync, policy", [("always", Always), ("everysec", EverySecond), ("no", NoSync)])
def test_data_builds_a_durable_store_behind_the_listener(tmp_path, fsync, policy) -> None:
    top = makeService(parse("--data", str(tmp_path), "--fsync", fsync), MemoryReactor())
    durable, listening = list(IServiceCollection(top))
    assert isinstance(durable, DurableService) and isinstance(listening, KVService)
    assert isinstance(durable.store.policy, policy)
    assert listening.factory.store is durable.store
    durable.store.close()


def test_a_locked_directory_is_one_clear_line(tmp_path) -> None:
    lock = DirectoryLock(str(tmp_path))
    lock.acquire()
    try:
        with pytest.raises(SystemExit, match=r"^kvstore: cannot start: data directory .* is in use"):
            makeService(parse("--data", str(tmp_path)), MemoryReactor())
    finally:
        lock.release()


def test_a_data_path_that_is_a_file_is_a_usage_error(tmp_path) -> None:
    # Before, it was "File exists" at start-up.
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(UsageError, match=f"^--data {path} is a file, not a directory$"):
        parse("--data", str(path))


def test_a_data_path_that_is_a_fifo_is_a_usage_error(tmp_path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    with pytest.raises(UsageError, match=f"^--data {path} is not a directory$"):
        parse("--data", str(path))


def test_a_link_to_a_directory_is_a_data_directory(tmp_path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert parse("--data", str(tmp_path / "link"))["data"] == str(tmp_path / "link")


def test_a_data_path_inside_a_file_is_a_usage_error(tmp_path) -> None:
    path = tmp_path / "file" / "data"
    path.parent.write_text("")
    with pytest.raises(UsageError, match=f"^--data {path}: {path.parent} is a file, not a directory$"):
        parse("--data", str(path))


def test_a_data_directory_that_cannot_be_made_is_one_clear_line(tmp_path) -> None:
    options = parse("--data", str(tmp_path / "data"))
    (tmp_path / "data").write_text("")  # after the check, before the start
    with pytest.raises(SystemExit, match=f"^kvstore: cannot start: data directory {tmp_path / 'data'}: File exists$"):
        makeService(options, MemoryReactor())


@pytest.mark.parametrize("fsync", ["always", "everysec", "no"])
def test_fsync_without_data_is_a_usage_error(fsync) -> None:
    # Before, it was silently ignored; the default needs no --data.
    with pytest.raises(UsageError, match="^--fsync needs --data"):
        parse("--fsync", fsync)


def withOneKey(top: IService) -> IService:
    """``top`` started, with one key put in its store."""
    top.startService()
    durable, listening = list(IServiceCollection(top))
    assert listening.factory.store.put(1, 1, Batch())
    return top


def stop(top: IService) -> None:
    """Stop ``top`` on its MemoryReactorClock, to the end."""
    durable, listening = list(IServiceCollection(top))
    stopped: list[object] = []
    top.stopService().addBoth(stopped.append)
    durable.store.reactor.advance(0)
    durable.store.reactor.advance(0)
    assert len(stopped) == 1 and not isinstance(stopped[0], Failure)


def test_the_start_up_story_comes_before_the_listening_line(tmp_path, logged) -> None:
    data = tmp_path / "data"
    stop(withOneKey(makeService(parse("--data", str(data)), MemoryReactorClock())))
    logged.clear()
    top = makeService(parse("--data", str(data), "--fsync", "no", "--port", "unix:/tmp/kvtwist-test.sock"),
                      MemoryReactorClock())
    top.startService()
    assert [formatEvent(e) for e in logged] == [
        f"kvstore: kvtwist {version()} starting",
        f"kvstore: store: data directory {data} (fsync no{', compiled' if CompiledStore is not None else ''})",
        f"kvstore: 1 keys loaded from {data}",
        "kvstore listening on UNIXAddress('/tmp/kvtwist-test.sock')",
    ]
    stop(top)


def test_stopping_says_the_journal_is_on_disk(tmp_path, logged) -> None:
    top = withOneKey(makeService(parse("--data", str(tmp_path), "--fsync", "no"), MemoryReactorClock()))
    logged.clear()
    stop(top)
    assert [formatEvent(e) for e in logged if "kvstore" in formatEvent(e)] == [
        f"kvstore: journal flushed and fsynced; 1 keys in {tmp_path}"]


def test_a_failed_final_fsync_is_critical_and_not_called_flushed(tmp_path, logged, monkeypatch) -> None:
    top = withOneKey(makeService(parse("--data", str(tmp_path), "--fsync", "no"), MemoryReactorClock()))

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync" if hasattr(os, "fdatasync") else "fsync", failing)
    stop(top)
    [finalFsync] = [formatEvent(e) for e in logged if "final fsync" in formatEvent(e)]
    assert finalFsync.startswith("kvstore: final fsync of the journal failed: ")
    assert os.strerror(errno.EIO) in finalFsync
    assert [e["log_level"] for e in logged if "final fsync" in formatEvent(e)] == [LogLevel.critical]
    assert not [e for e in logged if "flushed" in formatEvent(e)]
