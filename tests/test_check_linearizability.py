"""
The linearizability checker: hand-made histories, and agreement with brute force.

The reference used here is deliberately naive and independent of
``kvtwist.check.model``: it tries every order of the operations that
respects real time, from every initial state that could matter, running a
plain dict-like register.
"""

from __future__ import annotations

import itertools
import math

from hypothesis import given, settings, strategies as st

from kvtwist.check.history import DEL, GET, PUT, Operation, byKey
import pytest

from kvtwist.check.linearizability import Undecided, _subHistory, checkHistory, isLinearizable, minimalWitness

KEY = 7
ABSENT = object()


def op(verb: str, call: float, ret: float, reply: str | None, value: int | None = None, client: int = 0) -> Operation:
    return Operation(client, verb, KEY, value, call, ret, reply)


def put(value: int, call: float, ret: float, reply: str | None = "OK", client: int = 0) -> Operation:
    return op(PUT, call, ret, reply, value, client)


def get(call: float, ret: float, reply: str | None, client: int = 0) -> Operation:
    return op(GET, call, ret, reply, client=client)


def delete(call: float, ret: float, reply: str | None = "OK", client: int = 0) -> Operation:
    return op(DEL, call, ret, reply, client=client)


# Reference implementation


def _apply(state: object, operation: Operation, runs: bool) -> tuple[bool, object]:
    """(reply allowed, next state) for a concrete register; ``runs=False`` means not executed."""
    if operation.reply is None or operation.reply not in _allowed(operation):
        # No usable reply: executed or not, any outcome.
        if not runs:
            return True, state
        if operation.verb == PUT:
            return True, operation.value if state is ABSENT else state
        if operation.verb == DEL:
            return True, ABSENT
        return True, state
    if operation.verb == PUT:
        if state is ABSENT:
            return operation.reply == "OK", operation.value
        return operation.reply == "Key already exists", state
    if operation.verb == DEL:
        if state is ABSENT:
            return operation.reply == "Key not found", state
        return operation.reply == "OK", ABSENT
    expected = "Key not found" if state is ABSENT else str(state)
    return operation.reply == expected, state


def _allowed(operation: Operation) -> set[str]:
    if operation.verb == PUT:
        return {"OK", "Key already exists"}
    if operation.verb == DEL:
        return {"OK", "Key not found"}
    return {"Key not found"} | ({operation.reply} if operation.reply and operation.reply.lstrip("-").isdigit() else set())


def bruteForce(operations: list[Operation]) -> bool:
    """Is there a real-time respecting order, and an initial state, that explains every reply?"""
    values = {o.value for o in operations if o.value is not None}
    values |= {int(o.reply) for o in operations if o.verb == GET and o.reply and o.reply.lstrip("-").isdigit()}
    initials = [ABSENT, *values, -12345]
    unknown = [i for i, o in enumerate(operations) if o.reply is None or o.reply not in _allowed(o)]
    for order in itertools.permutations(range(len(operations))):
        position = {index: place for place, index in enumerate(order)}
        if any(
            operations[a].ret < operations[b].call and position[a] > position[b]
            for a in range(len(operations))
            for b in range(len(operations))
        ):
            continue
        for runs in itertools.product([True, False], repeat=len(unknown)):
            running = dict(zip(unknown, runs))
            for initial in initials:
                state = initial
                for index in order:
                    ok, state = _apply(state, operations[index], running.get(index, True))
                    if not ok:
                        break
                else:
                    return True
    return False


# Hand-made histories


def test_emptyHistory() -> None:
    assert isLinearizable([])


def test_sequentialSampleSession() -> None:
    history = [
        put(2, 0, 1),
        put(3, 2, 3, "Key already exists"),
        get(4, 5, "2"),
        delete(6, 7),
        get(8, 9, "Key not found"),
        delete(10, 11, "Key not found"),
    ]
    assert isLinearizable(history)


def test_overwritingPutIsCaught() -> None:
    """Two puts that both succeed, one after the other, with no delete between."""
    assert not isLinearizable([put(1, 0, 1), put(2, 2, 3)])


def test_concurrentPutsBothSucceedingIsCaught() -> None:
    """Overlapping does not help: whichever went second should have found the key."""
    assert not isLinearizable([put(1, 0, 3), put(2, 1, 4)])


def test_concurrentDeleteExplainsTwoPuts() -> None:
    assert isLinearizable([put(1, 0, 3), delete(1, 5), put(2, 2, 6)])


def test_lostWriteIsCaught() -> None:
    assert not isLinearizable([put(1, 0, 1), get(2, 3, "Key not found")])


def test_staleReadIsCaught() -> None:
    """A read that returns a value already deleted before it started."""
    assert not isLinearizable([put(1, 0, 1), delete(2, 3), get(4, 5, "1")])


def test_readConcurrentWithWriteMaySeeEither() -> None:
    assert isLinearizable([put(1, 0, 10), get(1, 2, "Key not found"), get(3, 4, "1")])


def test_readsMayNotGoBackInTime() -> None:
    """Once a read saw the new value, a later read must not see the old state."""
    assert not isLinearizable([put(1, 0, 10), get(1, 2, "1"), get(3, 4, "Key not found")])


def test_valueNobodyWroteIsCaughtOnlyIfTheStartIsKnownToBeAbsent() -> None:
    # The store's content before the run is unknown: a read of an unseen
    # value alone is fine, but not after the key was seen absent.
    assert isLinearizable([get(0, 1, "5")])
    assert not isLinearizable([get(0, 1, "Key not found"), get(2, 3, "5")])


