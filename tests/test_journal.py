"""The journal format: records round-trip, and torn tails are told from corruption."""

from __future__ import annotations

import errno
import os
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from journalfiles import record_offset
from kvtwist.storage import journal
from kvtwist.storage.journal import HEADER_SIZE, RECORD_SIZE, JournalFormatError

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
OPS = st.lists(st.one_of(st.tuples(st.just("put"), INT64, INT64), st.tuples(st.just("del"), INT64, st.just(0))))


def encode(ops, end: bool = False, version: int = journal.VERSION) -> bytes:
    return (
        journal.encodeHeader(journal.MAGIC, 7, version)
        + b"".join(journal.encodePut(k, v) if op == "put" else journal.encodeDel(k) for op, k, v in ops)
        + (journal.encodeEnd(8) if end else b"")
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


@given(OPS, st.booleans())
def test_round_trip(ops, end) -> None:
    data = encode(ops, end)
    state: dict[int, int] = {}
    scan = journal.replay("j", data, state)
    assert state == model(ops)
    assert (scan.generation, scan.records, scan.clean, scan.version) == (7, len(ops), True, journal.VERSION)
    assert scan.nextGeneration == (8 if end else None)


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


@pytest.mark.parametrize("version", [0, journal.VERSION + 1])
def test_an_unknown_version_is_refused(version) -> None:
    data = journal.encodeHeader(journal.MAGIC, 1, version=version)
    with pytest.raises(JournalFormatError, match=f"version {version} is not supported"):
        journal.replay("j", data, None)


# The end record (format version 2).


def test_the_end_record_is_the_next_generation_and_no_change() -> None:
    state: dict[int, int] = {}
    scan = journal.replay("j", encode([("put", 1, 2)], end=True), state)
    assert state == {1: 2} and scan.records == 1 and scan.nextGeneration == 8 and scan.clean


@pytest.mark.parametrize(
    "after",
    [
        journal.encodePut(3, 4),
        journal.encodeEnd(8),
        journal.encodePut(3, 4)[:5],
        bytes(3 * RECORD_SIZE),
        bytes(5),
    ],
    ids=["a good record", "a second end record", "part of a record", "zero bytes", "a few zero bytes"],
)
def test_anything_after_the_end_record_is_corruption(after) -> None:
    """Nothing is ever written after it, so not even a torn write can be there."""
    data = encode([("put", 1, 2)], end=True)
    state: dict[int, int] = {}
    scan = journal.replay("j", data + after, state)
    assert not scan.torn and scan.badOffset == len(data) and scan.detail == "data after the end record"
    assert state == {1: 2}


@pytest.mark.parametrize("record", [journal._record(journal.OP_END, 9, 0), journal._record(journal.OP_END, 8, 1)])
def test_an_end_record_that_names_another_generation_is_corruption(record) -> None:
    data = encode([("put", 1, 2)]) + record + journal.encodePut(3, 4)
    scan = journal.replay("j", data, None)
    assert not scan.torn and scan.badOffset == record_offset(1) and "bad end record" in scan.detail


@given(st.integers(min_value=1, max_value=RECORD_SIZE - 1))
def test_a_cut_inside_the_end_record_is_a_torn_tail_without_it(cut) -> None:
    data = encode([("put", 1, 2)], end=True)
    scan = journal.replay("j", data[:-cut], None)
    assert scan.torn and scan.nextGeneration is None and scan.badOffset == record_offset(1)


@pytest.mark.parametrize("end", [False, True])
def test_version_1_journals_are_read_with_or_without_an_end_record(end) -> None:
    """Version 1 had no end record; one is appended when writes switch away from an old journal."""
    state: dict[int, int] = {}
    scan = journal.replay("j", encode([("put", 1, 2), ("del", 1, 0), ("put", 3, 4)], end, version=1), state)
    assert state == {3: 4} and scan.version == 1 and scan.clean and scan.records == 3
    assert scan.nextGeneration == (8 if end else None)


# Reading a file.


@settings(max_examples=50, deadline=None)
@given(OPS, st.booleans(), st.integers(min_value=0, max_value=2 * RECORD_SIZE), st.data())
def test_reading_a_file_in_pieces_finds_what_replaying_its_bytes_does(ops, end, extra, data) -> None:
    """With pieces of three records, so that records, damage and tails straddle their edges."""
    whole = bytearray(encode(ops, end) + bytes(extra))
    if ops and data.draw(st.booleans()):
        whole[data.draw(st.integers(min_value=HEADER_SIZE, max_value=len(whole) - 1))] ^= 0x40
    expected: dict[int, int] = {}
    expectedScan = journal.replay("j", bytes(whole), expected)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "j")
        with open(path, "wb") as f:
            f.write(whole)
        original = journal._CHUNK
        journal._CHUNK = 3 * RECORD_SIZE
        try:
            state: dict[int, int] = {}
            scan = journal.readJournal(path, state)
        finally:
            journal._CHUNK = original
    assert state == expected
    assert (scan.goodEnd, scan.size, scan.torn, scan.detail, scan.records, scan.nextGeneration) == (
        expectedScan.goodEnd, expectedScan.size, expectedScan.torn, expectedScan.detail,
        expectedScan.records, expectedScan.nextGeneration,
    )


def test_reading_a_journal_holds_only_a_piece_of_it_in_memory(tmp_path, tracemalloc) -> None:
    path = tmp_path / "j"
    path.write_bytes(encode([("put", k, k) for k in range(100_000)]))  # 2.1 MB
    tracemalloc.start()
    try:
        scan = journal.readJournal(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scan.records == 100_000 and scan.clean
    assert peak < 300_000


def test_a_symbolic_link_is_not_followed(tmp_path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(encode([("put", 1, 2)]))
    (tmp_path / "j").symlink_to(target)
    with pytest.raises(OSError) as caught:
        journal.readJournal(str(tmp_path / "j"))
    assert caught.value.errno == errno.ELOOP
