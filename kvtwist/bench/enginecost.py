"""
What a remote engine's chunk costs the node in-process, piece by piece:
``python -m kvtwist.bench.enginecost``.

For a chunk of 16 requests (80% gets, the rest puts, random keys), the
time of each step a node over Redis takes, on the Python path and on the
compiled one (kvtwist.compiled), and of the Deferred links that carry the
answers back: the figures docs/scaling.md quotes. No sockets and no Redis:
what is left of a request's cost beyond these is the system calls.
"""

from __future__ import annotations

import argparse
import random
import statistics
import timeit
from typing import Callable

from twisted.internet.defer import Deferred

from kvtwist.compiled import remotePath, respPath, unavailable
from kvtwist.engines.redis import CommandEncoder, outcomeOf
from kvtwist.storage.interface import GET, PUT, EngineStats, Operation

PREFIX = b"kvtwist:"


def chunk(size: int, seed: int) -> list[Operation]:
    rng = random.Random(seed)
    return [
        Operation(GET, rng.randrange(100_000)) if rng.random() < 0.8 else Operation(PUT, rng.randrange(100_000), rng.randrange(10**6))
        for _ in range(size)
    ]


def _links(count: int) -> Callable[[], None]:
    """A Deferred fired through ``count`` callback/errback links, as the engine path chains them."""

    def step(result: object, *args: object) -> object:
        return result

    def fire() -> None:
        d: Deferred[object] = Deferred()
        for _ in range(count - 1):
            d.addCallback(step, 1, 2, 3)
        d.addCallbacks(step, step, callbackArgs=(1, 2, 3))
        d.callback(1)

    return fire


def costs(size: int = 16, seed: int = 1) -> dict[str, Callable[[], object]]:
    """Each measured step, by name."""
    operations = chunk(size, seed)
    encoder = CommandEncoder(PREFIX)
    replies: list[object] = [b"%d" % op.key if op.command == GET else b"OK" for op in operations]
    stats = EngineStats()
    lines = b"".join(b"get %d\n" % op.key if op.command == GET else b"put %d %d\n" % (op.key, op.value) for op in operations)
    steps: dict[str, Callable[[], object]] = {
        "encode, Python": lambda: b"".join(encoder.encode(operations)),
        "decode, Python": lambda: [outcomeOf(op, reply, stats) for op, reply in zip(operations, replies)],
        "Deferred, 3 links": _links(3),
        "Deferred, 1 link": _links(1),
    }
    if respPath is not None and remotePath is not None:
        resp, remote = respPath, remotePath
        steps["encode, compiled"] = lambda: resp.encodeCommands(operations, PREFIX)
        steps["decode, compiled"] = lambda: resp.decodeOutcomes(operations, replies)
        steps["parse a chunk, compiled"] = lambda: remote.parseChunk(lines, 4096)
    return steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvtwist.bench.enginecost", description=__doc__.split("\n")[1])
    parser.add_argument("--size", type=int, default=16, help="requests per chunk")
    parser.add_argument("--number", type=int, default=20_000, help="chunks per timing")
    parser.add_argument("--repeat", type=int, default=7, help="timings; the median is printed")
    args = parser.parse_args(argv)
    if respPath is None:
        print(f"no compiled path ({unavailable}): the Python steps only")
    for name, step in costs(args.size).items():
        seconds = statistics.median(timeit.repeat(step, number=args.number, repeat=args.repeat)) / args.number
        print(f"{name:>24}: {seconds * 1e6:6.2f} us per chunk of {args.size}")


if __name__ == "__main__":
    main()
