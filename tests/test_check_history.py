"""
Which replies a history may hold, decided in one place (``history.Reply``):
replies the protocol allows say what happened; ``Error: `` replies are
allowed but indeterminate; anything else is never allowed. The replies
check and the linearizability check both follow that one rule: neither
fails on ``Error: `` replies, both count them, and the linearizability
check refuses to pass a history that cannot show what the server stored.
"""

from __future__ import annotations

import math

import pytest

from kvtwist.check.concurrency import checkLinearizable, checkReplies
from kvtwist.check.history import DEL, GET, PUT, Operation, Reply, classifyReply
from kvtwist.check.nodes import Node
from kvtwist.check.target import Settings, Target

KEY = 10**16


def target() -> Target:
    return Target(None, Settings((Node("127.0.0.1", 1),)))


def history(*replies: tuple[str, str | None]) -> list[Operation]:
    """One client's requests one after another on one key, with these replies."""
    operations = []
    for index, (verb, reply) in enumerate(replies):
        value = index + 1 if verb == PUT else None
        ret = math.inf if reply is None else index + 0.5
        operations.append(Operation(0, verb, KEY, value, float(index), ret, reply))
    return operations


def test_aCorrectHistoryPasses() -> None:
    result = checkLinearizable(target(), history((DEL, "Key not found"), (PUT, "OK"), (GET, "2")))
    assert result.passed, result.summary


def test_anotherProtocolsRepliesAreNotAPass() -> None:
    """What redis-server answers to this protocol: ':0', '$-1', '-ERR unknown command ...'."""
    operations = history((DEL, ":0"), (GET, "$-1"), (PUT, "-ERR unknown command 'put'"), (GET, "$-1"))
    result = checkLinearizable(target(), operations)
    assert not result.passed
    assert result.summary.startswith("not checked: 4 of 4 replies are neither a reply the protocol allows")
    assert "client   0 [0.000000 .. 0.500000] 'del 10000000000000000' -> ':0'" in result.evidence


def test_oneGarbageReplyAmongGoodOnesIsEnough() -> None:
    operations = history((DEL, "Key not found"), (PUT, "OK"), (GET, "\x00\x1b[2J"), (GET, "2"))
    result = checkLinearizable(target(), operations)
    assert not result.passed
    assert result.summary.startswith("not checked: 1 of 4 replies")
    assert len(result.evidence) == 1


def test_errorRepliesAreAllowedWithAnUnknownOutcome() -> None:
    """An 'Error:' put may or may not have stored its value; either way the history is linearizable."""
    operations = history(
        (DEL, "Key not found"), (PUT, "Error: out of memory"), (GET, "2"), (DEL, "OK"), (GET, "Key not found")
    )
    result = checkLinearizable(target(), operations)
    assert result.passed, result.summary


def test_aHistoryOfOnlyErrorsAndSilenceIsNotAPass() -> None:
    operations = history((DEL, "Error: busy"), (PUT, "Error: busy"), (GET, None))
    result = checkLinearizable(target(), operations)
    assert not result.passed
    assert result.summary.startswith("not checked: none of the 3 requests got a reply that says what the server stored")


@pytest.mark.parametrize(
    "verb, reply, kind",
    [
        (PUT, "OK", Reply.DEFINITE), (PUT, "Key already exists", Reply.DEFINITE),
        (GET, "-5", Reply.DEFINITE), (GET, "Key not found", Reply.DEFINITE),
        (DEL, "OK", Reply.DEFINITE), (DEL, "Key not found", Reply.DEFINITE),
        (PUT, "Error: store unavailable (outcome unknown)", Reply.ERROR),
        (GET, "Error: store unavailable (outcome unknown)", Reply.ERROR),
        (DEL, "Error: busy", Reply.ERROR),
        (PUT, None, Reply.MISSING), (GET, None, Reply.MISSING),
        (GET, "OK", Reply.FOREIGN), (PUT, "Key not found", Reply.FOREIGN), (DEL, "Key already exists", Reply.FOREIGN),
        (GET, "1.5", Reply.FOREIGN), (PUT, "store unavailable", Reply.FOREIGN), (PUT, "Error:busy", Reply.FOREIGN),
        (GET, "$-1", Reply.FOREIGN), (PUT, "-ERR unknown command 'put'", Reply.FOREIGN), (DEL, ":0", Reply.FOREIGN),
    ],
)
def test_everyReplyHasOneKind(verb: str, reply: str | None, kind: Reply) -> None:
    assert classifyReply(verb, reply) is kind
    operation = history((verb, reply))[0]
    assert operation.kind is kind
    assert operation.foreign == (kind is Reply.FOREIGN)
    assert operation.indeterminate == (kind in (Reply.ERROR, Reply.MISSING))


