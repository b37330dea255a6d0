"""
The durable layer: journal-first writes, fsync policies, group commit,
read-only, compaction, stop; each on both paths: the pure-Python store,
and the compiled one (a CompiledStore whose chunks run in C) where it is built.
"""

from __future__ import annotations

import errno
import os
import tempfile
from functools import partial
from typing import Iterator

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from kvtwist.server.factory import KVFactory
from kvtwist.storage.durable import DurableService, DurableStore
from kvtwist.storage.interface import Batch
from kvtwist.compiled import CompiledStore
from kvtwist.storage import journaled
from kvtwist.storage.journaled import JournaledStore
from kvtwist.storage.recovery import recover

PATHS = {"pure": False, "compiled": True}


@pytest.fixture(autouse=True, params=list(PATHS))
def storePath(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here opens its data directories on one path, then the other."""
    if PATHS[request.param] and CompiledStore is None:
        pytest.skip("no compiled path")
    global openDirectory
    openDirectory = partial(journaled.openDirectory, compiled=PATHS[request.param])
    yield request.param
    openDirectory = journaled.openDirectory


openDirectory = journaled.openDirectory


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
        try:
            result = fn()
        except Exception:
            d.errback()
        else:
            d.callback(result)


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


def serve(
    tmp_path, fsync: str, runBlocking=defer.maybeDeferred, compiled: bool | None = None, **kwargs
) -> tuple[DurableService, KVFactory, Clock]:
    """
    A started DurableService on a Clock; by default fsyncs run at once, in
    line. ``compiled`` picks the path (by default, the one this module's
    tests are running on).
    """
    clock = Clock()
    opener = openDirectory if compiled is None else partial(journaled.openDirectory, compiled=compiled)
    store = DurableStore(opener(str(tmp_path)), fsync, clock, runBlocking=runBlocking, **kwargs)
    assert compiled is None or (store.compiled is not None) == compiled
    durable = DurableService(store)
    durable.startService()
    return durable, KVFactory(store, reactor=clock), clock


def recoveredState(path) -> dict[int, int]:
    """What a restart would find in the data directory."""
    return dict(recover(str(path)).map.items())


def openJournaled(path) -> JournaledStore:
    return JournaledStore(openDirectory(str(path)))


class Recorder:
    """A connection as the store sees it (an ``IReplyTarget``): what it was sent, and whether it was dropped."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.abandoned = False

    def sendReplies(self, batch: Batch) -> None:
        self.sent.append(batch.replies)

    def abandonReplies(self) -> None:
        self.abandoned = True


def deliverAfter(store, target, replies: bytes, *changes: tuple[int, int]) -> None:
    """Put each (key, value) of ``changes`` and deliver ``replies`` as the batch that depends on them."""
    batch = Batch()
    for key, value in changes:
        store.put(key, value, batch)
    batch.replies = replies
    store.deliver(target, batch)


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
    journaled = openJournaled(tmp_path)
    assert journaled.put(1, 10, Batch()) and journaled.put(2, 20, Batch()) and journaled.delete(1, Batch())
    assert not journaled.put(2, 99, Batch()) and not journaled.delete(7, Batch())
    size = journaled.writer.size
    journaled.close()
    assert recoveredState(tmp_path) == {2: 20}
    assert size == os.path.getsize(tmp_path / "journal-00000001.kvj")


@given(st.lists(st.tuples(st.booleans(), st.integers(-5, 5), st.integers(-(2**63), 2**63 - 1)), max_size=60))
@settings(max_examples=40, deadline=None)
def test_reopening_gives_back_what_was_acknowledged(ops) -> None:
    with tempfile.TemporaryDirectory() as directory:
        journaled, model = openJournaled(directory), {}
        for isPut, key, value in ops:
            if isPut:
                assert journaled.put(key, value, Batch()) == (key not in model)
                model.setdefault(key, value)
            else:
                assert journaled.delete(key, Batch()) == (model.pop(key, None) is not None)
        journaled.close()
        reopened = openJournaled(directory)
        assert dict(reopened.items()) == model
        reopened.close()


def test_refused_changes_are_not_journaled(tmp_path) -> None:
    journaled = openJournaled(tmp_path)
    journaled.put(1, 1, Batch())
    size = journaled.writer.size
    journaled.put(1, 2, Batch())
    journaled.delete(5, Batch())
    assert journaled.writer.size == size
    journaled.close()


def test_a_second_open_of_the_same_directory_is_refused(tmp_path) -> None:
    from kvtwist.storage.datadir import DataDirLocked

    first = openJournaled(tmp_path)
    with pytest.raises(DataDirLocked, match=f"{tmp_path} is in use .*pid {os.getpid()}"):
        openJournaled(tmp_path)
    first.close()
    openJournaled(tmp_path).close()


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
    assert durable.store.readOnlyReason == reason
    stop(durable, clock)
    assert recoveredState(tmp_path) == {1: 1}


def test_read_only_is_logged_loudly(tmp_path, monkeypatch) -> None:
    from twisted.logger import LogLevel, globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        durable, factory, clock = serve(tmp_path, "no")
        monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
        with pytest.raises(Exception, match="read-only"):
            durable.store.put(1, 1, Batch())
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
    durable.store.put(7, 70, Batch())
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
    store, target = durable.store, Recorder()
    deliverAfter(store, target, b"clean")
    deliverAfter(store, target, b"first", (1, 1))
    deliverAfter(store, target, b"second")
    assert target.sent == [b"clean"]
    clock.advance(0)
    deliverAfter(store, target, b"third", (2, 2))
    clock.advance(0)
    assert target.sent == [b"clean", b"first", b"second", b"third"]
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
    late, lateTransport = connect(factory)
    late.dataReceived(b"get 1\n")
    assert lateTransport.value() == b"" and lateTransport.disconnecting, "nor is a read of the unsynced value"
    clock.advance(0)
    stop(durable, clock)
    assert durable.store.durable == 0, "no later fsync of that journal counts"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_failed_write_under_always_takes_the_turn_s_changes_back(tmp_path, monkeypatch, code) -> None:
    """Under always, a turn's records are written in one go before its fsync: a failed write takes the turn back."""
    service, factory, clock = serve(tmp_path, "always")
    protos = [connect(factory) for _ in range(2)]
    protos[0][0].dataReceived(b"put 1 1\nput 2 2\n")
    clock.advance(0)
    assert protos[0][1].value() == b"OK\nOK\n"
    store = factory.store
    journal = tmp_path / "journal-00000001.kvj"
    size = journal.stat().st_size
    protos[0][0].dataReceived(b"del 1\nput 3 3\n")
    protos[1][0].dataReceived(b"get 3\nget 2\n")
    assert sorted(store.items()) == [(2, 2), (3, 3)]
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    clock.advance(0)
    monkeypatch.undo()
    # Nothing of the turn stays applied, and nothing that depended on it was answered.
    assert sorted(store.items()) == [(1, 1), (2, 2)]
    assert journal.stat().st_size == size
    assert protos[0][1].value() == b"OK\nOK\n" and protos[1][1].value() == b""
    assert protos[0][1].disconnecting and protos[1][1].disconnecting
    assert store.readOnlyReason == f"journal write failed: {os.strerror(code)}"
    stop(service, clock)
    assert sorted(recover(str(tmp_path)).map.items()) == [(1, 1), (2, 2)]


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
    openJournaled(tmp_path).close()


# Compaction

def fill(store: DurableStore, start: int, stop: int) -> None:
    """Changes as one connection's batch would make them, delivered as the protocol does."""
    batch = Batch()
    for key in range(start, stop):
        store.put(key, key, batch)
        if key % 3 == 0:
            store.delete(key - 1, batch)
    store.deliver(Recorder(), batch)


def test_compaction_starts_by_itself_and_keeps_every_change(tmp_path) -> None:
    durable, factory, clock = serve(tmp_path, "everysec", compactMinBytes=4000)
    journaled = durable.store
    fill(journaled, 0, 150)
    assert durable.store.compactor.running, "the journal outgrew the threshold"
    while durable.store.compactor.running:
        fill(journaled, 1000 + len(journaled), 1003 + len(journaled))
        clock.advance(0)
    expected = dict(journaled.items())
    assert journaled.generation == 2
    names = sorted(os.listdir(tmp_path))
    assert names == ["LOCK", "journal-00000002.kvj", "snapshot-00000002.kvs"]
    stop(durable, clock)
    assert recoveredState(tmp_path) == expected


def test_stop_during_compaction_waits_for_its_fsync_and_leaves_no_temporary(tmp_path) -> None:
    syncs = HeldSyncs()
    durable, factory, clock = serve(tmp_path, "everysec", syncs)
    journaled = durable.store
    fill(journaled, 0, 100)
    durable.store.compactor.start()
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
    assert recoveredState(tmp_path) == expected


def test_always_fsyncs_once_per_reactor_turn_in_a_thread(tmp_path) -> None:
    """One fsync, handed to a thread at the end of a turn with writes, covers every connection's."""
    syncs = HeldSyncs()
    durable, factory, clock = serve(tmp_path, "always", syncs)
    connections = [connect(factory) for _ in range(3)]
    for i, (proto, _) in enumerate(connections):
        proto.dataReceived(b"put %d %d\n" % (i, i))
    assert all(t.value() == b"" for _, t in connections) and not syncs.held, "at the end of the turn"
    clock.advance(0)
    assert len(syncs.held) == 1, "one fsync for the turn's writes, in a thread"
    assert all(t.value() == b"" for _, t in connections)
    syncs.finish_one()
    assert all(t.value() == b"OK\n" for _, t in connections)
    first, firstTransport = connections[0]
    first.dataReceived(b"put 9 9\n")
    first.dataReceived(b"get 1\n")
    clock.advance(0)
    assert len(syncs.held) == 1 and firstTransport.value() == b"OK\n", "the read waits behind the write"
    syncs.finish_one()
    assert firstTransport.value() == b"OK\nOK\n1\n"
    assert durable.store.policy.fsyncDurations.count == 2
    stop(durable, clock)
    assert recoveredState(tmp_path) == {0: 0, 1: 1, 2: 2, 9: 9}


def test_always_serves_on_while_an_fsync_runs(tmp_path) -> None:
    """Writes made while one fsync runs wait for the next, which starts when it ends; reads of durable keys go on."""
    syncs = HeldSyncs()
    durable, factory, clock = serve(tmp_path, "always", syncs)
    first, firstTransport = connect(factory)
    second, secondTransport = connect(factory)
    reader, readerTransport = connect(factory)
    first.dataReceived(b"put 1 1\n")
    clock.advance(0)
    assert len(syncs.held) == 1, "handed to a thread"
    second.dataReceived(b"put 2 2\n")
    first.dataReceived(b"get 2\n")
    reader.dataReceived(b"get 3\n")
    assert readerTransport.value() == b"Key not found\n", "the reactor serves on"
    clock.advance(0)
    assert len(syncs.held) == 1, "one fsync at a time"
    syncs.finish_one()
    assert firstTransport.value() == b"OK\n" and secondTransport.value() == b""
    assert len(syncs.held) == 1, "the next fsync started at once"
    syncs.finish_one()
    assert firstTransport.value() == b"OK\n2\n" and secondTransport.value() == b"OK\n"
    assert not syncs.held, "nothing left to sync"
    stop(durable, clock)
    assert recoveredState(tmp_path) == {1: 1, 2: 2}


def test_after_an_fsync_that_covered_part_of_what_waits_each_connection_waits_only_for_its_own(tmp_path) -> None:
    syncs = HeldSyncs()
    durable, factory, clock = serve(tmp_path, "always", syncs)
    (covered, coveredTransport), (both, bothTransport) = connect(factory), connect(factory)
    covered.dataReceived(b"put 5 5\n")
    both.dataReceived(b"put 1 1\n")
    clock.advance(0)
    # While the fsync of those two writes runs, one connection writes again.
    both.dataReceived(b"put 2 2\n")
    syncs.finish_one()
    assert coveredTransport.value() == b"OK\n" and bothTransport.value() == b"OK\n"
    # A connection with nothing left waiting is answered at once; one whose
    # write waits for the next fsync is answered after it, in order.
    covered.dataReceived(b"get 6\n")
    both.dataReceived(b"get 6\n")
    assert coveredTransport.value() == b"OK\nKey not found\n" and bothTransport.value() == b"OK\n"
    syncs.finish_one()
    assert bothTransport.value() == b"OK\nOK\nKey not found\n"
    stop(durable, clock)


def test_always_does_not_fsync_a_turn_that_wrote_nothing(tmp_path, monkeypatch) -> None:
    durable, factory, clock = serve(tmp_path, "always")
    durable.store.put(1, 10, Batch())
    durable.store.sync()
    fsyncs = SyncCounter(monkeypatch)
    proto, transport = connect(factory)
    proto.dataReceived(b"get 1\nput 1 11\ndel 2\n")
    assert transport.value() == b"10\nKey already exists\nKey not found\n"
    assert not clock.getDelayedCalls(), "nothing scheduled"
    clock.advance(0)
    assert fsyncs.calls == 0
    stop(durable, clock)


def test_always_replies_when_a_compaction_synced_the_journal_first(tmp_path, monkeypatch) -> None:
    """The compaction's switch fsyncs a write waiting for the end of the turn: its reply leaves, without a second fsync."""
    syncs = HeldSyncs()
    durable, factory, clock = serve(tmp_path, "always", syncs)
    journaled = durable.store
    journaled.compactor.start()
    clock.advance(0)
    syncs.finish_one()  # creates journal 2
    clock.advance(0)
    assert len(syncs.held) == 1, "the compaction's fsync of journal 1 is under way"
    syncs.finish_one()
    proto, transport = connect(factory)
    proto.dataReceived(b"put 1 1\n")
    assert transport.value() == b""
    fsyncs = SyncCounter(monkeypatch)
    clock.advance(0)  # the compaction switches journals (fsyncing journal 1), then the turn ends
    assert journaled.generation == 2 and transport.value() == b"OK\n"
    assert fsyncs.calls == 1, "the switch's fsync covered the write"
    run_compaction_until(clock, syncs, lambda: not journaled.compactor.running)
    stop(durable, clock)
    assert recoveredState(tmp_path) == {1: 1}


def test_what_was_written_before_a_failed_append_is_synced_at_stop(tmp_path, monkeypatch) -> None:
    durable, factory, clock = serve(tmp_path, "no")
    durable.store.put(1, 1, Batch())
    syncs = SyncCounter(monkeypatch)
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(Exception, match="read-only"):
        durable.store.put(2, 2, Batch())
    monkeypatch.setattr(os, "write", real_write)
    stop(durable, clock)
    assert syncs.calls == 1
    assert recoveredState(tmp_path) == {1: 1}


# One owner of "the journal is broken": once an fsync of a journal failed,
# no later fsync of it counts, whoever makes it (Linux reports the error once).

class FailingSyncs(SyncCounter):
    """Makes the ``n``-th fsync from now fail with EIO, and only that one."""

    def __init__(self, monkeypatch, n: int) -> None:
        super().__init__(monkeypatch)
        self.failAt = self.calls + n
        real = getattr(os, "fdatasync", os.fsync)

        def failOnce(fd: int) -> None:
            self.calls += 1
            if self.calls == self.failAt:
                raise OSError(errno.EIO, "Input/output error")
            real(fd)

        monkeypatch.setattr(os, "fdatasync" if hasattr(os, "fdatasync") else "fsync", failOnce)


def failTheCompactionFsync(durable: DurableService, clock: Clock, syncs: HeldSyncs, monkeypatch) -> None:
    """Run a compaction whose fsync of the current journal fails, keeping the first held fsync held."""
    durable.store.compactor.start()
    clock.advance(0)
    syncs.finish_one(1)  # creates the new journal (its fsyncs succeed)
    clock.advance(0)
    FailingSyncs(monkeypatch, 1)
    syncs.finish_one(1)  # the compaction's fsync of the current journal: EIO
    clock.advance(0)
    assert not durable.store.compactor.running
    assert durable.store.readOnlyReason == "compaction failed: journal fsync failed: Input/output error"


def retryAfterAFailedCompactionFsync(tmp_path, monkeypatch, fsync: str, policyFsyncAfter: float):
    """
    A put, then the policy's fsync of it starts in a thread (after
    ``policyFsyncAfter`` seconds: ``everysec``) and is held; meanwhile the compaction's fsync of the same
    journal fails; then the policy's fsync runs, and the kernel says success.
    """
    syncs = HeldSyncs()
    durable, factory, clock = serve(tmp_path, fsync, syncs)
    proto, transport = connect(factory)
    proto.dataReceived(b"put 1 1\n")
    clock.advance(policyFsyncAfter)
    assert len(syncs.held) == 1, "the policy's fsync is under way"
    failTheCompactionFsync(durable, clock, syncs, monkeypatch)
    monkeypatch.undo()  # fsyncs succeed again from here on
    syncs.finish_one()  # the policy's fsync of the same file
    return durable, factory, clock, syncs, transport


def test_always_never_acknowledges_a_write_that_only_a_retried_fsync_covered(tmp_path, monkeypatch) -> None:
    """
    A put waits for the end of its turn while the compaction's fsync of the
    same journal fails; the turn's fsync then runs and the kernel says
    success.  That success proves nothing: the put must not get OK.
    """
    syncs = HeldSyncs()
    durable, factory, clock = serve(tmp_path, "always", syncs)
    durable.store.compactor.start()
    clock.advance(0)
    syncs.finish_one()  # creates the new journal (its fsyncs succeed)
    clock.advance(0)
    assert len(syncs.held) == 1, "the compaction's fsync of the current journal is under way"
    proto, transport = connect(factory)
    proto.dataReceived(b"put 1 1\n")
    FailingSyncs(monkeypatch, 1)
    syncs.finish_one()  # the compaction's fsync: EIO
    monkeypatch.undo()  # fsyncs succeed again from here on
    clock.advance(0)  # the turn's fsync of the same file, in a thread
    while syncs.held:
        syncs.finish_one()
    assert not durable.store.compactor.running
    assert b"OK" not in transport.value()
    assert transport.disconnected, "the connection is dropped without its reply"
    assert durable.store.durable == 0
    proto2, transport2 = connect(factory)
    proto2.dataReceived(b"put 2 2\n")
    assert transport2.value() == b"Error: store is read-only (compaction failed: journal fsync failed: Input/output error)\n"
    proto2.dataReceived(b"get 1\n")
    assert transport2.value().count(b"\n") == 1 and transport2.disconnected, "nor is a read of the unsynced value"


def test_everysec_does_not_count_a_retried_fsync_as_durable(tmp_path, monkeypatch) -> None:
    durable, factory, clock, syncs, transport = retryAfterAFailedCompactionFsync(tmp_path, monkeypatch, "everysec", 1)
    assert durable.store.durable == 0 and durable.store.unsynced
    clock.advance(1)
    assert not syncs.held, "no fsync of a broken journal is tried on the timer"


def test_close_does_not_count_a_retried_fsync_as_durable(tmp_path, monkeypatch) -> None:
    from twisted.logger import LogLevel, globalLogPublisher

    syncs = HeldSyncs()
    durable, factory, clock = serve(tmp_path, "no", syncs)
    proto, transport = connect(factory)
    proto.dataReceived(b"put 1 1\n")
    syncs.held.append((lambda: None, defer.Deferred()))  # keeps the compaction's fsyncs at index 1
    failTheCompactionFsync(durable, clock, syncs, monkeypatch)
    monkeypatch.undo()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        stop(durable, clock)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert durable.store.durable == 0
    assert any(
        e["log_level"] == LogLevel.critical and "final fsync" in e["log_format"] for e in events
    ), "the operator is told that the last writes may not be on disk"


def test_a_full_store_journals_nothing_and_says_so(tmp_path) -> None:
    clock = Clock()
    store = DurableStore(openDirectory(str(tmp_path), maxKeys=1), "everysec", clock, runBlocking=defer.maybeDeferred)
    proto, transport = connect(KVFactory(store, reactor=clock))
    proto.dataReceived(b"put 1 1\nput 2 2\nput 1 3\ndel 1\nput 2 2\n")
    assert transport.value() == b"OK\nError: store is full\nKey already exists\nOK\nOK\n"
    store.close()
    assert recoveredState(tmp_path) == {2: 2}
    reopened = openDirectory(str(tmp_path), maxKeys=1)
    assert reopened.memory.full, "the limit holds after a restart"
    reopened.lock.release()
