"""The journal format: records round-trip, and torn tails are told from corruption."""

from __future__ import annotations


import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtwist.storage import journal
from kvtwist.storage.journal import HEADER_SIZE, RECORD_SIZE, JournalFormatError

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
OPS = st.lists(st.one_of(st.tuples(st.just("put"), INT64, INT64), st.tuples(st.just("del"), INT64, st.just(0))))


def encode(ops) -> bytes:
    return journal.encodeHeader(journal.MAGIC, 7) + b"".join(
        journal.encodePut(k, v) if op == "put" else journal.encodeDel(k) for op, k, v in ops
    )


def model(ops) -> dict[int, int]:
    """What replaying ``ops`` as blind writes must give."""
    state: dict[int, int] = {}
    for op, key, value in ops:
        if op == "put":
            state[key] = value
        else:
            state.pop(key, None)
    return state


@given(OPS)
def test_round_trip(ops) -> None:
    data = encode(ops)
    state: dict[int, int] = {}
    scan = journal.replay("j", data, state)
    assert state == model(ops)
    assert (scan.generation, scan.records, scan.clean) == (7, len(ops), True)


@given(st.lists(st.tuples(st.just("put"), INT64, INT64), min_size=1, max_size=20), st.data())
def test_any_cut_inside_the_last_record_is_a_torn_tail(ops, data) -> None:
    whole = encode(ops)
    cut = data.draw(st.integers(min_value=len(whole) - RECORD_SIZE + 1, max_value=len(whole) - 1))
    state: dict[int, int] = {}
    scan = journal.replay("j", whole[:cut], state)
    assert scan.torn and scan.badOffset == len(whole) - RECORD_SIZE
    assert state == model(ops[:-1])


@given(st.lists(st.tuples(st.just("put"), INT64, INT64), min_size=2, max_size=20), st.data())
def test_a_flipped_bit_before_the_last_record_is_corruption(ops, data) -> None:
    whole = bytearray(encode(ops))
    index = data.draw(st.integers(min_value=0, max_value=len(ops) - 2))
    bit = data.draw(st.integers(min_value=0, max_value=RECORD_SIZE * 8 - 1))
    whole[HEADER_SIZE + index * RECORD_SIZE + bit // 8] ^= 1 << (bit % 8)
    scan = journal.replay("j", bytes(whole), None)
    assert not scan.clean and not scan.torn
    assert scan.badOffset == HEADER_SIZE + index * RECORD_SIZE


def test_a_flipped_bit_in_the_last_record_is_a_torn_tail() -> None:
    whole = bytearray(encode([("put", 1, 2), ("put", 3, 4)]))
    whole[-1] ^= 0x10
    scan = journal.replay("j", bytes(whole), None)
    assert scan.torn and scan.records == 1


def test_zeros_after_the_last_good_record_are_a_torn_tail() -> None:
    """Blocks allocated but never written before a power loss read back as zeros."""
    data = encode([("put", 1, 2)]) + bytes(5 * RECORD_SIZE + 3)
    scan = journal.replay("j", data, None)
    assert scan.torn and scan.records == 1


def test_a_partial_record_after_a_bad_one_is_corruption() -> None:
    whole = bytearray(encode([("put", 1, 2), ("put", 3, 4)]))
    whole[HEADER_SIZE] ^= 0xFF
    scan = journal.replay("j", bytes(whole[:-3]), None)
    assert not scan.torn and scan.badOffset == HEADER_SIZE


@pytest.mark.parametrize(
    "mangle, detail",
    [
        (lambda h: h[:10], "shorter than its header"),
        (lambda h: b"NOTAJRNL" + h[8:], "not a kvtwist file"),
        (lambda h: h[:9] + bytes([h[9] ^ 1]) + h[10:], "header checksum"),
    ],
)
def test_bad_headers_are_refused(mangle, detail) -> None:
    data = mangle(encode([]))
    with pytest.raises(JournalFormatError, match=detail) as caught:
        journal.replay("j", data, None)
    assert caught.value.offset == 0


def test_an_unknown_version_is_refused() -> None:
    data = journal.encodeHeader(journal.MAGIC, 1, version=journal.VERSION + 1)
    with pytest.raises(JournalFormatError, match="version"):
        journal.replay("j", data, None)
