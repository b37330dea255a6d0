"""
What kvtwist's own work costs per request, over the floor's:
``python -m kvtwist.bench.requestcost``.

A connection is fed one request per chunk, as a client without pipelining
sends them (80% gets, 10% puts, 10% dels, random keys among 100,000 stored
ones), and the time of its ``dataReceived`` is taken per request: for the
floor server's protocol (kvtwist.bench.floor: every line answered ``OK``,
nothing parsed), for kvtwist in memory on the compiled path where it is
built, and on the pure-Python path (the only one on PyPy). The transport
takes the replies and drops them, so no system call is timed: what each
figure adds to the floor's is what kvtwist's parsing, store and replies
cost a request on this interpreter, the rest of a request's cost being the
reactor's and the kernel's (docs/performance.md).

With ``--fsync-always`` the servers are the ones of ``--data --fsync
always``: the floor with a journal, and kvtwist over a data directory. Then
50 connections get one request each per reactor turn, and each turn ends
as the reactor's does, with its zero-delay calls, which start the group
fsync. The fsync itself is left out (it is the disk's time, and both
servers spend it in a thread): it succeeds at once, so what is timed is
the journal's writes, the dependency tracking, the holding and releasing
of replies, and the fsync's hand-off in the reactor thread.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import timeit
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from kvtwist.bench.floor import DurableFloorFactory, FloorFactory
from kvtwist.compiled import CompiledStore
from kvtwist.server.factory import KVFactory
from kvtwist.storage.durable import DurableStore
from kvtwist.storage.interface import Batch
from kvtwist.storage.journaled import openDirectory
from kvtwist.storage.memory import MemoryStore

if TYPE_CHECKING:
    from kvtwist.compiled._chunk import CompiledStore as _CompiledStore

KEYS = 100_000
# Connections served per reactor turn with --fsync-always: the harness's load.
CONNECTIONS = 50


class DroppingTransport(StringTransport):
    """A transport that takes every reply and keeps none, so that a long run holds no memory."""

    def write(self, data: bytes) -> None:
        pass


def requests(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        key, draw = rng.randrange(KEYS), rng.random()
        if draw < 0.8:
            out.append(b"get %d\n" % key)
        elif draw < 0.9:
            out.append(b"put %d %d\n" % (key, rng.randrange(10**6)))
        else:
            out.append(b"del %d\n" % key)
    return out


def _filled(store: MemoryStore | _CompiledStore) -> MemoryStore | _CompiledStore:
    for key in range(KEYS):
        store.put(key, key, Batch())
    return store


def servers(transport: Callable[[], StringTransport] = DroppingTransport) -> dict[str, Callable[[bytes], None]]:
    """Each measured server's ``dataReceived``, by name, on a connection of its own over ``transport()``."""
    factories: dict[str, FloorFactory | KVFactory] = {"floor": FloorFactory(Clock())}
    if CompiledStore is not None:
        factories["kvtwist, compiled"] = KVFactory(_filled(CompiledStore()), reactor=Clock())
    factories["kvtwist, pure Python"] = KVFactory(_filled(MemoryStore()), reactor=Clock())
    received: dict[str, Callable[[bytes], None]] = {}
    for name, factory in factories.items():
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        protocol.makeConnection(transport())
        received[name] = protocol.dataReceived
    return received


def _fsyncDone(fsync: Callable[[], object]) -> "defer.Deferred[Any]":
    """The fsync hand-off without the fsync: the disk's time is not kvtwist's work."""
    return defer.succeed(None)


class Turns:
    """``CONNECTIONS`` connections to one server, fed one request each per reactor turn."""

    def __init__(
        self,
        factory: FloorFactory | KVFactory,
        clock: Clock,
        transport: Callable[[], StringTransport],
        close: Callable[[], None] = lambda: None,
    ) -> None:
        self.clock = clock
        # Releases what the server holds (a store's journal and lock).
        self.close = close
        self.received: list[Callable[[bytes], None]] = []
        for _ in range(CONNECTIONS):
            protocol = factory.buildProtocol(None)
            assert protocol is not None
            protocol.makeConnection(transport())
            self.received.append(protocol.dataReceived)

    def __call__(self, stream: list[bytes]) -> None:
        """Feed ``stream`` in turns, each ended as the reactor ends one (its zero-delay calls)."""
        received, advance = self.received, self.clock.advance
        for start in range(0, len(stream), CONNECTIONS):
            for dataReceived, line in zip(received, stream[start : start + CONNECTIONS]):
                dataReceived(line)
            advance(0)


def durableServers(directory: str, transport: Callable[[], StringTransport] = DroppingTransport) -> dict[str, Turns]:
    """
    The servers of ``--fsync always``, by name, their data in ``directory``:
    the floor with a journal, and kvtwist on each path it has here.
    """
    clock = Clock()
    turns = {"floor": Turns(DurableFloorFactory(clock, os.path.join(directory, "floor"), True, _fsyncDone), clock, transport)}
    paths = {"kvtwist, compiled": True} if CompiledStore is not None else {}
    paths["kvtwist, pure Python"] = False
    for name, compiled in paths.items():
        clock = Clock()
        opened = openDirectory(os.path.join(directory, "compiled" if compiled else "pure"), compiled=compiled)
        store = DurableStore(opened, "always", clock, runBlocking=_fsyncDone)
        for key in range(KEYS):
            store.put(key, key, Batch())
        store.sync()
        turns[name] = Turns(KVFactory(store, reactor=clock), clock, transport, store.close)
    return turns


def _oneByOne(dataReceived: Callable[[bytes], None]) -> Callable[[list[bytes]], None]:
    """Feed a stream to one connection, one request per read."""

    def feed(lines: list[bytes]) -> None:
        for line in lines:
            dataReceived(line)

    return feed


def _time(feed: dict[str, Callable[[list[bytes]], None]], stream: list[bytes], repeat: int) -> None:
    """Time each server on ``stream``, interleaved, and print the medians against the floor's."""
    timings: dict[str, list[float]] = {}
    # Interleaved, so that the machine's moods fall on every server alike;
    # the first timing of each warms it up (PyPy's JIT) and is dropped.
    for _ in range(repeat + 1):
        for name, run in feed.items():
            seconds = timeit.timeit(lambda: run(stream), number=1)
            timings.setdefault(name, []).append(seconds / len(stream))
    floor = statistics.median(timings["floor"][1:])
    for name, taken in timings.items():
        cost = statistics.median(taken[1:])
        extra = "" if name == "floor" else f" ({(cost - floor) * 1e6:+.2f} over the floor)"
        print(f"{name:>22}: {cost * 1e6:6.3f} us per request{extra}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvtwist.bench.requestcost", description=__doc__.split("\n")[1])
    parser.add_argument("--requests", type=int, default=200_000, help="requests per timing")
    parser.add_argument("--repeat", type=int, default=7, help="timings of each server, interleaved; the median is printed")
    parser.add_argument("--fsync-always", action="store_true",
                        help="the servers of --data --fsync always, 50 connections a turn (the fsync left out)")
    args = parser.parse_args(argv)
    stream = requests(args.requests, seed=1)
    if not args.fsync_always:
        _time({name: _oneByOne(dataReceived) for name, dataReceived in servers().items()}, stream, args.repeat)
        return
    with tempfile.TemporaryDirectory(prefix="kvtwist-requestcost-") as directory:
        turns = durableServers(directory)
        try:
            _time(dict(turns), stream, args.repeat)
        finally:
            for served in turns.values():
                served.close()


if __name__ == "__main__":
    main()
