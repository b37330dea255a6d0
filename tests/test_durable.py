"""The durable layer: journal-first writes, fsync policies, group commit, read-only, compaction, stop."""

from __future__ import annotations

import errno
import os

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from kvtwist.storage.durable import DurableService
from kvtwist.storage.journaled import JournaledStore
from kvtwist.server.protocol import KVFactory
from kvtwist.storage.recovery import recover


class SyncCounter:
    """Counts the journal's real fsyncs, and can make the next ones fail."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        self.error: OSError | None = None
        real = getattr(os, "fdatasync", os.fsync)

        def counted(fd: int) -> None:
            self.calls += 1
            if self.error is not None:
                raise self.error
            real(fd)

        monkeypatch.setattr(os, "fdatasync" if hasattr(os, "fdatasync") else "fsync", counted)


class HeldSyncs:
    """A ``runBlocking`` that runs each fsync only when the test says so."""

    def __init__(self) -> None:
        self.held: list[tuple[object, defer.Deferred]] = []

    def __call__(self, fn) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.held.append((fn, d))
        return d

    def finish_one(self, index: int = 0) -> None:
        fn, d = self.held.pop(index)
        fn()
        d.callback(None)


def run_compaction_until(clock: Clock, syncs: HeldSyncs, done, keep: int = 0) -> None:
    """Turn the reactor and finish the compaction's fsyncs until ``done()``.

    The first ``keep`` held fsyncs (the policy's) stay held.
    """
    for _ in range(100):
        if done():
            return
        clock.advance(0)
        while len(syncs.held) > keep and not done():
            syncs.finish_one(keep)
    raise AssertionError("the compaction did not get there")


def serve(tmp_path, fsync: str, runBlocking=defer.maybeDeferred, **kwargs) -> tuple[DurableService, KVFactory, Clock]:
    """A started DurableService on a Clock; by default fsyncs run at once, in line."""
    clock = Clock()
    journaled = JournaledStore.open(str(tmp_path), **kwargs)
    durable = DurableService(journaled, fsync, clock, runBlocking=runBlocking)
    durable.startService()
    factory = KVFactory(journaled, whenDurable=durable.whenDurable)
    return durable, factory, clock


def connect(factory: KVFactory) -> tuple[object, StringTransport]:
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def stop(durable: DurableService, clock: Clock) -> None:
    fired: list[object] = []
    durable.stopService().addCallback(fired.append)
    clock.advance(0)
    clock.advance(0)
    assert fired


# Journal first, then the store

def test_changes_are_journaled_and_recovered(tmp_path) -> None:
    journaled = JournaledStore.open(str(tmp_path))
    assert journaled.put(1, 10) and journaled.put(2, 20) and journaled.delete(1)
    assert not journaled.put(2, 99) and not journaled.delete(7)
    size = journaled.writer.size
    journaled.close()
    assert recover(str(tmp_path)).data == {2: 20}
    assert size == os.path.getsize(tmp_path / "journal-00000001.kvj")


def test_refused_changes_are_not_journaled(tmp_path) -> None:
    journaled = JournaledStore.open(str(tmp_path))
    journaled.put(1, 1)
    size = journaled.writer.size
    journaled.put(1, 2)
    journaled.delete(5)
    assert journaled.writer.size == size
    journaled.close()


def test_a_second_open_of_the_same_directory_is_refused(tmp_path) -> None:
    from kvtwist.storage.datadir import DataDirLocked

    first = JournaledStore.open(str(tmp_path))
    with pytest.raises(DataDirLocked, match=f"{tmp_path} is in use .*pid {os.getpid()}"):
        JournaledStore.open(str(tmp_path))
    first.close()
    JournaledStore.open(str(tmp_path)).close()


# Read-only after a write error

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_failed_append_turns_the_store_read_only(tmp_path, monkeypatch, code) -> None:
    durable, factory, clock = serve(tmp_path, "everysec")
    proto, transport = connect(factory)
    proto.dataReceived(b"put 1 1\n")
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    proto.dataReceived(b"put 2 2\ndel 1\nget 1\nget 2\n")
    monkeypatch.setattr(os, "write", real_write)
    proto.dataReceived(b"put 3 3\n")
    reason = f"journal write failed: {os.strerror(code)}"
    refusal = f"Error: store is read-only ({reason})\n".encode()
    assert transport.value() == b"OK\n" + refusal * 2 + b"1\nKey not found\n" + refusal
    assert durable.journaled.readOnlyReason == reason
    stop(durable, clock)
    assert recover(str(tmp_path)).data == {1: 1}


def test_read_only_is_logged_loudly(tmp_path, monkeypatch) -> None:
    from twisted.logger import LogLevel, globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        durable, factory, clock = serve(tmp_path, "no")
        monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
        with pytest.raises(Exception, match="read-only"):
            durable.journaled.put(1, 1)
        monkeypatch.undo()
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if e["log_level"] == LogLevel.critical]
    assert "READ-ONLY" in event["log_format"] and "restart" in event["help"]
    stop(durable, clock)


# Group commit under --fsync always

def test_always_holds_every_reply_until_one_fsync(tmp_path, monkeypatch) -> None:
    durable, factory, clock = serve(tmp_path, "always")
    syncs = SyncCounter(monkeypatch)
    writer, writerTransport = connect(factory)
    reader, readerTransport = connect(factory)
    bystander, bystanderTransport = connect(factory)
    bystander.dataReceived(b"get 5\n")
    assert bystanderTransport.value() == b"Key not found\n"
    writer.dataReceived(b"put 5 50\n")
    reader.dataReceived(b"get 5\n")
    writer.dataReceived(b"del 5\n")
    assert writerTransport.value() == readerTransport.value() == b""
    assert syncs.calls == 0
    clock.advance(0)
    assert syncs.calls == 1
    assert writerTransport.value() == b"OK\nOK\n"
    assert readerTransport.value() == b"50\n"
    bystander.dataReceived(b"get 5\n")
    assert bystanderTransport.value() == b"Key not found\n" * 2
    assert syncs.calls == 1
    stop(durable, clock)


def test_always_sends_at_once_what_depends_on_no_unsynced_write(tmp_path, monkeypatch) -> None:
    durable, factory, clock = serve(tmp_path, "always")
    durable.journaled.put(7, 70)
    clock.advance(0)
    syncs = SyncCounter(monkeypatch)
    writer, writerTransport = connect(factory)
    reader, readerTransport = connect(factory)
    writer.dataReceived(b"put 1 10\ndel 7\n")
    reader.dataReceived(b"get 2\nput 2 20\n")
    assert readerTransport.value() == b""
    reader.dataReceived(b"get 1\nput 1 11\nget 7\ndel 7\n")
    other, otherTransport = connect(factory)
    other.dataReceived(b"get 3\nput 1 12\n")
    other.dataReceived(b"get 4\n")
    assert writerTransport.value() == readerTransport.value() == b""
    assert otherTransport.value() == b""
    fresh, freshTransport = connect(factory)
    fresh.dataReceived(b"get 3\nget 4\n")
    assert freshTransport.value() == b"Key not found\nKey not found\n", "nothing unsynced was read"
    clock.advance(0)
    assert syncs.calls == 1
    assert writerTransport.value() == b"OK\nOK\n"
    assert readerTransport.value() == b"Key not found\nOK\n10\nKey already exists\nKey not found\nKey not found\n"
    assert otherTransport.value() == b"Key not found\nKey already exists\nKey not found\n"


def test_a_connection_s_replies_never_overtake_each_other(tmp_path) -> None:
    durable, factory, clock = serve(tmp_path, "always")
    proto, transport = connect(factory)
    proto.dataReceived(b"put 1 1\n")
    proto.dataReceived(b"get 2\n")
    proto.dataReceived(b"bye\n")
    assert transport.value() == b"" and not transport.disconnecting
    clock.advance(0)
    assert transport.value() == b"OK\nKey not found\nGoodbye\n" and transport.disconnecting


def test_always_keeps_reply_batches_in_order(tmp_path) -> None:
    durable, factory, clock = serve(tmp_path, "always")
    order: list[str] = []
    factory.whenDurable(order.append, "clean")
    durable.journaled.put(1, 1)
    factory.whenDurable(order.append, "first")
    factory.whenDurable(order.append, "second")
    clock.advance(0)
    durable.journaled.put(2, 2)
    factory.whenDurable(order.append, "third")
    clock.advance(0)
    assert order == ["clean", "first", "second", "third"]
    stop(durable, clock)


def test_always_never_sends_a_reply_whose_fsync_failed(tmp_path, monkeypatch) -> None:
    durable, factory, clock = serve(tmp_path, "always")
    syncs = SyncCounter(monkeypatch)
    writer, writerTransport = connect(factory)
    reader, readerTransport = connect(factory)
    syncs.error = OSError(errno.EIO, "Input/output error")
    writer.dataReceived(b"put 1 1\n")
    reader.dataReceived(b"get 1\n")
    clock.advance(0)
    assert writerTransport.value() == readerTransport.value() == b""
    assert writerTransport.disconnecting and readerTransport.disconnecting
    other, otherTransport = connect(factory)
    other.dataReceived(b"get 2\nput 2 2\n")
    assert otherTransport.value() == (
        b"Key not found\nError: store is read-only (journal fsync failed: Input/output error)\n"
    )
    syncs.error = None
    stop(durable, clock)


# --fsync everysec and no

def test_everysec_syncs_once_a_second_and_replies_at_once(tmp_path, monkeypatch) -> None:
    durable, factory, clock = serve(tmp_path, "everysec")
    syncs = SyncCounter(monkeypatch)
    proto, transport = connect(factory)
    proto.dataReceived(b"put 1 1\n")
    assert transport.value() == b"OK\n"
    clock.advance(0.5)
    assert syncs.calls == 0
    clock.advance(0.5)
    assert syncs.calls == 1
    clock.advance(1)
    assert syncs.calls == 1, "nothing new to sync"
    stop(durable, clock)


def test_no_leaves_syncing_to_the_os_until_stop(tmp_path, monkeypatch) -> None:
    durable, factory, clock = serve(tmp_path, "no")
    syncs = SyncCounter(monkeypatch)
    proto, transport = connect(factory)
    proto.dataReceived(b"put 1 1\n")
    clock.advance(5)
    assert transport.value() == b"OK\n" and syncs.calls == 0
    stop(durable, clock)
    assert syncs.calls == 1


# Stopping

def test_stop_syncs_releases_waiting_replies_and_the_lock(tmp_path, monkeypatch) -> None:
    durable, factory, clock = serve(tmp_path, "always")
    syncs = SyncCounter(monkeypatch)
    proto, transport = connect(factory)
    proto.dataReceived(b"put 1 1\n")
    fired: list[object] = []
    durable.stopService().addCallback(fired.append)
    assert transport.value() == b"OK\n" and syncs.calls == 1
    assert not fired, "the transports get a turn to send"
    clock.advance(0)
    clock.advance(0)
    assert fired
    JournaledStore.open(str(tmp_path)).close()


# Compaction

def fill(journaled: JournaledStore, start: int, stop: int) -> None:
    for key in range(start, stop):
        journaled.put(key, key)
        if key % 3 == 0:
            journaled.delete(key - 1)


def test_compaction_starts_by_itself_and_keeps_every_change(tmp_path) -> None:
    durable, factory, clock = serve(tmp_path, "everysec", compactMinBytes=4000)
    journaled = durable.journaled
    fill(journaled, 0, 150)
    assert durable._compaction is not None, "the journal outgrew the threshold"
    while durable._compaction is not None:
        fill(journaled, 1000 + len(journaled), 1003 + len(journaled))
        clock.advance(0)
    expected = dict(journaled.items())
    assert journaled.generation == 2
    names = sorted(os.listdir(tmp_path))
    assert names == ["LOCK", "journal-00000002.kvj", "snapshot-00000002.kvs"]
    stop(durable, clock)
    assert recover(str(tmp_path)).data == expected


def test_stop_during_compaction_waits_for_its_fsync_and_leaves_no_temporary(tmp_path) -> None:
    syncs = HeldSyncs()
    durable, factory, clock = serve(tmp_path, "everysec", syncs)
    journaled = durable.journaled
    fill(journaled, 0, 100)
    durable.compact()
    temporary = tmp_path / "snapshot-00000002.kvs.tmp"
    run_compaction_until(clock, syncs, lambda: temporary.exists() and syncs.held)
    fill(journaled, 200, 210)
    expected = dict(journaled.items())
    fired: list[object] = []
    durable.stopService().addCallback(fired.append)
    clock.advance(0)
    assert not fired and journaled.lock.held, "the fsync under way is waited for"
    syncs.finish_one()
    clock.advance(0)
    clock.advance(0)
    assert fired and not journaled.lock.held
    assert sorted(os.listdir(tmp_path)) == ["LOCK", "journal-00000001.kvj", "journal-00000002.kvj"]
    assert recover(str(tmp_path)).data == expected


def test_always_pipelines_fsyncs_in_the_background(tmp_path) -> None:
    """Writes made while one fsync runs wait for the next; each batch leaves once covered."""
    syncs = HeldSyncs()
    durable, factory, clock = serve(tmp_path, "always", syncs)
    first, firstTransport = connect(factory)
    second, secondTransport = connect(factory)
    first.dataReceived(b"put 1 1\n")
    clock.advance(0)
    assert len(syncs.held) == 1
    second.dataReceived(b"put 2 2\n")
    first.dataReceived(b"get 2\n")
    clock.advance(0)
    assert len(syncs.held) == 1, "one fsync at a time"
    syncs.finish_one()
    assert firstTransport.value() == b"OK\n" and secondTransport.value() == b""
    assert len(syncs.held) == 1, "the next fsync started at once"
    syncs.finish_one()
    assert firstTransport.value() == b"OK\n2\n" and secondTransport.value() == b"OK\n"
    stop(durable, clock)


def test_compaction_switches_journals_under_a_running_fsync(tmp_path) -> None:
    """The old journal is closed only once the fsync running on it returns."""
    syncs = HeldSyncs()
    durable, factory, clock = serve(tmp_path, "always", syncs)
    journaled = durable.journaled
    journaled.put(1, 1)
    clock.advance(0)
    assert len(syncs.held) == 1
    durable.compact()
    run_compaction_until(clock, syncs, lambda: journaled.generation == 2, keep=1)
    syncs.finish_one()
    assert journaled.readOnlyReason is None and not journaled.unsynced
    run_compaction_until(clock, syncs, lambda: durable._compaction is None)
    stop(durable, clock)
    assert recover(str(tmp_path)).data == {1: 1}


def test_always_replies_when_a_compaction_synced_the_journal_first(tmp_path) -> None:
    """A compaction's own fsync covers a waiting write: its reply must still leave."""
    from kvtwist.storage.journal import HEADER_SIZE, RECORD_SIZE

    syncs = HeldSyncs()
    durable, factory, clock = serve(tmp_path, "always", syncs, compactMinBytes=HEADER_SIZE + 2 * RECORD_SIZE)
    first, firstTransport = connect(factory)
    second, secondTransport = connect(factory)
    first.dataReceived(b"put 1 1\n")
    clock.advance(0)
    assert len(syncs.held) == 1
    second.dataReceived(b"put 2 2\n")
    run_compaction_until(clock, syncs, lambda: durable.journaled.generation == 2, keep=1)
    assert not durable.journaled.unsynced
    syncs.finish_one()
    assert firstTransport.value() == secondTransport.value() == b"OK\n"
    run_compaction_until(clock, syncs, lambda: durable._compaction is None)
    stop(durable, clock)
    assert recover(str(tmp_path)).data == {1: 1, 2: 2}


def test_what_was_written_before_a_failed_append_is_synced_at_stop(tmp_path, monkeypatch) -> None:
    durable, factory, clock = serve(tmp_path, "no")
    durable.journaled.put(1, 1)
    syncs = SyncCounter(monkeypatch)
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(Exception, match="read-only"):
        durable.journaled.put(2, 2)
    monkeypatch.setattr(os, "write", real_write)
    stop(durable, clock)
    assert syncs.calls == 1
    assert recover(str(tmp_path)).data == {1: 1}
