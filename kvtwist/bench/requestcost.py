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
"""

from __future__ import annotations

import argparse
import random
import statistics
import timeit
from typing import TYPE_CHECKING, Callable

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from kvtwist.bench.floor import FloorFactory
from kvtwist.compiled import CompiledStore
from kvtwist.server.factory import KVFactory
from kvtwist.storage.interface import Batch
from kvtwist.storage.memory import MemoryStore

if TYPE_CHECKING:
    from kvtwist.compiled._chunk import CompiledStore as _CompiledStore

KEYS = 100_000


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvtwist.bench.requestcost", description=__doc__.split("\n")[1])
    parser.add_argument("--requests", type=int, default=200_000, help="requests per timing")
    parser.add_argument("--repeat", type=int, default=7, help="timings of each server, interleaved; the median is printed")
    args = parser.parse_args(argv)
    stream = requests(args.requests, seed=1)
    timings: dict[str, list[float]] = {}
    received = servers()
    # Interleaved, so that the machine's moods fall on every server alike;
    # the first timing of each warms it up (PyPy's JIT) and is dropped.
    for _ in range(args.repeat + 1):
        for name, dataReceived in received.items():
            seconds = timeit.timeit(lambda: [dataReceived(line) for line in stream], number=1)
            timings.setdefault(name, []).append(seconds / len(stream))
    floor = statistics.median(timings["floor"][1:])
    for name, taken in timings.items():
        cost = statistics.median(taken[1:])
        extra = "" if name == "floor" else f" ({(cost - floor) * 1e6:+.2f} over the floor)"
        print(f"{name:>22}: {cost * 1e6:6.3f} us per request{extra}")


if __name__ == "__main__":
    main()
