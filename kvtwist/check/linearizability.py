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

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from kvtwist.check import model
from kvtwist.check.history import Operation, Outcome, byKey


def isLinearizable(operations: Sequence[Operation], initial: model.State = model.UNKNOWN) -> bool:
    """Whether ``operations`` (all on one key) can be linearized from ``initial``."""
    return _search([(op.call, op.ret, op.verb, op.value, op.outcome) for op in operations], initial)


def _search(ops: list[tuple[float, float, str, int | None, object]], state: model.State) -> bool:
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

    step = model.step
    seen: set[tuple[int, model.State]] = set()
    stack: list[tuple[int, model.State]] = []
    linearized = 0
    node = nxt[head]
    while nxt[head] != -1:
        if node < count:
            _, _, verb, value, outcome = ops[node]
            after = step(state, verb, value, outcome)
            if after is not None:
                candidate = linearized | (1 << node)
                if (candidate, after) not in seen:
                    seen.add((candidate, after))
                    stack.append((node, state))
                    state = after
                    linearized = candidate
                    lift(node)
                    node = nxt[head]
                    continue
            node = nxt[node]
        else:
            # A return whose operation is not linearized yet: every order
            # from here on violates real time. Undo the last choice.
            if not stack:
                return False
            node, state = stack.pop()
            linearized &= ~(1 << node)
            unlift(node)
            node = nxt[node]
    return True


@dataclass
class KeyVerdict:
    """The result for one key; ``witness`` is empty when the key passed."""

    key: int
    operations: int
    linearizable: bool
    witness: tuple[Operation, ...] = ()
    #: Whether the witness was shrunk all the way (no operation in it can be
    #: dropped); False when the time budget ran out first.
    minimal: bool = True
    #: Operations on the key that overlap the witness in time; their replies
    #: were not needed to show the violation.
    context: tuple[Operation, ...] = field(default=())


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
        elif witnesses > 0:
            witnesses -= 1
            witness, minimal = minimalWitness(ops, deadline, clock)
            verdicts.append(
                KeyVerdict(key, len(ops), False, tuple(witness), minimal, _context(ops, witness))
            )
        else:
            verdicts.append(KeyVerdict(key, len(ops), False, minimal=False))
    return verdicts


def weakened(operations: Sequence[Operation], keep: set[int]) -> list[Operation]:
    """
    The history with only the replies of ``keep`` (indices) still checked.

    Every other operation either goes (if its reply says it changed nothing,
    e.g. a get, or a put answered ``Key already exists``) or stays with its
    reply forgotten, so it may have had its effect or not. Both steps can
    only make a history easier to linearize: if the result is still not
    linearizable, neither was the original, and the kept replies alone are
    what cannot be explained.
    """
    result = []
    for index, op in enumerate(operations):
        if index in keep:
            result.append(op)
        elif model.hasEffect(op.verb, op.outcome):
            result.append(replace(op, reply=None))
    return result


def minimalWitness(
    operations: Sequence[Operation],
    deadline: float = float("inf"),
    clock: Callable[[], float] = time.monotonic,
) -> tuple[list[Operation], bool]:
    """
    A smallest set of replies in a non-linearizable key history that cannot all be right.

    Keeping fewer replies (see ``weakened``) can only help linearizability,
    so "still not linearizable" is monotone in the kept set and the set can
    be shrunk greedily: try to forget chunks of replies, halving the chunk
    size down to single operations (the delta-debugging schedule). The
    result is 1-minimal: forgetting any one of its replies makes the
    history explainable. Returns the witness and whether it is minimal; if
    ``deadline`` passes first, the smallest failing set found so far.
    """
    keep = [index for index, op in enumerate(operations) if op.outcome is not Outcome.UNKNOWN]

    def fails(kept: list[int]) -> bool:
        return not isLinearizable(weakened(operations, set(kept)))

    chunk = max(1, len(keep) // 2)
    while True:
        start = 0
        while start < len(keep):
            if clock() > deadline:
                return [operations[index] for index in keep], False
            candidate = keep[:start] + keep[start + chunk :]
            if fails(candidate):
                keep = candidate
            else:
                start += chunk
        if chunk == 1:
            return [operations[index] for index in keep], True
        chunk = max(1, chunk // 2)


def _context(operations: Sequence[Operation], witness: Sequence[Operation]) -> tuple[Operation, ...]:
    if not witness:
        return ()
    start = min(op.call for op in witness)
    end = max(op.ret for op in witness)
    chosen = set(map(id, witness))
    return tuple(
        op
        for op in operations
        if id(op) not in chosen and op.call <= end and op.ret >= start and model.hasEffect(op.verb, op.outcome)
    )
