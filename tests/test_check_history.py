"""
The linearizability check refuses to pass a history that cannot show what
the server stored: replies from outside the protocol, or no telling reply at all.
"""

from __future__ import annotations

import math

from kvtwist.check.concurrency import checkLinearizable
from kvtwist.check.history import DEL, GET, PUT, Operation
from kvtwist.check.target import Settings, Target

KEY = 10**16


def target() -> Target:
    return Target(None, Settings("127.0.0.1", 1))


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
