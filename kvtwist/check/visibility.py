"""
Cross-client visibility: what one client wrote, every other client reads.

Each client writes its own key; once every write has been acknowledged,
each client reads the others' keys (pipelined). Then each deletes its key
and, once all deletes are acknowledged, the others must find them gone. A
server with a store per connection, or one that acknowledges writes it
has not made, fails here in a way that is easy to read, independent of the
random workload.

With several nodes, clients are spread over them round-robin and each
reads the keys of clients on other nodes first: the write on one node must
be seen on another.
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
    connected, errors = await connectAll(target, count)
    clients = [client for _, client in connected]
    if errors:
        for client in clients:
            client.connection.abortConnection()
        return failed(GROUP, NAME, f"{len(errors)} of {count} clients could not connect", sorted(set(errors))[:SHOWN])
    problems: list[str] = []

    def others(index: int) -> list[int]:
        """The clients whose keys client ``index`` reads: those on other nodes first."""
        candidates = [(index + step) % count for step in range(1, count)]
        candidates.sort(key=lambda other: target.nodeOf(other) == target.nodeOf(index))
        return candidates[:READS_PER_CLIENT]

    def who(index: int) -> str:
        node = f" on node {target.nodeOf(index) + 1}" if len(target.nodes) > 1 else ""
        return f"client {index}{node}"

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
            problems.append(f"{who(index)}: {line!r} -> {reply!r} (the key was just deleted)")

    def reader(expected: Callable[[int], str], done: str) -> Callable[[int, KVClient], Coroutine[Any, Any, None]]:
        """Each client reads the others' keys and compares with ``expected(other)``."""

        async def read(index: int, client: KVClient) -> None:
            asked = others(index)
            replies = await gatherResults([client.request(b"get %d" % keys[other]) for other in asked])
            for other, reply in zip(asked, replies):
                if reply != expected(other):
                    problems.append(
                        f"{who(index)}: 'get {keys[other]}' -> {reply!r}, but {who(other)} had {done} "
                        f"before this was asked (expected {expected(other)!r})"
                    )

        return read

    async def delete(index: int, client: KVClient) -> None:
        reply = await client.request(b"del %d" % keys[index])
        if reply != "OK":
            problems.append(f"{who(index)}: 'del {keys[index]}' -> {reply!r} right after its own put")

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
    reads = [(index, other) for index in range(count) for other in others(index)]
    across = sum(target.nodeOf(index) != target.nodeOf(other) for index, other in reads)
    where = ""
    if len(target.nodes) > 1:
        where = (
            f", spread round-robin over {len(target.nodes)} nodes ({target.description}): {across} of the "
            f"{len(reads)} reads of each round went to another node than the write"
        )
    return passed(
        GROUP, NAME, f"{count} clients each saw the others' writes and deletes once they were acknowledged{where}",
        reads_per_round=len(reads), reads_on_another_node=across,
    )