def test_requestWithoutReplyMayHaveRunOrNot() -> None:
    absent = get(-2, -1, "Key not found")
    lost = put(1, 0, math.inf, None)
    assert isLinearizable([absent, lost, get(1, 2, "Key not found")])
    assert isLinearizable([absent, lost, get(1, 2, "1")])
    assert not isLinearizable([absent, lost, get(1, 2, "2")])


def test_garbledReplyIsNotTakenAtItsWord() -> None:
    """A reply the protocol does not allow tells nothing; the delete may or may not have run."""
    garbled = delete(0, 1, "Error: something")
    assert isLinearizable([put(1, -2, -1), garbled, get(2, 3, "1")])
    assert isLinearizable([put(1, -2, -1), garbled, get(2, 3, "Key not found")])


def test_searchGivesUpAfterItsBudget() -> None:
    """A search that would take too long says so instead of running on."""
    concurrent = [put(value, 0, 10) for value in range(5)] + [delete(0, 10) for _ in range(4)]
    assert isLinearizable(concurrent)
    with pytest.raises(Undecided):
        isLinearizable(concurrent + [get(20, 21, "7")], budget=5)
    verdicts = checkHistory(concurrent + [get(20, 21, "7")], budget=5)
    assert [(v.linearizable, v.decided) for v in verdicts] == [(False, False)]


def test_checkHistoryPartitionsByKey() -> None:
    """Two keys that are each fine stay fine together; a broken one is named."""
    good = [put(1, 0, 1), get(2, 3, "1")]
    bad = [Operation(0, PUT, 8, 1, 0, 1, "OK"), Operation(1, PUT, 8, 2, 2, 3, "OK")]
    verdicts = checkHistory(good + bad)
    assert [(v.key, v.linearizable) for v in verdicts] == [(KEY, True), (8, False)]
    assert set(verdicts[1].witness) == set(bad)


def test_witnessLeavesOutWhatDoesNotMatter() -> None:
    """Around one overwriting put, the many correct operations are not part of the witness."""
    history = []
    time = 0.0
    for value in range(30):
        history += [put(value, time, time + 1), get(time + 2, time + 3, str(value)), delete(time + 4, time + 5)]
        time += 6
    broken = [put(100, time, time + 1), put(101, time + 2, time + 3)]
    tail = [get(time + 4 + i, time + 4.5 + i, "101") for i in range(10)]
    found = minimalWitness(history + broken + tail)
    assert found.minimal
    assert set(found.replies) == set(broken)
    assert found.others == ()


def test_witnessNamesTheWritesThatCouldHaveIntervened() -> None:
    """A del overlapping the read is part of the claim: even it cannot explain the read."""
    history = [put(1, 0, 1), delete(2, 6), get(3, 4, "Key not found"), get(5, 7, "1")]
    assert not isLinearizable(history)
    found = minimalWitness(history)
    assert not isLinearizable(_subHistory(history, *found.window, keep=_indices(history, found.replies)))
    assert delete(2, 6) in found.others or delete(2, 6) in found.replies


def _indices(history: list[Operation], chosen: tuple[Operation, ...]) -> set[int]:
    return {index for index, operation in enumerate(history) if any(operation is c for c in chosen)}


# Agreement with brute force on small random histories

_replies = {
    PUT: st.sampled_from(["OK", "OK", "Key already exists", None]),
    DEL: st.sampled_from(["OK", "Key not found", None]),
    GET: st.sampled_from(["Key not found", "1", "2", "3", None]),
}


@st.composite
def histories(draw: st.DrawFn, size: int = 6) -> list[Operation]:
    count = draw(st.integers(1, size))
    operations = []
    for client in range(count):
        verb = draw(st.sampled_from([PUT, GET, DEL]))
        call = draw(st.integers(0, 12))
        length = draw(st.integers(0, 6))
        reply = draw(_replies[verb])
        ret = math.inf if reply is None and draw(st.booleans()) else call + length
        value = draw(st.integers(1, 3)) if verb == PUT else None
        operations.append(Operation(client, verb, KEY, value, float(call), float(ret), reply))
    return operations


@settings(max_examples=400, deadline=None)
@given(histories())
def test_agreesWithBruteForce(history: list[Operation]) -> None:
    assert isLinearizable(history) == bruteForce(history)


@settings(max_examples=150, deadline=None)
@given(histories(size=6))
def test_witnessIsAProofAndCannotBeShrunk(history: list[Operation]) -> None:
    if bruteForce(history):
        return
    found = minimalWitness(history)
    start, end = found.window
    keep = _indices(history, found.replies)
    # The claim holds (checked by brute force, not by the search itself)...
    assert not bruteForce(_subHistory(history, start, end, keep))
    # ...and forgetting any one of its replies breaks it.
    for index in keep:
        assert bruteForce(_subHistory(history, start, end, keep - {index}))


def test_byKeySortsEachKeyByCallTime() -> None:
    a = Operation(0, GET, 1, None, 5, 6, "Key not found")
    b = Operation(1, GET, 1, None, 1, 2, "Key not found")
    c = Operation(2, GET, 2, None, 3, 4, "Key not found")
    assert byKey([a, b, c]) == {1: [b, a], 2: [c]}
