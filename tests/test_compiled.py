"""
The compiled path: CompiledStore's C hash map on its own, and runChunk
against the pure-Python protocol over MemoryStore, which is the reference.
"""

from __future__ import annotations

import ctypes
import os
import random
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from kvtwist.compiled import ChunkRunner, CompiledStore, unavailable
from kvtwist.histogram import Histogram
from kvtwist.server import protocol as P, stats as S
from kvtwist.server.factory import KVFactory
from kvtwist.server.protocol import KVProtocol
from kvtwist.storage.interface import Batch, IStore, StoreFull
from kvtwist.storage.memory import MemoryStore

pytestmark = pytest.mark.skipif(CompiledStore is None, reason=f"no compiled path: {unavailable}")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
int64 = st.integers(min_value=INT64_MIN, max_value=INT64_MAX)


def store(maxKeys: int | None = None) -> Any:
    assert CompiledStore is not None
    return CompiledStore(maxKeys=maxKeys)


# The map


def test_is_an_istore_that_delivers_at_once() -> None:
    s = store()
    assert isinstance(s, IStore)
    delivered = []

    class Target:
        def sendReplies(self, batch: Batch) -> None:
            delivered.append(batch)

        def abandonReplies(self) -> None:
            raise AssertionError("not expected")

    batch = Batch(b"OK\n")
    s.deliver(Target(), batch)
    assert delivered == [batch]


def test_put_get_delete() -> None:
    s = store()
    assert s.put(1, 2, Batch()) is True
    assert s.put(1, 3, Batch()) is False
    assert s.get(1, Batch()) == 2
    assert s.get(2, Batch()) is None
    assert s.delete(1, Batch()) is True
    assert s.delete(1, Batch()) is False
    assert s.get(1, Batch()) is None
    assert len(s) == 0


@pytest.mark.parametrize("key", [0, -1, 1, INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1])
@pytest.mark.parametrize("value", [0, -1, INT64_MIN, INT64_MAX])
def test_extremes_and_zero(key: int, value: int) -> None:
    s = store()
    assert s.put(key, value, Batch())
    assert key in s and len(s) == 1
    assert s.get(key, Batch()) == value
    assert list(s.items()) == [(key, value)]
    assert s.delete(key, Batch())
    assert key not in s and len(s) == 0


def test_out_of_range_keys_are_refused_and_never_contained() -> None:
    s = store()
    with pytest.raises(OverflowError):
        s.put(INT64_MAX + 1, 0, Batch())
    with pytest.raises(OverflowError):
        s.put(0, INT64_MIN - 1, Batch())
    assert len(s) == 0
    assert INT64_MAX + 1 not in s
    assert "1" not in s


def test_grows_and_keeps_everything() -> None:
    s = store()
    empty = s.capacity()
    assert empty == 256 * 8
    for k in range(-50_000, 50_000):
        assert s.put(k * 7919, k, Batch())
    # Every table doubles beyond 11/16 full, so it is at least 11/32 full after.
    assert 11 / 32 <= len(s) / s.capacity() <= 11 / 16
    assert all(s.get(k * 7919, Batch()) == k for k in range(-50_000, 50_000))
    assert len(s) == 100_000


def test_shrinks_when_mostly_empty() -> None:
    s = store()
    for k in range(1, 100_001):
        s.put(k, k, Batch())
    big = s.capacity()
    for k in range(1, 99_001):
        assert s.delete(k, Batch())
    assert s.capacity() <= big // 4
    assert sorted(s.items()) == [(k, k) for k in range(99_001, 100_001)]
    for k in range(99_001, 100_001):
        assert s.delete(k, Batch())
    assert s.capacity() == 256 * 8 and len(s) == 0


def test_deletion_keeps_colliding_runs_findable() -> None:
    """Tables filled up to their limit hold runs of colliding keys; delete in random orders."""
    rng = random.Random(5)
    for _ in range(3):
        s = store()
        keys = rng.sample(range(-10**6, 10**6), 5000)
        for k in keys:
            s.put(k, -k, Batch())
        rng.shuffle(keys)
        for i, k in enumerate(keys):
            assert s.delete(k, Batch())
            assert s.get(k, Batch()) is None
            if i % 50 == 0:
                assert all(s.get(other, Batch()) == -other for other in keys[i + 1 :])
        assert len(s) == 0


