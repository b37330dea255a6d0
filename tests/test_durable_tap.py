"""The ``--data`` and ``--fsync`` options, and the service they build."""

from __future__ import annotations

import pytest
from twisted.application.service import IServiceCollection
from twisted.internet.testing import MemoryReactor
from twisted.python.usage import UsageError

from kvtwist.storage.datadir import DirectoryLock
from kvtwist.server.listening import KVService
from kvtwist.storage.durable import DurableService
from kvtwist.storage.fsync import Always, EverySecond, NoSync
from kvtwist.tap import Options, makeService


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


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


def test_a_data_path_that_is_a_file_is_one_clear_line(tmp_path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(SystemExit, match=f"^kvstore: cannot start: data directory {path}: "):
        makeService(parse("--data", str(path)), MemoryReactor())
