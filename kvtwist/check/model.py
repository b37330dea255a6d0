"""
The sequential specification of one key: a register that may be absent.

``put`` succeeds only when the key is absent, ``del`` only when it is
present, ``get`` reads. The checker does not know what the server held
before the run, nor what an operation without a usable reply did, so the
state it tracks is the *set* of register states still possible. For this
model that set always has one of four shapes, which keeps the model
deterministic and cheap to memoize:

- an ``int``: present with exactly that value,
- ``ABSENT``: the key is absent,
- ``PRESENT``: present with a value not known,
- ``UNKNOWN``: anything (absent, or present with any value).
"""

from __future__ import annotations

from kvtwist.check.history import DEL, GET, PUT, Outcome


class Abstract:
    """
    A register state that is not a single known value.

    Plain singletons rather than an Enum: states are hashed into the
    search's memo table millions of times, and object identity hashing is
    several times faster than ``Enum.__hash__``.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


ABSENT = Abstract("absent")
PRESENT = Abstract("present")
UNKNOWN = Abstract("unknown")

State = int | Abstract

#: Returned by ``step`` when the operation cannot happen in that state.
IMPOSSIBLE = None


def _mayBeAbsent(state: State) -> bool:
    return state is ABSENT or state is UNKNOWN


def step(state: State, verb: str, value: int | None, outcome: Outcome | int) -> State | None:
    """
    The state after applying one operation with the reply it got, or IMPOSSIBLE.

    An ``Outcome.UNKNOWN`` reply constrains nothing: this gives the state
    if the operation ran (a put fills an absent key, a del empties it); it
    may also not have run at all, which the search tries separately (see
    ``isOptional``).
    """
    if verb == PUT:
        if outcome is Outcome.OK:
            return value if _mayBeAbsent(state) else IMPOSSIBLE
        if outcome is Outcome.EXISTS:
            if state is ABSENT:
                return IMPOSSIBLE
            return PRESENT if state is UNKNOWN else state
        if state is ABSENT:
            return value
        return PRESENT if state is UNKNOWN else state
    if verb == GET:
        if outcome is Outcome.NOT_FOUND:
            return ABSENT if _mayBeAbsent(state) else IMPOSSIBLE
        if outcome is Outcome.UNKNOWN:
            return state
        # Otherwise a get's outcome is the value read (see ``decodeReply``).
        if isinstance(outcome, int) and (state == outcome or state is PRESENT or state is UNKNOWN):
            return outcome
        return IMPOSSIBLE
    if verb == DEL:
        if outcome is Outcome.OK:
            return IMPOSSIBLE if state is ABSENT else ABSENT
        if outcome is Outcome.NOT_FOUND:
            return ABSENT if _mayBeAbsent(state) else IMPOSSIBLE
        return ABSENT
    raise ValueError(f"unknown verb {verb!r}")


def isOptional(verb: str, outcome: Outcome | int) -> bool:
    """
    Whether the operation may have left the state alone although ``step`` changes it.

    A request without a usable reply may never have been executed (the
    connection broke first, or the server answered nonsense).
    """
    return outcome is Outcome.UNKNOWN and verb != GET


def hasEffect(verb: str, outcome: Outcome | int) -> bool:
    """
    Whether the operation can change the state.

    Operations without effect can be left out of a sub-history without
    making an explainable history unexplainable; the minimizer relies on it.
    """
    if verb == GET:
        return False
    return outcome is Outcome.OK or outcome is Outcome.UNKNOWN