# The tables' memory (kvtwist.compiled._tablememory)

BLOCK = 2 * 1024 * 1024


def check_blocks(s: Any) -> list[tuple[int, int, int, int]]:
    """The store's blocks, checked: aligned, one table size each, every table in one."""
    blocks = s.tableBlocks()
    for address, size, tableBytes, tables in blocks:
        assert address % BLOCK == 0 and size % BLOCK == 0 and tables >= 1
        if tableBytes < BLOCK:
            assert size == BLOCK and tables <= BLOCK // tableBytes
        else:
            assert size == tableBytes and tables == 1
    assert sum(tables for _, _, _, tables in blocks) == 256
    assert sum(tableBytes * tables for _, _, tableBytes, tables in blocks) == s.capacity() * 16
    return blocks


def test_tables_of_one_size_share_blocks_and_empty_blocks_are_freed() -> None:
    s = store()
    assert [(size, tableBytes, tables) for _, size, tableBytes, tables in check_blocks(s)] == [(BLOCK, 128, 256)]
    rng = random.Random(3)
    keys = rng.sample(range(1, 10**9), 100_000)
    for k in keys:
        s.put(k, -k, Batch())
    # Tables of several sizes at once, none of them in a block of another size.
    assert len({tableBytes for _, _, tableBytes, _ in check_blocks(s)}) >= 2
    for k in keys[:99_000]:
        s.delete(k, Batch())
    check_blocks(s)
    assert all(s.get(k, Batch()) == -k for k in keys[99_000:])
    for k in keys[99_000:]:
        s.delete(k, Batch())
    # Shrunk back to the smallest tables: every bigger block has been given back.
    assert [(size, tableBytes, tables) for _, size, tableBytes, tables in check_blocks(s)] == [(BLOCK, 128, 256)]


def test_a_table_of_a_block_or_more_has_blocks_of_its_own() -> None:
    s = store()
    # Room for 12 million keys: 256 tables of 2 MiB (512 MiB in all).
    s.reserve(12_000_000)
    blocks = check_blocks(s)
    assert {(size, tableBytes, tables) for _, size, tableBytes, tables in blocks} == {(BLOCK, BLOCK, 1)}
    for k in range(-1000, 1000):
        s.put(k, k, Batch())
    assert all(s.get(k, Batch()) == k for k in range(-1000, 1000))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore(2) as Linux has it")
