"""
Concurrency and atomicity: many clients, one shared keyspace, a recorded history.

``--clients`` connections (spread over the nodes round-robin) each send the seeded random mix of put, get and
del (see ``workload``) on ``--keys`` shared keys for ``--duration``
seconds, one request at a time, recording when each request was sent and
when its reply came. The history is then checked twice:

- every request got a reply the protocol allows for it;
- the history is linearizable per key (``linearizability``): the server
  behaved as one atomic store that every client shares. With several
  nodes the whole history is checked as one: the nodes together must
  behave as one atomic store.

Which replies are allowed, and which say what happened, is decided in one
place, ``history.Reply``; both checks count the *indeterminate* operations
(an ``Error: `` reply or none: taken effect or not, nobody knows).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, cast

from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from kvtwist.client import KVClient
from kvtwist.check import linearizability, workload
from kvtwist.check.history import DEL, Operation, Reply
from kvtwist.check.workload import Request
from kvtwist.check.report import CheckResult, failed, passed
from kvtwist.check.target import Target

GROUP = "concurrency"
#: At most this many offending operations are printed per failure.
SHOWN = 10


async def connectAll(target: Target, count: int) -> tuple[list[tuple[int, KVClient]], list[str]]:
    """
    ``count`` connections opened at once, connection ``i`` to node
    ``target.nodeOf(i)``; the (node, client) pairs of those that connected,
    and the errors of those that failed.
    """
    nodes = [target.nodeOf(index) for index in range(count)]
    outcomes = await DeferredList([target.client(node) for node in nodes], consumeErrors=True)
    clients = [(node, value) for node, (ok, value) in zip(nodes, outcomes) if ok]
    # DeferredList's type claims every value is a result; with consumeErrors
    # a failed connection's value is its Failure.
    errors = [
        f"{target.nodes[node].address}: {cast(Failure, value).getErrorMessage()}"
        for node, (ok, value) in zip(nodes, outcomes)
        if not ok
    ]
    return clients, errors


def indeterminate(operations: list[Operation]) -> dict[str, int]:
    """The counts of operations whose effect is unknown, for a check's stats and summary."""
    errors = sum(op.kind is Reply.ERROR for op in operations)
    missing = sum(op.kind is Reply.MISSING for op in operations)
    return {"indeterminate": errors + missing, "error_replies": errors, "missing_replies": missing}


def _indeterminateText(counts: dict[str, int]) -> str:
    if not counts["indeterminate"]:
        return "none indeterminate"
    parts = [f"{counts['error_replies']} 'Error: ' replies"] if counts["error_replies"] else []
    if counts["missing_replies"]:
        parts.append(f"{counts['missing_replies']} without a reply")
    return f"{counts['indeterminate']} indeterminate ({', '.join(parts)}: may or may not have taken effect)"


