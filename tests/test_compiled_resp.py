"""
The compiled RESP path (kvtwist.compiled.respPath) against the Redis
engine's Python functions, which are the reference: the same bytes for
every chunk of commands, and the same outcome for every reply it takes.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, strategies as st

from kvtwist.compiled import respPath, unavailable
from kvtwist.engines.redis import CommandEncoder, outcomeOf
from kvtwist.engines.redisnode import ReplyError
from kvtwist.storage.interface import DELETE, GET, PUT, EngineStats, Operation, StoreError, StoreUnavailable

pytestmark = pytest.mark.skipif(respPath is None, reason=f"no compiled path: {unavailable}")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
int64 = st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
edges = st.sampled_from([0, 1, -1, 9, 10, -10, 99, 100, INT64_MAX, INT64_MIN, INT64_MAX - 1, INT64_MIN + 1])
numbers = int64 | edges
operations = st.lists(
    st.builds(Operation, st.just(GET), numbers)
    | st.builds(Operation, st.just(DELETE), numbers)
    | st.builds(Operation, st.just(PUT), numbers, numbers),
    max_size=40,
)
prefixes = st.sampled_from([b"kvtwist:", b"", b"{app}:", b"100%d%b%%:", "k\u00e9y\r\n".encode()]) | st.binary(max_size=30)


def resp() -> Any:
    assert respPath is not None
    return respPath


@given(operations, prefixes)
def test_encodes_what_the_python_encoder_does(chunk: list[Operation], prefix: bytes) -> None:
    each = CommandEncoder(prefix).encode(chunk)
    assert resp().encodeCommands(chunk, prefix) == b"".join(each)
    assert resp().encodeEach(chunk, prefix) == each


def test_takes_any_sequence_of_operations() -> None:
    chunk = (Operation(GET, 1), Operation(PUT, 2, 3))
    assert resp().encodeCommands(chunk, b"p:") == b"".join(CommandEncoder(b"p:").encode(list(chunk)))
    assert resp().decodeOutcomes(chunk, [b"4", b"OK"]) == [4, True]


@pytest.mark.parametrize(
    "chunk, error",
    [
        ([Operation(GET, 1), Operation(7, 1)], ValueError),
        ([(GET, 1)], TypeError),
        ([5], TypeError),
        ([Operation(GET, 2**63)], OverflowError),
        ([Operation(PUT, 1, -(2**63) - 1)], OverflowError),
    ],
)
def test_refuses_what_is_not_an_operation_it_can_encode(chunk: list[Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        resp().encodeCommands(chunk, b"p:")
    with pytest.raises(error):
        resp().encodeEach(chunk, b"p:")


def test_one_reply_per_operation() -> None:
    with pytest.raises(ValueError, match="one reply per operation"):
        resp().decodeOutcomes([Operation(GET, 1)], [])


def decimal(value: int) -> bytes:
    return b"%d" % value


# What Redis (or the node) may answer: the common replies and everything else.
replies = st.one_of(
    st.none(),
    st.just(b"OK"),
    numbers.map(decimal),
    st.integers(min_value=-2, max_value=3),
    st.sampled_from([
        b"", b"-0", b"007", b"+5", b" 5", b"5 ", b"1_000", b"9223372036854775808", b"-9223372036854775809",
        b"99999999999999999999", b"\xff", b"ok", b"OK ", b"QUEUED", True, False, [b"1"], 1.5,
    ]),
    st.binary(max_size=22),
    st.builds(ReplyError, st.sampled_from(["WRONGTYPE Operation against a key", "READONLY You can't write", "ERR x"])),
    st.builds(StoreUnavailable, st.sampled_from(["outcome unknown", "timeout", "connection refused"])),
)


@given(st.lists(st.tuples(operations.map(lambda chunk: chunk[:1]).filter(bool), replies), max_size=30))
def test_decodes_as_the_python_path_or_leaves_the_chunk_to_it(pairs: list[tuple[list[Operation], object]]) -> None:
    chunk = [operation[0] for operation, _ in pairs]
    answers = [reply for _, reply in pairs]
    stats = EngineStats()
    reference = [outcomeOf(operation, reply, stats) for operation, reply in zip(chunk, answers)]
    decoded = resp().decodeOutcomes(chunk, answers)
    if decoded is None:
        # Left to the Python path only where that path has an error to report and count.
        assert any(isinstance(outcome, StoreError) for outcome in reference)
    else:
        assert not any(isinstance(outcome, StoreError) for outcome in reference)
        assert decoded == reference
        assert [type(outcome) for outcome in decoded] == [type(outcome) for outcome in reference]


def test_the_common_replies() -> None:
    chunk = [Operation(GET, 1), Operation(GET, 2), Operation(PUT, 3, 4), Operation(PUT, 3, 5), Operation(DELETE, 3), Operation(DELETE, 3)]
    assert resp().decodeOutcomes(chunk, [b"-9223372036854775808", None, b"OK", None, 1, 0]) == [
        INT64_MIN, None, True, False, True, False,
    ]
