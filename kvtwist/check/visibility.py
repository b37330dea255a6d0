"""
Cross-client visibility: what one client wrote, every other client reads.

Each client writes its own key; once every write has been acknowledged,
each client reads the others' keys (pipelined). Then each deletes its key
and, once all deletes are acknowledged, the others must find them gone. A
server with a store per connection, or one that acknowledges writes it
has not made, fails here in a way that is easy to read, independent of the
random workload.
"""

from __future__ import annotations

from typing import Any, Callable, Coroutine

from twisted.internet.defer import TimeoutError, ensureDeferred, gatherResults

from kvtwist.client import KVClient
from kvtwist.check import workload
from kvtwist.check.concurrency import SHOWN, connectAll
from kvtwist.check.report import CheckResult, failed, passed
from kvtwist.check.target import Target

GROUP = "concurrency"
NAME = "cross-client visibility"
#: Each client reads this many other clients' keys at most, so that the
#: check stays quick with many clients.
READS_PER_CLIENT = 20


class _Phase(Exception):
    """A phase could not finish; the message says which and why."""


async def checkVisibility(target: Target) -> CheckResult:
    settings = target.settings
    count = max(2, settings.clients)
    keys = workload.keys(settings.seed, "visibility", count)
    choose = workload.rng(settings.seed, "visibility/values")
    values = [choose.randrange(1, 10**12) for _ in keys]
    clients, errors = await connectAll(target, count)
    if errors:
        for client in clients:
            client.connection.abortConnection()
        return failed(GROUP, NAME, f"{len(errors)} of {count} clients could not connect", sorted(set(errors))[:SHOWN])
    problems: list[str] = []

    def others(index: int) -> list[int]:
        return [(index + step) % count for step in range(1, min(count, READS_PER_CLIENT + 1))]

    async def phase(what: str, each: Callable[[int, KVClient], Coroutine[Any, Any, None]]) -> None:
        limit = settings.timeout * 2
        work = gatherResults([ensureDeferred(each(index, client)) for index, client in enumerate(clients)])
        try:
            await work.addTimeout(limit, target.reactor)
        except TimeoutError:
            raise _Phase(f"{what}: not every client got its replies within {limit:g} s") from None
        except Exception as e:
            raise _Phase(f"{what}: {e}") from None

    async def write(index: int, client: KVClient) -> None:
        await client.request(b"del %d" % keys[index])
        line = f"put {keys[index]} {values[index]}"
        reply = await client.request(line)
        if reply != "OK":
            problems.append(f"client {index}: {line!r} -> {reply!r} (the key was just deleted)")

    def reader(expected: Callable[[int], str], done: str) -> Callable[[int, KVClient], Coroutine[Any, Any, None]]:
        """Each client reads the others' keys and compares with ``expected(other)``."""

        async def read(index: int, client: KVClient) -> None:
            asked = others(index)
            replies = await gatherResults([client.request(b"get %d" % keys[other]) for other in asked])
            for other, reply in zip(asked, replies):
                if reply != expected(other):
                    problems.append(
                        f"client {index}: 'get {keys[other]}' -> {reply!r}, but client {other} had {done} "
                        f"before this was asked (expected {expected(other)!r})"
                    )

        return read

    async def delete(index: int, client: KVClient) -> None:
        reply = await client.request(b"del %d" % keys[index])
        if reply != "OK":
            problems.append(f"client {index}: 'del {keys[index]}' -> {reply!r} right after its own put")

    try:
        for what, each in (
            ("writing one key per client", write),
            ("reading the others' keys", reader(lambda other: str(values[other]), "stored it ('put' -> 'OK')")),
            ("deleting them", delete),
            ("reading the deleted keys", reader(lambda other: "Key not found", "deleted it ('del' -> 'OK')")),
        ):
            target.progress(f"visibility: {what}")
            await phase(what, each)
            if problems:
                break
    except _Phase as e:
        problems.insert(0, f"stalled while {e}")
    finally:
        for client in clients:
            client.connection.abortConnection()
    if problems:
        return failed(GROUP, NAME, "a client did not see another client's acknowledged write", problems[:SHOWN])
    return passed(
        GROUP, NAME, f"{count} clients each saw the others' writes and deletes once they were acknowledged"
    )