async def recordHistory(target: Target) -> tuple[list[Operation], list[str]]:
    """Run the workload; the history, and errors from connecting."""
    settings = target.settings
    clock = target.clock
    keys = workload.keys(settings.seed, "shared", settings.keys)
    connected, errors = await connectAll(target, settings.clients)
    clients = [client for _, client in connected]
    several = len(target.nodes) > 1

    def nodeShown(node: int) -> int | None:
        return node if several else None

    operations: list[Operation] = []
    start = clock()
    if clients:
        # Empty the keys first, and record it: a known starting state spares
        # the checker from guessing what earlier runs left behind, which is
        # by far its most expensive kind of search.
        deletes = [Request(DEL, key) for key in keys]
        calls = [clock() - start for _ in deletes]
        replies = await DeferredList(
            [
                clients[0].request(request.line).addTimeout(settings.timeout, target.reactor)
                for request in deletes
            ],
            consumeErrors=True,
        )
        ret = clock() - start
        for request, call, (ok, text) in zip(deletes, calls, replies):
            operations.append(
                Operation(
                    0, DEL, request.key, None, call, ret if ok else math.inf, text if ok else None,
                    nodeShown(connected[0][0]),
                )
            )
    end = clock() + settings.duration

    async def run(index: int, node: int, client: KVClient) -> None:
        for request in workload.clientRequests(settings.seed, index, keys):
            if clock() >= end:
                break
            call = clock()
            try:
                text: str | None = await client.request(request.line)
            except Exception:
                text = None
            ret = clock() if text is not None else math.inf
            operations.append(
                Operation(
                    index, request.verb, request.key, request.value, call - start, ret - start, text, nodeShown(node)
                )
            )
            if text is None:
                return
        try:
            await client.bye()
        except Exception:
            client.connection.abortConnection()

    def report() -> None:
        target.progress(
            f"concurrency: {clock() - start:5.1f} s of {settings.duration:g}, "
            f"{len(clients)} clients, {len(operations)} operations"
        )

    ticker = LoopingCall(report)
    ticker.clock = target.reactor
    ticker.start(1.0, now=False)

    def giveUp() -> None:
        # A server that stopped answering would keep us here forever.
        for client in clients:
            if not client.closed:
                client.connection.abortConnection()

    deadline = target.reactor.callLater(settings.duration + 2 * settings.timeout, giveUp)
    try:
        await DeferredList(
            [ensureDeferred(run(index, node, client)) for index, (node, client) in enumerate(connected)]
        )
    finally:
        ticker.stop()
        if deadline.active():
            deadline.cancel()
        giveUp()
    report()
    return operations, errors


def checkReplies(operations: list[Operation], clients: int, errors: list[str]) -> CheckResult:
    """
    Every client connected, and every request got a reply the protocol allows for it.

    An ``Error: `` reply is allowed (a server whose store is unreachable must
    say so, and cannot always know whether the write went through); it is
    counted as indeterminate, not failed.
    """
    name = "replies"
    counts = indeterminate(operations)
    if errors:
        return failed(
            GROUP, name, f"{len(errors)} of {clients} clients could not connect", sorted(set(errors))[:SHOWN], **counts
        )
    missing = [op for op in operations if op.kind is Reply.MISSING]
    wrong = [op for op in operations if op.kind is Reply.FOREIGN]
    if wrong:
        return failed(
            GROUP, name,
            f"{len(wrong)} replies the protocol does not allow for their request (neither a reply to it nor an "
            "'Error: ' line)",
            [op.describe() for op in wrong[:SHOWN]], **counts,
        )
    if missing:
        return failed(
            GROUP, name, f"{len(missing)} requests never got a reply (the connection stalled or was lost)",
            [op.describe() for op in missing[:SHOWN]], **counts,
        )
    latencies = sorted(op.ret - op.call for op in operations)
    stats: dict[str, Any] = {}
    if latencies:
        stats = {
            "operations": len(operations),
            "median_latency_ms": round(statistics.median(latencies) * 1000, 3),
            "p99_latency_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 3),
        }
    return passed(
        GROUP, name,
        f"all {len(operations)} requests of {clients} clients got replies the protocol allows; "
        f"{_indeterminateText(counts)}",
        **stats, **counts,
    )


