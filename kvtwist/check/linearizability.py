"""
Is a history linearizable? The Wing–Gong search with memoization.

Each operation took effect at one instant between its call and its return:
the history is linearizable when some order of all operations that respects
real time (an operation that returned before another was called comes
first) and the model in ``kvtwist.check.model`` gives every operation the
reply it got.

The search is the one of Wing and Gong (1993) with the memoization added by
Lowe (2017), as used by Knossos and Porcupine: walk a linked list of call and
return events; try to linearize each operation that has been called; back
track when a return event is reached whose operation is not linearized yet.
A cache of (set of linearized operations, model state) pairs prunes every
configuration already explored, which turns the exponential search into one
that handles thousands of operations per key in practice.

Keys are checked one by one (see ``history.byKey``). When a key fails, a
minimal set of replies that cannot all be right is searched for; see
``minimalWitness``.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from kvtwist.check import model
from kvtwist.check.history import Operation, Outcome, byKey


def isLinearizable(operations: Sequence[Operation], initial: model.State = model.UNKNOWN) -> bool:
    """Whether ``operations`` (all on one key) can be linearized from ``initial``."""
    return _search(
        [(op.call, op.ret, op.verb, op.value, op.outcome, model.isOptional(op.verb, op.outcome)) for op in operations],
        initial,
    )


def _search(ops: list[tuple[float, float, str, int | None, object, bool]], state: model.State) -> bool:
    count = len(ops)
    if count == 0:
        return True
    # Events: call of operation i is node i, its return is node count + i.
    # At equal times calls sort first, so touching intervals count as
    # concurrent; that only ever allows more orders, never fewer.
    events = sorted(range(2 * count), key=lambda node: (ops[node % count][node // count], node // count))
    head = 2 * count
    nxt = [0] * (2 * count + 1)
    prv = [0] * (2 * count + 1)
    previous = head
    for node in events:
        nxt[previous] = node
        prv[node] = previous
        previous = node
    nxt[previous] = -1

    def lift(call: int) -> None:
        ret = call + count
        nxt[prv[call]] = nxt[call]
        if nxt[call] != -1:
            prv[nxt[call]] = prv[call]
        nxt[prv[ret]] = nxt[ret]
        if nxt[ret] != -1:
            prv[nxt[ret]] = prv[ret]

    def unlift(call: int) -> None:
        ret = call + count
        nxt[prv[ret]] = ret
        if nxt[ret] != -1:
            prv[nxt[ret]] = ret
        nxt[prv[call]] = call
        if nxt[call] != -1:
            prv[nxt[call]] = call

    # The memo is keyed on the set of linearized operations. Instead of a
    # bitset of thousands of bits (slow to hash), the set is represented by
    # the XOR of a random 128-bit tag per operation (Zobrist hashing): two
    # different sets share a value with probability 2**-128, far below any
    # chance that matters, and each step costs one XOR.
    tags = [random.getrandbits(128) for _ in range(count)]
    step = model.step
    seen: set[tuple[int, model.State]] = set()
    stack: list[tuple[int, model.State]] = []
    linearized = 0
    node = nxt[head]
    while nxt[head] != -1:
        if node < count:
            _, _, verb, value, outcome, optional = ops[node]
            candidate = linearized ^ tags[node]
            after = step(state, verb, value, outcome)
            # An operation whose reply is unknown may also have done nothing.
            if after is None or (candidate, after) in seen:
                after = state if optional and (candidate, state) not in seen else None
            if after is not None:
                seen.add((candidate, after))
                stack.append((node, state))
                state = after
                linearized = candidate
                lift(node)
                node = nxt[head]
            else:
                node = nxt[node]
        else:
            # A return whose operation is not linearized yet: every order
            # from here on violates real time. Undo the last choice, and
            # look at that operation again: it may have another way to go.
            if not stack:
                return False
            node, state = stack.pop()
            linearized ^= tags[node]
            unlift(node)
    return True


@dataclass
class KeyVerdict:
    """The result for one key; ``witness`` is empty when the key passed."""

    key: int
    operations: int
    linearizable: bool
    witness: tuple[Operation, ...] = ()
    #: Whether the witness was shrunk all the way (no reply in it can be
    #: dropped); False when the time budget ran out first.
    minimal: bool = True
    #: The writes in the witness's time window whose replies were ignored:
    #: each may have taken effect or not, and still no order explains the
    #: witness.
    others: tuple[Operation, ...] = field(default=())
    #: The time window the witness was found in.
    window: tuple[float, float] = (0.0, 0.0)


def checkHistory(
    operations: Sequence[Operation],
    witnesses: int = 3,
    minimizeSeconds: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
) -> list[KeyVerdict]:
    """
    Check every key of a history; shrink a witness for the first failing keys.

    Only the first ``witnesses`` failing keys get a witness: one shows the
    bug, more only make the report longer. ``minimizeSeconds`` bounds the
    time spent shrinking; a witness not shrunk in time is still correct,
    only larger.
    """
    verdicts = []
    deadline = clock() + minimizeSeconds
    for key, ops in sorted(byKey(operations).items()):
        if isLinearizable(ops):
            verdicts.append(KeyVerdict(key, len(ops), True))
        elif witnesses > 0 and clock() < deadline:
            witnesses -= 1
            found = minimalWitness(ops, deadline, clock)
            verdicts.append(
                KeyVerdict(key, len(ops), False, found.replies, found.minimal, found.others, found.window)
            )
        else:
            verdicts.append(KeyVerdict(key, len(ops), False, minimal=False))
    return verdicts


@dataclass(frozen=True)
class Witness:
    """
    Replies that cannot all be right, and the window of time they were found in.

    The claim a witness makes, and that ``explains`` tests, is: whatever the
    key held at ``window[0]``, and whichever of ``others`` (the writes in
    the window whose replies are ignored) took effect, no order of the
    operations in the window that respects real time gives every operation
    in ``replies`` the reply it got. Operations that finished before the
    window, or started after it, cannot change that (see ``_subHistory``),
    so the witness proves the whole history is not linearizable.
    """

    replies: tuple[Operation, ...]
    others: tuple[Operation, ...]
    window: tuple[float, float]
    minimal: bool


def _subHistory(
    operations: Sequence[Operation], start: float, end: float, keep: set[int] | None = None
) -> list[Operation]:
    """
    The history of the window [start, end], with the replies of ``keep`` (indices) checked.

    ``keep=None`` keeps every reply that may be kept: those of operations
    entirely inside the window. Operations that returned before ``start``
    are dropped: every kept operation started after they ended, and the
    initial state is left unknown, so they cannot matter. Operations that
    started after ``end`` are dropped too: every kept operation had ended
    before they started, so they come after all of them in any order.
    Within the window, an operation whose reply is not kept goes if its
    reply says it changed nothing (a get, a put answered ``Key already
    exists``), and otherwise stays with its reply forgotten, free to have
    had its effect or not. None of this can make an explainable history
    unexplainable, which is what makes a failing sub-history a proof.
    """
    result = []
    for index, op in enumerate(operations):
        if op.ret < start or op.call > end:
            continue
        inside = start <= op.call and op.ret <= end
        if inside and (keep is None or index in keep):
            result.append(op)
        elif model.hasEffect(op.verb, op.outcome):
            result.append(replace(op, reply=None))
    return result


def _fails(operations: Sequence[Operation], start: float, end: float, keep: set[int] | None = None) -> bool:
    return not isLinearizable(_subHistory(operations, start, end, keep))


def _narrowest(points: list[float], fails: Callable[[float], bool], outOfTime: Callable[[], bool]) -> float:
    """
    The first of the sorted ``points`` where the monotone ``fails`` holds.

    The last point must be one where it holds; that is the answer when
    ``outOfTime`` says to stop searching.
    """
    low, high = 0, len(points) - 1
    while low < high and not outOfTime():
        middle = (low + high) // 2
        if fails(points[middle]):
            high = middle
        else:
            low = middle + 1
    return points[low]


def minimalWitness(
    operations: Sequence[Operation],
    deadline: float = float("inf"),
    clock: Callable[[], float] = time.monotonic,
) -> Witness:
    """
    A small, readable proof that a key's history is not linearizable.

    Three steps, each keeping the sub-history unexplainable (widening the
    window or keeping more replies can only make that easier, so each
    search is over a monotone property):

    1. the earliest end of the window: binary search over return times;
    2. the latest start: binary search over call times;
    3. the fewest replies in that window: try to forget chunks of them,
       halving the chunk size down to single operations (the
       delta-debugging schedule). The result is 1-minimal: forgetting any
       one of its replies makes the window explainable.

    When ``deadline`` passes, each step stops with the narrowest window or
    smallest set found so far, and the witness is marked as not minimal.
    The history must not be linearizable.
    """
    def outOfTime() -> bool:
        return clock() > deadline

    ends = sorted({op.ret for op in operations if not math.isinf(op.ret)} | {math.inf})
    end = _narrowest(ends, lambda end: _fails(operations, -math.inf, end), outOfTime)
    starts = sorted({op.call for op in operations if op.call <= end} | {-math.inf}, reverse=True)
    start = _narrowest(starts, lambda start: _fails(operations, start, end), outOfTime)

    keep = [
        index
        for index, op in enumerate(operations)
        if start <= op.call and op.ret <= end and op.outcome is not Outcome.UNKNOWN
    ]
    minimal = _shrink(keep, lambda kept: _fails(operations, start, end, set(kept)), outOfTime)
    kept = set(keep)
    window = _subHistory(operations, start, end, kept)
    replies = tuple(op for op in window if op.reply is not None)
    others = tuple(op for op in window if op.reply is None)
    return Witness(replies, _originals(operations, others), (start, end), minimal)


def _shrink(keep: list[int], fails: Callable[[list[int]], bool], outOfTime: Callable[[], bool]) -> bool:
    """Remove from ``keep`` (in place) what ``fails`` does not need; whether it got to the end."""
    chunk = max(1, len(keep) // 2)
    while True:
        start = 0
        while start < len(keep):
            if outOfTime():
                return False
            candidate = keep[:start] + keep[start + chunk :]
            if fails(candidate):
                keep[:] = candidate
            else:
                start += chunk
        if chunk == 1:
            return True
        chunk = max(1, chunk // 2)


def _originals(operations: Sequence[Operation], forgotten: Sequence[Operation]) -> tuple[Operation, ...]:
    """The operations as recorded, replies included, for those whose replies were forgotten."""
    wanted = {(op.client, op.call) for op in forgotten}
    return tuple(op for op in operations if (op.client, op.call) in wanted)
