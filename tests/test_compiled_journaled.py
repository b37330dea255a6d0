"""
The durable store on the compiled path (CompiledStore.runJournaledChunk)
against the pure-Python journaled store, which is the reference: the same
replies, held for the same fsyncs, the same journal bytes, the same
recovered contents; and the C map as recovery's replay target.
"""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from kvtwist.compiled import CompiledStore, unavailable
from kvtwist.server import stats as S
from kvtwist.storage.interface import Batch
from kvtwist.storage.intmap import IntMap
from kvtwist.storage.journal import encodeDel, encodePut
from kvtwist.storage.journaled import JournaledStore, openDirectory
from kvtwist.storage.recovery import recover
from test_durable import connect, serve, stop

pytestmark = pytest.mark.skipif(CompiledStore is None, reason=f"no compiled path: {unavailable}")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
int64 = st.integers(min_value=INT64_MIN, max_value=INT64_MAX)


def compiledStore() -> Any:
    assert CompiledStore is not None
    return CompiledStore()


# The C map as recovery's target


@given(st.lists(st.tuples(st.booleans(), st.integers(-4, 4) | int64, int64), max_size=60))
def test_replays_as_an_intmap_does(ops: list[tuple[bool, int, int]]) -> None:
    ours, reference = compiledStore(), IntMap()
    for isSet, key, value in ops:
        if isSet:
            ours.update([(key, value)])
            reference.update([(key, value)])
        else:
            assert ours.pop(key, None) == reference.pop(key, None)
    assert sorted(ours.items()) == sorted(reference.items())
    assert len(ours) == len(reference)
    parts = list(ours.keyParts())
    assert sorted(key for part in parts for key in part) == sorted(key for key, _ in reference.items())


def test_replay_ignores_the_key_limit_and_reserve_keeps_every_key() -> None:
    assert CompiledStore is not None
    store = CompiledStore(maxKeys=2)
    store.update((key, -key) for key in range(1000))
    assert len(store) == 1000 and store.full
    capacity = store.capacity()
    store.reserve(100_000)
    assert store.capacity() > capacity
    assert sorted(store.items()) == [(key, -key) for key in range(1000)]
    assert store.pop(2**70, "none") == "none" and store.pop("x", None) is None


def test_a_directory_recovers_the_same_on_both_paths(tmp_path: Any) -> None:
    pure = JournaledStore(openDirectory(str(tmp_path), compiled=False))
    for key in range(300):
        pure.put(key, key * 7, Batch())
    for key in range(0, 300, 3):
        pure.delete(key, Batch())
    pure.close()
    compiled = JournaledStore(openDirectory(str(tmp_path), compiled=True))
    assert compiled.compiled is not None
    assert sorted(compiled.items()) == sorted(dict(recover(str(tmp_path)).map.items()).items())
    compiled.close()


# The chunk runner against the Python store


def test_the_records_are_the_journal_s() -> None:
    store = compiledStore()
    counts = [0] * len(S.REQUEST_KINDS)
    chunk = b"put 5 -9\nput 5 1\ndel 5\ndel 5\nput -9223372036854775808 9223372036854775807\n"
    replies, done, appended, waitFor = store.runJournaledChunk(chunk, 0, 4096, counts, {}, 41)
    assert replies == b"OK\nKey already exists\nOK\nKey not found\nOK\n"
    assert (done, appended, waitFor) == (len(chunk), 44, 44)
    assert store.pendingRecords() == encodePut(5, -9) + encodeDel(5) + encodePut(INT64_MIN, INT64_MAX)
    store.confirmPending()
    assert store.pendingRecords() == b""


def test_undo_takes_back_every_pending_change_newest_first() -> None:
    store = compiledStore()
    store.update([(1, 10), (2, 20)])
    counts = [0] * len(S.REQUEST_KINDS)
    store.runJournaledChunk(b"del 1\nput 1 11\ndel 2\nput 3 30\ndel 3\nput 4 40\n", 0, 4096, counts, None, 0)
    assert sorted(store.items()) == [(1, 11), (4, 40)]
    store.undoPending()
    assert sorted(store.items()) == [(1, 10), (2, 20)]
    assert store.pendingRecords() == b""


def test_a_full_store_leaves_the_put_to_the_python_path() -> None:
    assert CompiledStore is not None
    store = CompiledStore(maxKeys=1)
    counts = [0] * len(S.REQUEST_KINDS)
    replies, done, appended, _ = store.runJournaledChunk(b"put 1 1\nput 1 2\nput 2 2\nget 1\n", 0, 4096, counts, None, 0)
    assert (replies, done, appended) == (b"OK\nKey already exists\n", 16, 1)
    assert store.pendingRecords() == encodePut(1, 1)


_LINES = st.one_of(
    st.builds(lambda k, v: b"put %d %d" % (k, v), st.integers(-3, 3), st.integers(-3, 3) | int64),
    st.builds(lambda k: b"get %d" % k, st.integers(-3, 3)),
    st.builds(lambda k: b"del %d" % k, st.integers(-3, 3)),
    st.sampled_from([b"", b"GET 1", b"put 1", b"get 99999999999999999999", b"del 2\r", b"frob"]),
)
# (connection, chunk), or None: the reactor turns (the group fsync runs).
_EVENTS = st.lists(
    st.one_of(st.none(), st.tuples(st.integers(0, 2), st.lists(_LINES, min_size=1, max_size=6))), max_size=25
)


@pytest.mark.parametrize("fsync", ["always", "everysec"])
@given(events=_EVENTS)
@settings(max_examples=60, deadline=None)
def test_three_connections_see_what_they_see_on_the_python_path(fsync: str, events: list[Any]) -> None:
    outputs: dict[bool, list[bytes]] = {}
    journals: dict[bool, bytes] = {}
    recovered: dict[bool, list[tuple[int, int]]] = {}
    for compiled in (False, True):
        with tempfile.TemporaryDirectory() as directory:
            service, factory, clock = serve(directory, fsync, compiled=compiled)
            connections = [connect(factory) for _ in range(3)]
            seen: list[bytes] = []
            for event in events:
                if event is None:
                    clock.advance(0)
                else:
                    index, lines = event
                    connections[index][0].dataReceived(b"\n".join(lines) + b"\n")
                # After each event: what each connection has been sent so far.
                seen.append(b"|".join(transport.value() for _, transport in connections))
            stop(service, clock)
            outputs[compiled] = seen
            journals[compiled] = (open(os.path.join(directory, "journal-00000001.kvj"), "rb").read())
            recovered[compiled] = sorted(recover(directory).map.items())
    assert outputs[True] == outputs[False]
    assert journals[True] == journals[False]
    assert recovered[True] == recovered[False]