def test_a_freed_table_gives_its_pages_back_at_once() -> None:
    """A map that grows frees its old tables one by one; their pages must not wait for the block's last table."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGESIZE")
    s = store()
    rng = random.Random(7)
    # About 371 keys a table: most tables have doubled to 1,024 slots, some are still at 512.
    for k in rng.sample(range(1, 10**9), 95_000):
        s.put(k, k, Batch())
    blocks = check_blocks(s)
    # The smaller size's block: every table was cut from it once, most have left it.
    smaller = min(tableBytes for _, _, tableBytes, _ in blocks)
    partial = [b for b in blocks if b[2] == smaller]
    assert smaller >= page and len(partial) == 1 and partial[0][3] < BLOCK // smaller
    for address, size, tableBytes, tables in partial:
        vector = (ctypes.c_ubyte * (size // page))()
        assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) == 0
        resident = sum(flag & 1 for flag in vector)
        freed = size // tableBytes - tables
        # The live tables' pages, and the first page of each freed one, which keeps the list of them.
        assert resident <= tables * tableBytes // page + freed


@pytest.mark.skipif(
    not os.path.exists("/sys/kernel/mm/transparent_hugepage"), reason="no transparent huge pages (Linux only)"
)
def test_blocks_are_advised_as_huge_pages() -> None:
    s = store()
    s.reserve(500_000)
    # Each mapping of the process, with its flags: "hg" is MADV_HUGEPAGE.
    mappings: list[tuple[int, int, list[str]]] = []
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                mappings.append((start, end, []))
            elif head == "VmFlags:":
                mappings[-1][2].extend(line.split()[1:])
    for address, size, _, _ in check_blocks(s):
        assert all(
            "hg" in flags for start, end, flags in mappings if start < address + size and address < end
        ), hex(address)


def test_million_keys() -> None:
    s = store()
    chunk = b"".join(b"put %d %d\n" % (k, -k) for k in range(1_000_000))
    counts = [0] * len(S.REQUEST_KINDS)
    replies, offset = s.runChunk(chunk, 0, 4096, counts)
    assert offset == len(chunk) and replies == b"OK\n" * 1_000_000
    assert len(s) == 1_000_000 and s.capacity() == 2**21
    assert all(s.get(k, Batch()) == -k for k in range(0, 1_000_000, 997))
    for k in range(0, 1_000_000, 2):
        s.delete(k, Batch())
    assert len(s) == 500_000
    assert sorted(s.items())[:3] == [(1, -1), (3, -3), (5, -5)]
    assert 999_999 in s and 999_998 not in s


@given(st.lists(st.tuples(st.sampled_from(["put", "get", "del"]), st.integers(-40, 40) | int64, int64), max_size=300))
def test_behaves_like_memory_store(ops: list[tuple[str, int, int]]) -> None:
    s, model = store(), MemoryStore()
    for op, key, value in ops:
        if op == "put":
            assert s.put(key, value, Batch()) == model.put(key, value, Batch())
        elif op == "get":
            assert s.get(key, Batch()) == model.get(key, Batch())
        else:
            assert s.delete(key, Batch()) == model.delete(key, Batch())
        assert len(s) == len(model)
    assert sorted(s.items()) == sorted(model.items())


def test_items_from_the_constructor_and_max_keys() -> None:
    assert CompiledStore is not None
    s = CompiledStore([(1, 1), (2, 2), (1, 9), (0, 5)], maxKeys=2)
    assert sorted(s.items()) == [(0, 5), (1, 1), (2, 2)]
    # Already beyond the limit, as MemoryStore allows after recovery.
    assert s.full
    assert s.put(1, 3, Batch()) is False
    with pytest.raises(StoreFull, match="store is full"):
        s.put(3, 3, Batch())
    assert s.get(2, Batch()) == 2 and s.delete(2, Batch()) and s.delete(0, Batch())
    assert not s.full
    assert s.put(3, 3, Batch()) is True
    assert s.full


def test_compiled_path_can_be_switched_off() -> None:
    code = "import kvtwist.compiled as c; print(c.CompiledStore, c.unavailable)"
    env = dict(os.environ, KVTWIST_PURE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None disabled by KVTWIST_PURE=1"


# runChunk on its own


def run(data: bytes, start: int = 0, maxRequest: int = 4096, s: Any = None) -> tuple[bytes, int, list[int]]:
    counts = [0] * len(S.REQUEST_KINDS)
    replies, offset = (store() if s is None else s).runChunk(data, start, maxRequest, counts)
    return replies, offset, counts


def test_reply_texts_are_the_protocols() -> None:
    s = store()
    replies, _, _ = run(b"put 1 2\nput 1 3\nget 1\nget 2\ndel 2\n", s=s)
    assert replies == P.OK + P.EXISTS + b"2\n" + P.NOT_FOUND + P.NOT_FOUND


def test_counts_are_added_per_outcome() -> None:
    s = store()
    counts = [1] * len(S.REQUEST_KINDS)
    s.runChunk(b"put 1 1\nput 2 2\nput 1 1\nget 1\nget 3\nget 3\ndel 1\ndel 1\ndel 1\n", 0, 4096, counts)
    expected = [1] * len(S.REQUEST_KINDS)
    for index, n in ((S.PUT_OK, 2), (S.PUT_EXISTS, 1), (S.GET_FOUND, 1), (S.GET_NOT_FOUND, 2),
                     (S.DEL_OK, 1), (S.DEL_NOT_FOUND, 2)):
        expected[index] += n
    assert counts == expected


# The server's fast path over the store (ChunkRunner)

def test_a_runner_runs_a_chunk_as_run_chunk_does_and_counts_in_c() -> None:
    assert ChunkRunner is not None
    runner, reference = ChunkRunner(store(), 12), store()
    counts = [0] * len(S.REQUEST_KINDS)
    chunks = [
        b"put 1 10\nget 1\nget 2\ndel 1\ndel 1\nput 1 5\nput 1 6\n",
        b"get 1\n\nget 1\n",
        # Stops at a line the Python path must judge, and at one over the limit.
        b"get 1\nGET 1\nget 1\n",
        b"put 1234 5678\n",
        b"get 1\nget 7",
    ]
    ran = 0
    for chunk in chunks:
        replies, done = reference.runChunk(chunk, 0, 12, counts)
        assert runner.run(chunk) == (replies, done)
        ran += done
    assert runner.requestCounts() == counts
    assert counts[S.GET_FOUND] == 5 and counts[S.PUT_OK] == 2
    # Each chunk up to the line it stopped at: the put of 14 bytes ran nowhere.
    assert runner.bytesRun == ran == 49 + 13 + 6 + 0 + 6


def test_the_stats_add_what_the_runner_counted_to_what_python_counted() -> None:
    assert ChunkRunner is not None
    runner = ChunkRunner(store(), 4096)
    stats = S.ServerStats(countedInC=runner)
    runner.run(b"put 1 1\nget 1\nget 2\n")
    stats.requests[S.GET_FOUND] += 2
    stats.requests[S.UNKNOWN_COMMAND] += 1
    stats.bytesIn += 100
    expected = [0] * len(S.REQUEST_KINDS)
    expected[S.PUT_OK], expected[S.GET_FOUND], expected[S.GET_NOT_FOUND], expected[S.UNKNOWN_COMMAND] = 1, 3, 1, 1
    assert stats.requestCounts() == expected
    assert stats.receivedBytes() == 100 + len(b"put 1 1\nget 1\nget 2\n")
    assert S.ServerStats().requestCounts() == [0] * len(S.REQUEST_KINDS)


def test_a_runner_with_a_histogram_times_the_first_chunk_and_one_in_time_every() -> None:
    assert ChunkRunner is not None
    latency = Histogram(S.LATENCY_BUCKETS)
    runner = ChunkRunner(store(), 4096, latency, 3)
    # Chunks 1, 4 and 7 are timed, each filed once per reply; chunk 4 has
    # three requests, the others two.
    for i in range(7):
        chunk = b"put %d 1\nget %d\n" % (i, i) + (b"del %d\n" % i if i == 3 else b"")
        runner.run(chunk)
    assert latency.count == 2 + 3 + 2
    assert 0 < latency.total < 7 * 1.0
    # The tenth chunk is timed, but answers nothing (an unfinished request)
    # and so files nothing; the count goes on from it.
    runner.run(b"get 1\n")
    runner.run(b"get 1\n")
    assert runner.run(b"get 1") == (b"", 0)
    runner.run(b"get 1\n")
    runner.run(b"get 1\n")
    assert latency.count == 7
    runner.run(b"get 1\n")
    assert latency.count == 8
    # Without a histogram, nothing is timed.
    assert ChunkRunner(store(), 4096).run(b"get 1\n") == (b"Key not found\n", 6)
    with pytest.raises(ValueError, match="at least 1"):
        ChunkRunner(store(), 4096, latency, 0)


def test_a_server_counts_every_request_and_byte_whichever_path_ran_it() -> None:
    factory = KVFactory(store(), reactor=Clock())
    proto = factory.buildProtocol(None)
    assert isinstance(proto, KVProtocol)
    proto.makeConnection(StringTransport())
    chunks = [b"put 1 1\nget 1\n", b"GET 1\nget 2\n", b"get", b" 1\n", b"nonsense\n"]
    for chunk in chunks:
        proto.dataReceived(chunk)
    counts = factory.stats.requestCounts()
    assert (counts[S.PUT_OK], counts[S.GET_FOUND], counts[S.GET_NOT_FOUND], counts[S.UNKNOWN_COMMAND]) == (1, 3, 1, 1)
    assert sum(counts) == 6
    assert factory.stats.receivedBytes() == sum(len(chunk) for chunk in chunks)


def test_canonical_values_and_signs() -> None:
    s = store()
    replies, _, _ = run(b"put 007 -0005\nget 7\nput -0 0\nget 0\nget -000\nput -999999999999999999 999999999999999999\n"
                        b"get -999999999999999999\n", s=s)
    assert replies == b"OK\n-5\nOK\n0\n0\nOK\n999999999999999999\n"


def test_every_int64_takes_the_compiled_path() -> None:
    s = store()
    data = (b"put -9223372036854775808 9223372036854775807\nput 9223372036854775807 -9223372036854775808\n"
            b"get -9223372036854775808\nget 9223372036854775807\nput 1234567890123456789 -1234567890123456789\n"
            b"get 1234567890123456789\n")
    replies, offset, _ = run(data, s=s)
    assert offset == len(data)
    assert replies == b"OK\nOK\n9223372036854775807\n-9223372036854775808\nOK\n-1234567890123456789\n"


@pytest.mark.parametrize("line", [
    b"PUT 1 2", b"Get 1", b"get 1\r", b"get  1", b" get 1", b"get 1 ", b"get\t1", b"get 1\x0b", b"get 1\x0c",
    b"get 1\0", b"get +1", b"get 9223372036854775808", b"get -9223372036854775809", b"get 12345678901234567890",
    b"get 00000000000000000001", b"put 1 99999999999999999999", b"get 1x", b"get -", b"get ",
    b"get", b"put 1", b"put 1 2 3", b"del 1 2", b"get 1 2", b"bye", b"Bye", b"auth x", b"set 1 2", b" ", b"\t",
    b"get 0x1", b"get 1_0", b"put 1 ", b"put  1 2", b"geta 1", "get \u0661".encode(), b"put 1\t2", b"put 1x2",
    b"put 1-2", b"put 1\r2", b"get\x001", b"del-1", b"put 1 2x", b"put 1 --2",
])
def test_stops_at_a_line_that_is_not_common(line: bytes) -> None:
    replies, offset, counts = run(b"get 5\n" + line + b"\nget 5\n")
    assert (replies, offset) == (P.NOT_FOUND, 6)
    assert counts[S.GET_NOT_FOUND] == 1 and sum(counts) == 1


def test_leaves_a_partial_last_line() -> None:
    assert run(b"get 1\nget 2") == (P.NOT_FOUND, 6, run(b"get 1\n")[2])
    assert run(b"get 1")[:2] == (b"", 0)
    assert run(b"")[:2] == (b"", 0)


def test_empty_lines_get_no_reply() -> None:
    assert run(b"\n\nget 1\n\n")[:2] == (P.NOT_FOUND, 9)


def test_starts_at_the_offset_given() -> None:
    data = b"Bye\nget 1\n"
    assert run(data, 4)[:2] == (P.NOT_FOUND, 10)
    assert run(data, 10)[:2] == (b"", 10)
    for bad in (-1, 11):
        with pytest.raises(ValueError):
            run(data, bad)


def test_refuses_arguments_it_cannot_use() -> None:
    s = store()
    with pytest.raises(ValueError):
        s.runChunk(b"put 1 1\n", 0, 4096, [0] * S.DEL_NOT_FOUND)
    with pytest.raises(TypeError):
        s.runChunk(None, 0, 4096, [0] * len(S.REQUEST_KINDS))
    with pytest.raises(TypeError):
        s.runChunk(b"put 1 1\n", 0, 4096, None)
    assert len(s) == 0


def test_chunks_bigger_than_the_kept_buffer() -> None:
    s = store()
    data = b"get -999999999999999999\n" * 10_000 + b"put 1 1\n"
    assert run(data, s=s)[:2] == (P.NOT_FOUND * 10_000 + P.OK, len(data))
    assert run(b"get 1\n", s=s)[:2] == (b"1\n", 6)


def test_request_length_limit() -> None:
    # "put 1 10" is 8 bytes: run at a limit of 8, left to the Python path at 7.
    assert run(b"put 1 10\n", maxRequest=8)[:2] == (P.OK, 9)
    assert run(b"put 1 10\n", maxRequest=7)[:2] == (b"", 0)


def test_a_full_store_leaves_new_keys_to_the_python_path() -> None:
    s = store(maxKeys=2)
    replies, offset, counts = run(b"put 1 1\nput 0 0\nput 1 2\nget 1\nput 3 3\nget 3\n", s=s)
    assert replies == P.OK + P.OK + P.EXISTS + b"1\n"
    assert offset == 30 and len(s) == 2
    assert run(b"put 0 1\ndel 0\nput 0 1\nput 5 5\n", s=s)[:2] == (P.EXISTS + P.OK + P.OK, 22)


# runChunk with the Python path for what it leaves, against the reference

COMMON = [b"put %s %s", b"get %s", b"del %s"]


@st.composite
def numbers(draw: st.DrawFn) -> bytes:
    """Mostly common numbers (with leading zeros), some only the Python path takes."""
    n = draw(st.integers(-12, 12) | int64)
    kind = draw(st.sampled_from(["plain"] * 6 + ["zeros", "plus", "long", "huge", "bad"]))
    text = b"%d" % n
    if kind == "zeros":
        sign, digits = (b"-", text[1:]) if n < 0 else (b"", text)
        text = sign + b"0" * draw(st.integers(1, 20)) + digits
    elif kind == "plus" and n >= 0:
        text = b"+" + text
    elif kind == "long":
        text = draw(st.sampled_from([b"1234567890123456789", b"-0000000000000000001", b"9223372036854775807",
                                     b"-9223372036854775808", b"999999999999999999", b"-999999999999999999"]))
    elif kind == "huge":
        text = draw(st.sampled_from([b"9223372036854775808", b"-9223372036854775809", b"1" * 30]))
    elif kind == "bad":
        text = draw(st.sampled_from([b"", b"-", b"+", b"1x", b"0x10", b"1_0", b"--1", b"1.0", "\u0661".encode()]))
    return text


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["common"] * 12 + ["verb", "spacing", "cr", "odd", "replace", "other", "blank"]))
    template = draw(st.sampled_from(COMMON))
    line = template % tuple(draw(numbers()) for _ in range(template.count(b"%s")))
    if kind == "verb":
        line = draw(st.sampled_from([b"PUT", b"Get", b"DEL", b"gEt"])) + line[3:]
    elif kind == "spacing":
        i = draw(st.integers(0, len(line)))
        line = line[:i] + draw(st.sampled_from([b" ", b"\t", b"  "])) + line[i:]
    elif kind == "cr":
        line += b"\r"
    elif kind == "odd":
        i = draw(st.integers(0, len(line)))
        line = line[:i] + draw(st.sampled_from([b"\r", b"\0", b"\x0b", b"\x0c"])) + line[i:]
    elif kind == "replace":
        i = draw(st.integers(0, len(line) - 1))
        line = line[:i] + draw(st.sampled_from([b"\t", b"\r", b"\0", b"x", b"-", b"+", b"0", b" "])) + line[i + 1 :]
    elif kind == "other":
        line = draw(st.sampled_from([b"set 1 2", b"get", b"put 1", b"del 1 2", b"auth pw", b"x" * 40, b"Bye"]))
    elif kind == "blank":
        line = draw(st.sampled_from([b"", b"", b" ", b"\t \t"]))
    return line


class Side:
    """One server connection through StringTransport, over a given store."""

    def __init__(self, s: Any, maxRequest: int) -> None:
        self.store = s
        self.factory = KVFactory(s, maxRequest=maxRequest, reactor=Clock())
        proto = self.factory.buildProtocol(None)
        assert isinstance(proto, KVProtocol)
        self.proto = proto
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)


def runCompiled(side: Side, chunk: bytes) -> None:
    """
    What the protocol does with a CompiledStore: runChunk for the common
    lines, the Python path for each line it leaves, then runChunk again.
    """
    s = side.store
    counts = side.factory.stats.requests
    data = chunk.replace(b"\0", b"\n")
    end = data.rfind(b"\n") + 1
    offset = 0
    while not side.transport.disconnecting:
        replies, offset = s.runChunk(data, offset, side.factory.maxRequest, counts)
        side.transport.write(replies)
        if offset == end:
            break
        nl = data.index(b"\n", offset)
        side.proto.dataReceived(data[offset : nl + 1])
        offset = nl + 1
    if not side.transport.disconnecting and end < len(data):
        side.proto.dataReceived(data[end:])


@settings(max_examples=400, deadline=None)
@given(
    chunks=st.lists(st.lists(lines(), max_size=40).map(b"\n".join), min_size=1, max_size=4),
    partial=st.booleans(),
    maxRequest=st.sampled_from([4096, 4096, 12, 20]),
    maxKeys=st.sampled_from([None, None, 3, 10]),
    preload=st.lists(st.tuples(st.integers(-12, 12), int64), max_size=8),
)
def test_chunks_match_the_pure_path(
    chunks: list[bytes], partial: bool, maxRequest: int, maxKeys: int | None, preload: list[tuple[int, int]]
) -> None:
    assert CompiledStore is not None
    reference = MemoryStore(maxKeys=maxKeys)
    for k, v in preload[: maxKeys or len(preload)]:
        reference.put(k, v, Batch())
    compiledSide = Side(CompiledStore(reference.items(), maxKeys=maxKeys), maxRequest)
    pureSide = Side(reference, maxRequest)
    for i, chunk in enumerate(chunks):
        # Every chunk but the last ends its last line; that one may not.
        data = chunk if partial and i == len(chunks) - 1 else chunk + b"\n"
        pureSide.proto.dataReceived(data)
        runCompiled(compiledSide, data)
    assert compiledSide.transport.value() == pureSide.transport.value()
    assert compiledSide.factory.stats.requestCounts() == pureSide.factory.stats.requestCounts()
    assert sorted(compiledSide.store.items()) == sorted(reference.items())
    assert len(compiledSide.store) == len(reference)


# The remote engines' path


def test_parse_chunk_takes_the_common_lines_as_operations() -> None:
    from kvtwist.compiled import _chunk
    from kvtwist.storage.interface import DELETE, GET, PUT, Operation

    data = b"put 1 -2\n\nget 9223372036854775807\ndel -5\nGET 1\nget 2\n"
    operations, offset = _chunk.parseChunk(data, 4096)
    assert operations == [Operation(PUT, 1, -2), Operation(GET, 2**63 - 1), Operation(DELETE, -5)]
    assert all(type(op) is Operation for op in operations)
    assert offset == data.index(b"GET")
    assert _chunk.parseChunk(b"get 1", 4096) == ([], 0)
    assert _chunk.parseChunk(b"get 12345\n", 8) == ([], 0)


def test_format_outcomes_writes_the_protocols_replies_or_leaves_errors_to_python() -> None:
    from kvtwist.compiled import _chunk
    from kvtwist.storage.interface import DELETE, GET, PUT, Operation, StoreUnavailable

    operations = [Operation(PUT, 1, 1), Operation(PUT, 1, 2), Operation(GET, 1), Operation(GET, 2),
                  Operation(DELETE, 1), Operation(DELETE, 1)]
    counts = [0] * len(S.REQUEST_KINDS)
    replies = _chunk.formatOutcomes(operations, [True, False, -(2**63), None, True, False], counts)
    assert replies == P.OK + P.EXISTS + b"-9223372036854775808\n" + P.NOT_FOUND + P.OK + P.NOT_FOUND
    assert [counts[i] for i in (S.PUT_OK, S.PUT_EXISTS, S.GET_FOUND, S.GET_NOT_FOUND, S.DEL_OK, S.DEL_NOT_FOUND)] == [1] * 6
    assert _chunk.formatOutcomes(operations[:1], [StoreUnavailable("timeout")], counts) is None
    with pytest.raises(ValueError):
        _chunk.formatOutcomes(operations, [True], counts)
