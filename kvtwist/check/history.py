"""
What happened during a run: every operation with its start, end and reply.

The concurrency checks record one ``Operation`` per request. The
linearizability checker only needs the ``verb``, ``key``, ``value``, the
time interval and the ``outcome``; the raw ``reply`` is kept so a failure
can be shown exactly as the server sent it.
"""

from __future__ import annotations

import enum
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from kvtwist.client import valueOf

PUT = "put"
GET = "get"
DEL = "del"


class Outcome(enum.Enum):
    """What a reply means for the store, independent of its exact text."""

    OK = "OK"
    EXISTS = "Key already exists"
    NOT_FOUND = "Key not found"
    #: No reply arrived, or one that does not say what happened (see
    #: ``Reply``): the operation may or may not have taken effect.
    UNKNOWN = "unknown"


class Reply(enum.Enum):
    """
    What kind of reply a request got: the one rule, used by every check of
    the recorded history, for which replies are allowed and which of them
    say what happened.
    """

    #: A reply the protocol allows for this request, telling what it did.
    DEFINITE = "definite"
    #: An ``Error: `` line. Allowed to any request (a server may be
    #: overloaded, or its store unreachable), but the request may or may
    #: not have taken effect: *indeterminate*, as Jepsen calls it. A get or
    #: del answered so is just as unknown.
    ERROR = "error"
    #: No reply came (the connection was lost, or the server stalled): also
    #: of unknown effect, but a server must answer every request.
    MISSING = "missing"
    #: Neither a reply the protocol allows for this request nor an
    #: ``Error: `` line: garbage, or another protocol's reply. It says
    #: nothing about what the server stored, and is never allowed.
    FOREIGN = "foreign"


@dataclass(frozen=True)
class Operation:
    """
    One request and its reply, as one client saw it.

    ``call`` is when the request was handed to the connection and ``ret``
    when its reply arrived (``math.inf`` when none did), both in seconds on
    one monotonic clock. The server must have executed the request at some
    instant between the two.
    """

    client: int
    verb: str
    key: int
    value: int | None
    call: float
    ret: float
    reply: str | None
    #: Which node (an index into the run's nodes) the client talked to, when
    #: the run has several; ``None`` with one node, so reports stay as they were.
    node: int | None = None

    @property
    def request(self) -> str:
        """The request line as sent, without its line ending."""
        if self.verb == PUT:
            return f"put {self.key} {self.value}"
        return f"{self.verb} {self.key}"

    @property
    def outcome(self) -> Outcome | int:
        """
        The reply decoded: an ``Outcome``, or for a successful get, the value.

        A reply that does not say what happened (none, an ``Error:`` line,
        or one the protocol does not allow here, such as ``Key already
        exists`` to a get) decodes as ``Outcome.UNKNOWN``; ``kind`` tells
        these apart.
        """
        return decodeReply(self.verb, self.reply)

    @property
    def kind(self) -> Reply:
        """What kind of reply this request got (see ``Reply``)."""
        return classifyReply(self.verb, self.reply)

    @property
    def foreign(self) -> bool:
        """
        Whether the reply is one the protocol never allows here (``Reply.FOREIGN``).
        A history holding one cannot be checked for atomicity.
        """
        return self.kind is Reply.FOREIGN

    @property
    def indeterminate(self) -> bool:
        """Whether the request may or may not have taken effect: an ``Error: `` reply, or none."""
        return self.kind in (Reply.ERROR, Reply.MISSING)

    def describe(self) -> str:
        """One line for a report: who, when, what was asked and answered."""
        end = "never" if math.isinf(self.ret) else f"{self.ret:.6f}"
        reply = "(no reply)" if self.reply is None else repr(self.reply)
        node = "" if self.node is None else f" on node {self.node + 1}"
        return f"client {self.client:>3}{node} [{self.call:.6f} .. {end}] {self.request!r} -> {reply}"


_FIXED_REPLIES = {
    PUT: {"OK": Outcome.OK, "Key already exists": Outcome.EXISTS},
    DEL: {"OK": Outcome.OK, "Key not found": Outcome.NOT_FOUND},
    GET: {"Key not found": Outcome.NOT_FOUND},
}


def isError(reply: str) -> bool:
    """An ``Error: `` reply: allowed to any request, its effect unknown (the server may be overloaded, say)."""
    return reply.startswith("Error: ")


def decodeReply(verb: str, reply: str | None) -> Outcome | int:
    """The meaning of ``reply`` to a request with ``verb`` (see ``Operation.outcome``)."""
    if reply is None:
        return Outcome.UNKNOWN
    fixed = _FIXED_REPLIES[verb].get(reply)
    if fixed is not None:
        return fixed
    if verb == GET:
        value = valueOf(reply)
        if value is not None:
            return value
    return Outcome.UNKNOWN


def classifyReply(verb: str, reply: str | None) -> Reply:
    """The kind of ``reply`` to a request with ``verb`` (see ``Reply``)."""
    if reply is None:
        return Reply.MISSING
    if decodeReply(verb, reply) is not Outcome.UNKNOWN:
        return Reply.DEFINITE
    if isError(reply):
        return Reply.ERROR
    return Reply.FOREIGN


def byKey(operations: Iterable[Operation]) -> dict[int, list[Operation]]:
    """
    The operations grouped per key, each group in call order.

    Keys are independent registers, so a history is linearizable exactly
    when each key's sub-history is (linearizability is compositional); the
    checker therefore never has to search across keys.
    """
    groups: dict[int, list[Operation]] = defaultdict(list)
    for operation in operations:
        groups[operation.key].append(operation)
    for group in groups.values():
        group.sort(key=lambda operation: (operation.call, operation.ret))
    return dict(groups)