FAULTY = (
    (DEL, "Key not found"), (PUT, "Error: store unavailable (outcome unknown)"), (GET, "2"),
    (DEL, "Error: store unavailable (outcome unknown)"), (GET, "Error: store unavailable (outcome unknown)"),
    (GET, "Key not found"),
)


def test_errorRepliesPassTheRepliesCheckAndAreCounted() -> None:
    result = checkReplies(history(*FAULTY), 1, [])
    assert result.passed, result.summary
    assert result.stats["indeterminate"] == result.stats["error_replies"] == 3
    assert result.stats["missing_replies"] == 0
    assert "3 indeterminate (3 'Error: ' replies: may or may not have taken effect)" in result.summary


def test_bothChecksCountTheSameIndeterminateOperations() -> None:
    operations = history(*FAULTY)
    replies, linear = checkReplies(operations, 1, []), checkLinearizable(target(), operations)
    assert linear.passed, linear.summary
    counted = ("indeterminate", "error_replies", "missing_replies")
    assert {name: replies.stats[name] for name in counted} == {name: linear.stats[name] for name in counted}
    assert "3 indeterminate" in linear.summary


@pytest.mark.parametrize("garbage", ["store unavailable (outcome unknown)", "\x00\x1b[2J", "$-1", "OK"])
def test_aReplyTheProtocolDoesNotAllowFailsTheRepliesCheck(garbage: str) -> None:
    """'OK' is allowed to a put, but never to a get."""
    operations = history((DEL, "Key not found"), (PUT, "OK"), (GET, garbage), (PUT, "Error: busy"))
    result = checkReplies(operations, 1, [])
    assert not result.passed
    assert result.summary.startswith("1 replies the protocol does not allow for their request")
    assert result.evidence == [operations[2].describe()]
    assert result.stats["indeterminate"] == 1


def test_aMissingReplyFailsTheRepliesCheckButIsCountedAsIndeterminate() -> None:
    operations = history((DEL, "Key not found"), (PUT, None), (PUT, "Error: busy"))
    result = checkReplies(operations, 1, [])
    assert not result.passed
    assert result.summary.startswith("1 requests never got a reply")
    assert (result.stats["indeterminate"], result.stats["error_replies"], result.stats["missing_replies"]) == (2, 1, 1)


def test_anErrorGetOrDelConstrainsNothing() -> None:
    """A get answered 'Error:' read nothing; a del so answered may have deleted: both histories are linearizable."""
    readNothing = history((DEL, "Key not found"), (PUT, "OK"), (GET, "Error: busy"), (GET, "2"))
    maybeDeleted = history((DEL, "Key not found"), (PUT, "OK"), (DEL, "Error: busy"), (GET, "Key not found"))
    notDeleted = history((DEL, "Key not found"), (PUT, "OK"), (DEL, "Error: busy"), (GET, "2"))
    for operations in (readNothing, maybeDeleted, notDeleted):
        result = checkLinearizable(target(), operations)
        assert result.passed, result.summary
    # Control: without the Error: del, the key cannot have gone.
    gone = history((DEL, "Key not found"), (PUT, "OK"), (GET, "2"), (GET, "Key not found"))
    assert not checkLinearizable(target(), gone).passed