def checkLinearizable(target: Target, operations: list[Operation]) -> CheckResult:
    """
    Whether the history is linearizable, or why it cannot be checked.

    Replies outside the protocol (another protocol's, garbage) would count as
    "effect unknown" in the search, and a history of nothing but unknowns is
    trivially linearizable: such a history is reported as not checked, never
    as a pass.
    """
    name = "linearizability"
    keys = len({op.key for op in operations})
    counts = indeterminate(operations)
    foreign = [op for op in operations if op.foreign]
    if foreign:
        return failed(
            GROUP, name,
            f"not checked: {len(foreign)} of {len(operations)} replies are neither a reply the protocol allows "
            "for their request nor an 'Error: ' line, so the history cannot show what the server stored",
            [op.describe() for op in foreign[:SHOWN]],
            operations=len(operations), keys=keys, **counts,
        )
    if operations and all(op.kind is not Reply.DEFINITE for op in operations):
        return failed(
            GROUP, name,
            f"not checked: none of the {len(operations)} requests got a reply that says what the server stored "
            "(every one got no reply or an 'Error: ' line)",
            [op.describe() for op in operations[:SHOWN]],
            operations=len(operations), keys=keys, **counts,
        )
    target.progress(f"concurrency: checking linearizability of {len(operations)} operations on {keys} keys")
    started = target.clock()
    verdicts = linearizability.checkHistory(operations)
    stats: dict[str, Any] = {
        "operations": len(operations), "keys": keys, "check_seconds": round(target.clock() - started, 3), **counts
    }
    spread = _spread(target)
    bad = [verdict for verdict in verdicts if not verdict.linearizable and verdict.decided]
    undecided = [verdict for verdict in verdicts if not verdict.decided]
    if not operations:
        return failed(GROUP, name, "no operation completed, so there is nothing to check", **stats)
    if undecided and not bad:
        return failed(
            GROUP, name,
            f"could not decide for {len(undecided)} of {len(verdicts)} keys within the search budget; "
            "try more --keys or fewer --clients",
            [f"key {verdict.key}: undecided ({verdict.operations} operations)" for verdict in undecided],
            **stats,
        )
    if not bad:
        return passed(
            GROUP, name,
            f"the {len(operations)} operations on {keys} keys are linearizable: one atomic store shared by "
            f"all clients{spread}; {_indeterminateText(counts)}",
            **stats,
        )
    evidence = []
    for verdict in sorted(bad, key=lambda verdict: len(verdict.witness) + len(verdict.others)):
        if verdict.witness:
            evidence += explainWitness(verdict)
    evidence += [
        f"key {verdict.key}: also not linearizable ({verdict.operations} operations)"
        for verdict in bad
        if not verdict.witness
    ]
    evidence += [f"key {verdict.key}: undecided ({verdict.operations} operations)" for verdict in undecided]
    return failed(
        GROUP, name, f"{len(bad)} of {len(verdicts)} keys have a history that is not linearizable{spread}",
        evidence, **stats,
    )


def _spread(target: Target) -> str:
    """How the clients were spread, for a summary; nothing with one node."""
    nodes = target.nodes
    if len(nodes) == 1:
        return ""
    return f", with clients spread round-robin over {len(nodes)} nodes ({target.description})"


def explainWitness(verdict: linearizability.KeyVerdict) -> list[str]:
    """The report lines for one failing key: the replies that cannot all be right, and why."""
    start, end = verdict.window
    shrunk = "" if verdict.minimal else " (not fully shrunk in the time allowed)"
    lines = [
        f"key {verdict.key} ({verdict.operations} operations): these replies cannot all be right{shrunk}:",
        f"  whatever the key held at {start:.6f} s, no order of the operations between {start:.6f} s and "
        f"{end:.6f} s that respects their times gives all of them:",
    ]
    lines += _listed(verdict.witness)
    if verdict.others:
        lines.append("  not even if any of these writes in that window (replies ignored) took effect or not:")
        lines += _listed(verdict.others)
    return lines


def _listed(operations: tuple[Operation, ...], limit: int = 4 * SHOWN) -> list[str]:
    lines = [f"    {op.describe()}" for op in operations[:limit]]
    if len(operations) > limit:
        lines.append(f"    ... and {len(operations) - limit} more")
    return lines


async def checkConcurrency(target: Target) -> list[CheckResult]:
    settings = target.settings
    target.progress(
        f"concurrency: {settings.clients} clients on {settings.keys} shared keys for {settings.duration:g} s"
        f"{_spread(target)}"
    )
    operations, errors = await recordHistory(target)
    replies = target.finished(checkReplies(operations, settings.clients, errors))
    return [replies, target.finished(checkLinearizable(target, operations))]
