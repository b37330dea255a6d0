"""
Is a history linearizable? The Wing–Gong search with memoization.

Each operation took effect at one instant between its call and its return:
the history is linearizable when some order of all operations that respects
real time (an operation that returned before another was called comes
first) and the model in ``kvtwist.check.model`` gives every operation the
reply it got.

The search is the one of Wing and Gong (1993) with the memoization added by
Lowe (2017), as used by Knossos and Porcupine: keep a linked list of call and
return events; at each step linearize one operation that has been called
before the first pending return; back track when no operation can go. A
cache of (set of linearized operations, model state) pairs prunes every
configuration already explored. Two pruning rules for this model (see
``_Search``) keep it fast with thousands of operations per key and dozens
of them concurrent.

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
from kvtwist.check.history import DEL, GET, PUT, Operation, Outcome, byKey


#: How many steps one search may take, on top of ``STEPS_PER_OPERATION``
#: per operation, before it gives up (a million steps is about fifteen
#: seconds): a bound, so that a pathological history makes the checker say
#: "undecided" rather than run for hours. A correct history takes little
#: more than one step per operation.
BUDGET = 1_000_000
STEPS_PER_OPERATION = 50


class Undecided(Exception):
    """The search needed more than its budget of configurations."""


def isLinearizable(
    operations: Sequence[Operation], initial: model.State = model.UNKNOWN, budget: int | None = None
) -> bool:
    """
    Whether ``operations`` (all on one key) can be linearized from ``initial``.

    Raises ``Undecided`` if the search takes more than ``budget`` steps
    first (by default ``BUDGET`` plus ``STEPS_PER_OPERATION`` per operation).
    """
    if budget is None:
        budget = BUDGET + STEPS_PER_OPERATION * len(operations)
    return _Search(operations).run(initial, budget)


class _Search:
    """
    One Wing–Gong search over one key's history.

    Two rules, both specific to this model and both proven safe in
    docs/checker.md, keep the search from exploding when dozens of clients
    hit the same key:

    - *Reads go first.* An operation that changes nothing (a get, a put
      answered ``Key already exists``, a del answered ``Key not found``)
      whose reply matches the current state is linearized at once, without
      a choice point: any order that places it later can place it now.
    - *Earliest deadline first.* Among operations with the same effect and
      the same requirement (say, several deletes answered ``OK``), only the
      one that returned first needs trying: any order that starts with
      another can swap the two.
    """

    def __init__(self, operations: Sequence[Operation]) -> None:
        self.count = count = len(operations)
        self.calls = [op.call for op in operations]
        self.rets = [op.ret for op in operations]
        self.steps = [(op.verb, op.value, op.outcome) for op in operations]
        self.optional = [model.isOptional(op.verb, op.outcome) for op in operations]
        self.free = [not model.hasEffect(op.verb, op.outcome) for op in operations]
        read = {op.outcome for op in operations if op.verb == GET and isinstance(op.outcome, int)}
        self.kinds: list[object] = []
        for index, op in enumerate(operations):
            if self.optional[index]:
                self.kinds.append(index)
            elif op.verb == PUT and op.outcome is Outcome.OK:
                # Puts of values nobody read are interchangeable.
                self.kinds.append((PUT, op.value if op.value in read else None))
            else:
                self.kinds.append((op.verb, op.outcome))
        # What state a blocked operation waits for: a value, absent, or any value.
        self.needs = [_needs(op.verb, op.outcome) for op in operations]
        # The memo is keyed on the set of linearized operations. Instead of
        # a bitset of thousands of bits (slow to hash), the set is the XOR
        # of a random 128-bit tag per operation (Zobrist hashing): two sets
        # share a value with probability 2**-128, and each step is one XOR.
        self.tags = [random.getrandbits(128) for _ in range(count)]
        # Events: the call of operation i is node i, its return node
        # count + i. At equal times calls sort first, so touching intervals
        # count as concurrent; that only ever allows more orders.
        times = (self.calls, self.rets)
        events = sorted(range(2 * count), key=lambda node: (times[node // count][node % count], node // count))
        self.head = head = 2 * count
        self.nxt = nxt = [-1] * (2 * count + 1)
        self.prv = prv = [0] * (2 * count + 1)
        previous = head
        for node in events:
            nxt[previous] = node
            prv[node] = previous
            previous = node

    def _urgency(self, choice: tuple[int, model.State], waiting: dict[object, float]) -> tuple[float, float]:
        node, after = choice
        helps = waiting.get(after, math.inf)
        if after is not model.ABSENT:
            helps = min(helps, waiting.get(model.PRESENT, math.inf))
        return min(helps, self.rets[node]), self.rets[node]

    def _lift(self, call: int) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise Undecided("the search ran out of steps")
        nxt, prv = self.nxt, self.prv
        for node in (call, call + self.count):
            nxt[prv[node]] = nxt[node]
            if nxt[node] != -1:
                prv[nxt[node]] = prv[node]

    def _unlift(self, call: int) -> None:
        nxt, prv = self.nxt, self.prv
        for node in (call + self.count, call):
            nxt[prv[node]] = node
            if nxt[node] != -1:
                prv[nxt[node]] = node

    def run(self, state: model.State, budget: int) -> bool:
        self.budget = budget
        count, nxt, head, tags, step = self.count, self.nxt, self.head, self.tags, model.step
        seen: set[tuple[int, model.State]] = set()
        # (operation, state before it, the choices it was one of or None
        # if it was forced, the index of the next choice to try)
        trail: list[tuple[int, model.State, list[tuple[int, model.State]] | None, int]] = []
        linearized = 0
        while True:
            # Forced steps: matching reads, as long as there are any. Only
            # the operations called before the first pending return may go.
            node = nxt[head]
            while 0 <= node < count:
                if self.free[node]:
                    after = step(state, *self.steps[node])
                    if after is not None and after == state:
                        self._lift(node)
                        linearized ^= tags[node]
                        trail.append((node, state, None, 0))
                        node = nxt[head]
                        continue
                node = nxt[node]
            if nxt[head] == -1:
                return True
            # Choice point: the earliest deadline of each kind of step.
            best: dict[object, tuple[int, model.State]] = {}
            # The most urgent operation waiting for each state, to try
            # first the step that lets it go.
            waiting: dict[object, float] = {}
            node = nxt[head]
            while 0 <= node < count:
                after = step(state, *self.steps[node])
                if after is not None:
                    kind = self.kinds[node]
                    other = best.get(kind)
                    if other is None or self.rets[node] < self.rets[other[0]]:
                        best[kind] = (node, after)
                else:
                    needs = self.needs[node]
                    if self.rets[node] < waiting.get(needs, math.inf):
                        waiting[needs] = self.rets[node]
                if self.optional[node]:
                    # A request without a usable reply may have done nothing.
                    best[("skipped", node)] = (node, state)
                node = nxt[node]
            choices = sorted(best.values(), key=lambda choice: self._urgency(choice, waiting))
            index = 0
            while True:
                # Take the next choice not explored before, or back track.
                while index < len(choices):
                    node, after = choices[index]
                    index += 1
                    if (linearized ^ tags[node], after) not in seen:
                        seen.add((linearized ^ tags[node], after))
                        trail.append((node, state, choices, index))
                        self._lift(node)
                        linearized ^= tags[node]
                        state = after
                        break
                else:
                    if not trail:
                        return False
                    node, state, previous, index = trail.pop()
                    self._unlift(node)
                    linearized ^= tags[node]
                    if previous is not None:
                        choices = previous
                    else:
                        choices, index = [], 0
                    continue
                break


def _needs(verb: str, outcome: object) -> object:
    if verb == GET and isinstance(outcome, int):
        return outcome
    if outcome is Outcome.EXISTS or (verb == DEL and outcome is Outcome.OK):
        return model.PRESENT
    return model.ABSENT


@dataclass
class KeyVerdict:
    """The result for one key; ``witness`` is empty when the key passed."""

    key: int
    operations: int
    linearizable: bool
    #: False when the search gave up (see ``BUDGET``): then ``linearizable``
    #: is False too, but nothing was proven.
    decided: bool = True
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
    budget: int | None = None,
) -> list[KeyVerdict]:
    """
    Check every key of a history; find short witnesses for failing keys.

    Witnesses are searched for up to twice ``witnesses`` failing keys, and
    the ``witnesses`` shortest are kept: one shows the bug, more only make
    the report longer. ``minimizeSeconds`` bounds the time spent shrinking;
    a witness not shrunk in time is still correct, only larger. A key whose
    search exceeds ``budget`` (see ``isLinearizable``) is marked undecided.
    """
    verdicts = []
    deadline = clock() + minimizeSeconds
    tries = 2 * witnesses
    for key, ops in sorted(byKey(operations).items()):
        try:
            linearizable = isLinearizable(ops, budget=budget)
        except Undecided:
            verdicts.append(KeyVerdict(key, len(ops), False, decided=False, minimal=False))
            continue
        if linearizable:
            verdicts.append(KeyVerdict(key, len(ops), True))
        elif tries > 0 and clock() < deadline:
            tries -= 1
            found = minimalWitness(ops, deadline, clock)
            verdicts.append(
                KeyVerdict(
                    key, len(ops), False,
                    witness=found.replies, minimal=found.minimal, others=found.others, window=found.window,
                )
            )
        else:
            verdicts.append(KeyVerdict(key, len(ops), False, minimal=False))
    withWitness = sorted(
        (verdict for verdict in verdicts if verdict.witness),
        key=lambda verdict: (len(verdict.witness) + len(verdict.others), verdict.key),
    )
    for verdict in withWitness[witnesses:]:
        verdict.witness, verdict.others, verdict.minimal = (), (), False
    return verdicts


@dataclass(frozen=True)
class Witness:
    """
    Replies that cannot all be right, and the window of time they were found in.

    The claim a witness makes is: whatever the
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
    """Whether the sub-history is proven not linearizable (undecided counts as no)."""
    try:
        return not isLinearizable(_subHistory(operations, start, end, keep))
    except Undecided:
        return False


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
