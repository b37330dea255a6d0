"""
The floor under kvtwist's speed: its connection handling with no requests to run.

``FloorProtocol`` is ``KVProtocol`` with the work taken out: it answers
every request line with ``OK`` without parsing it or touching a store, and
sends the answers the way kvtwist does. What it costs per request is what
Twisted's event loop and a socket read and write cost on this interpreter,
so no kvtwist, however fast its own code, can serve more than it does. The
harness measures it in the same rounds as kvtwist and Redis, which turns
"this target is out of reach" into a figure (docs/performance.md).

``DurableFloorProtocol`` is the floor of ``--fsync always``: the same,
plus what the durable store cannot do without. A chunk with a ``put`` or
``del`` in it adds one 21-byte record per such line to the journal, and
its replies wait for the group fsync that ends the reactor turn, which
writes the turn's records in one ``write`` (as kvtwist does) and fsyncs
them: in the reactor, as Redis's does, or, with
``--fsync-in-thread``, in Twisted's thread pool while the reactor goes
on, as kvtwist's does (the harness runs it so); chunks of
reads leave at once. It checks nothing and tracks no key, so it is faster
than any journaled store built on this loop could be.

Both run on the reactor kvtwist runs on (``kvtwist.server.reactor``), so
that the floor and kvtwist pay the same event loop; ``--stock-reactor``
runs them on Twisted's own epoll reactor, to measure what that costs.

Run on its own: ``python -m kvtwist.bench.floor [ENDPOINT] [--journal PATH
[--fsync-in-thread]] [--stock-reactor]``; it prints the port it listens on.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, endpoints, task, threads

# All the floor takes from kvtwist: its listening defaults, a connection's
# set-up, which reads only the attributes of FloorFactory below, and its
# reply paths: the in-memory fast path's send straight to the socket
# (kvtwist.server.directsend), and with a journal, the durable store's
# (IReplyTarget.sendReplies); not KVFactory (only the base class that
# every supported Twisted accepts), nor a store.
from kvtwist.server.arguments import withServerDefaults
from kvtwist.server.directsend import sendNow
from kvtwist.server.factory import FactoryBase
from kvtwist.server.protocol import DEFAULT_MAX_REQUEST, KVProtocol
from kvtwist.server.reactorchoice import installUnlessChosen
from kvtwist.server.stats import ServerStats
from kvtwist.storage.interface import Batch

if TYPE_CHECKING:
    from kvtwist.storage.fsync import RunBlocking

DEFAULT_ENDPOINT = "tcp:0:interface=127.0.0.1"
OK = b"OK\n"
# The size of one journal record (kvtwist.storage.journal).
RECORD = b"\0" * 21


class FloorProtocol(KVProtocol):
    """kvtwist's connection and reply path, doing nothing per request."""

    def dataReceived(self, data: bytes) -> None:
        count = data.count(b"\n")
        if count:
            # Written as kvtwist's in-memory fast path writes an untimed
            # chunk's replies (KVProtocol.dataReceived).
            replies = OK * count
            self.factory.stats.bytesOut += len(replies)
            replies = sendNow(self.transport, replies)
            if replies:
                self._stream.write(replies)


class FloorFactory(FactoryBase):
    """What ``KVProtocol`` reads from its factory when a connection opens and closes, and no more."""

    protocol = FloorProtocol
    idleTimeout = 0.0
    password = None
    logConnections = False
    # No latency measured: the floor measures nothing but the read and the write.
    timing = False
    maxRequest = DEFAULT_MAX_REQUEST
    # No store: a FloorProtocol runs no request.
    store = None
    remote = None
    runner = None

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.connections = 0
        self.stats = ServerStats()


class DurableFloorProtocol(FloorProtocol):
    """The floor with a journal: writes are appended, and their replies wait for the turn's fsync."""

    def dataReceived(self, data: bytes) -> None:
        count = data.count(b"\n")
        if not count:
            return
        writes = data.count(b"put") + data.count(b"del")
        if writes:
            factory: DurableFloorFactory = self.factory  # type: ignore[assignment]
            factory.journal(self, Batch(OK * count), writes)
        else:
            self.sendReplies(Batch(OK * count))


class DurableFloorFactory(FloorFactory):
    """The floor's factory, with the journal file and the group fsync that all connections share."""

    protocol = DurableFloorProtocol

    def __init__(
        self, reactor: Any, journalPath: str, inThread: bool = False, runBlocking: RunBlocking | None = None
    ) -> None:
        """``runBlocking`` runs the fsync in a thread when ``inThread`` (Twisted's thread pool by default)."""
        super().__init__(reactor)
        self._fd = os.open(journalPath, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._inThread = inThread
        self._runBlocking: RunBlocking = runBlocking or threads.deferToThread
        # Replies whose records no fsync has yet been started for.
        self._held: list[tuple[FloorProtocol, Batch]] = []
        # Records not yet written: the next fsync writes them first.
        self._records = 0
        self._scheduled = False
        self._syncing = False

    def journal(self, protocol: FloorProtocol, batch: Batch, records: int) -> None:
        """Add ``records`` records; ``batch`` leaves after the next fsync that starts."""
        self._records += records
        self._held.append((protocol, batch))
        if not self._scheduled and not self._syncing:
            self._scheduled = True
            self.reactor.callLater(0, self._commit)

    def _commit(self) -> None:
        self._scheduled = False
        covered, self._held = self._held, []
        os.write(self._fd, RECORD * self._records)
        self._records = 0
        if not self._inThread:
            os.fdatasync(self._fd)
            self._release(covered)
            return
        self._syncing = True
        fd = self._fd
        self._runBlocking(lambda: os.fdatasync(fd)).addCallback(lambda _: self._synced(covered))

    def _synced(self, covered: list[tuple[FloorProtocol, Batch]]) -> None:
        self._syncing = False
        self._release(covered)
        # Writes made during the fsync wait for the next one.
        if self._held:
            self._commit()

    @staticmethod
    def _release(covered: list[tuple[FloorProtocol, Batch]]) -> None:
        for protocol, batch in covered:
            protocol.sendReplies(batch)


@defer.inlineCallbacks
def serve(
    reactor: Any, description: str = DEFAULT_ENDPOINT, journalPath: str | None = None, inThread: bool = False
) -> Any:
    factory = FloorFactory(reactor) if journalPath is None else DurableFloorFactory(reactor, journalPath, inThread)
    # Listening as kvtwist does (its listen backlog): with Twisted's 50, the
    # floor turned thousands of new connections away and kvtwist did not.
    port = yield endpoints.serverFromString(reactor, withServerDefaults(description)).listen(factory)
    print(f"floor listening on port {port.getHost().port}", flush=True)
    # Serve until the process is stopped.
    yield defer.Deferred()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kvtwist.bench.floor", description="The floor under kvtwist's speed.")
    parser.add_argument("endpoint", nargs="?", default=DEFAULT_ENDPOINT, help="where to listen (a server endpoint)")
    parser.add_argument("--journal", metavar="PATH", help="the floor of --fsync always: journal writes to PATH")
    parser.add_argument("--fsync-in-thread", action="store_true", help="with --journal, fsync in a thread")
    parser.add_argument("--stock-reactor", action="store_true", help="run on Twisted's epoll reactor, not kvtwist's")
    options = parser.parse_args()
    if options.fsync_in_thread and options.journal is None:
        parser.error("--fsync-in-thread needs --journal")
    if not options.stock_reactor:
        installUnlessChosen()
    task.react(serve, (options.endpoint, options.journal, options.fsync_in_thread))


if __name__ == "__main__":
    main()
