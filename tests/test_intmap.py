"""IntMap against a dict model, including heavy collisions, wrap-around and the sentinel key."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtwist.storage.intmap import EMPTY, IntMap

INT64 = st.integers(-(2**63), 2**63 - 1)
SALT = 12345


def _crowdedKeys(count: int) -> list[int]:
    """
    Keys that, under SALT, all fall in shard 0 and in a few home slots,
    among them the last slots of small tables: every put probes, deletes
    shift entries back, and runs wrap around the end of the table.
    """
    keys, k = [], 1
    while len(keys) < count:
        h = hash((SALT, k))
        if h & 255 == 0 and (h >> 8) & 63 in (0, 1, 7, 15, 62, 63):
            keys.append(k)
        k += 1
    return keys


CROWDED = st.sampled_from(_crowdedKeys(60))
# Keys near 0 and near the sentinel, so that runs, wrap-around and the
# special key are all exercised.
KEYS = st.one_of(st.integers(-40, 40), st.sampled_from([EMPTY, -(2**63), 2**63 - 1]), INT64)
VERBS = st.sampled_from(["put", "get", "delete", "set", "pop"])
OPS = st.lists(st.tuples(VERBS, KEYS, INT64), max_size=400)
CROWDED_OPS = st.lists(st.tuples(VERBS, CROWDED | KEYS, INT64), max_size=400)


def _check(m: IntMap, ops: list[tuple[str, int, int]], start: dict[int, int] | None = None) -> None:
    """Run ``ops`` on ``m`` (which holds ``start``) and on a dict, and compare."""
    model: dict[int, int] = dict(start or {})
    for op, key, value in ops:
        if op == "put":
            assert m.put(key, value) == (key not in model)
            model.setdefault(key, value)
        elif op == "get":
            assert m.get(key) == model.get(key)
        elif op == "set":
            m[key] = value
            model[key] = value
        elif op == "pop":
            assert m.pop(key) == model.pop(key, None)
        else:
            assert m.delete(key) == (model.pop(key, None) is not None)
        assert len(m) == len(model)
    assert sorted(m.items()) == sorted(model.items())
    for key in model:
        assert key in m and m.get(key) == model[key]


@given(OPS)
def test_matches_a_dict(ops: list[tuple[str, int, int]]) -> None:
    _check(IntMap(), ops)


@settings(max_examples=200)
@given(CROWDED_OPS)
def test_matches_a_dict_when_keys_collide(ops: list[tuple[str, int, int]]) -> None:
    _check(IntMap(salt=SALT), ops)


def test_growth_and_shrinking_churn_keep_every_entry() -> None:
    m = IntMap(salt=SALT)
    n = 5000
    for k in range(n):
        assert m.put(k, -k)
    for k in range(0, n, 2):
        assert m.delete(k)
    for k in range(n):
        assert m.get(k) == (None if k % 2 == 0 else -k)
    assert len(m) == n // 2


def test_slots_are_int64_sized() -> None:
    m = IntMap()
    for k in range(100_000):
        m.put(k * 7919 + 1, k)
    slots = sum(len(s.keys) for s in m._shards)
    # Stays below the 70% load limit and above a quarter: 16 bytes a slot.
    assert 100_000 / 0.7 < slots < 100_000 * 4


def test_out_of_range_value_changes_nothing() -> None:
    m = IntMap()
    with pytest.raises(OverflowError):
        m.put(1, 2**63)
    with pytest.raises(OverflowError):
        m.put(EMPTY, 2**63)
    assert 1 not in m and EMPTY not in m and len(m) == 0
    assert m.get(1) is None


@pytest.mark.parametrize("key", [1, EMPTY])
def test_an_out_of_range_blind_write_changes_nothing(key: int) -> None:
    m = IntMap()
    with pytest.raises(OverflowError):
        m[key] = 2**63
    assert key not in m and len(m) == 0
    m[key] = 5
    with pytest.raises(OverflowError):
        m[key] = -(2**63) - 1
    assert m.get(key) == 5 and len(m) == 1


@given(st.lists(KEYS, max_size=200))
def test_key_parts_list_every_key_once(keys: list[int]) -> None:
    m = IntMap(salt=SALT)
    for k in keys:
        m.put(k, 0)
    assert sorted(k for part in m.keyParts() for k in part) == sorted(set(keys))


@given(st.dictionaries(KEYS, KEYS, max_size=300), OPS)
def test_a_bulk_write_then_any_operations_match_a_dict(data: dict[int, int], ops: list[tuple[str, int, int]]) -> None:
    m = IntMap()
    m.reserve(len(data))
    m.update(data.items())
    assert len(m) == len(data) and dict(m.items()) == data
    _check(m, ops, data)


@given(st.sets(KEYS, max_size=200), st.sets(KEYS, max_size=50))
def test_key_parts_taken_while_the_map_changes(initial: set[int], added: set[int]) -> None:
    """Keys present throughout appear exactly once, though keys come and go between parts."""
    m = IntMap()
    for k in initial:
        m.put(k, 1)
    added -= initial
    churn = iter(sorted(added))
    seen: list[int] = []
    for part in m.keyParts():
        seen += part
        for k in churn:
            m.put(k, 2)
            break
    stayed = [k for k in seen if k in initial]
    assert sorted(stayed) == sorted(initial)
    assert len(seen) == len(set(seen))


def _slots(m: IntMap) -> int:
    return sum(len(shard.keys) for shard in m._shards)


def test_reserve_makes_room_so_that_no_shard_grows() -> None:
    m = IntMap(salt=3)
    m.reserve(60_000)
    shards = list(m._shards)
    for k in range(1, 60_001):
        m[k] = -k
    assert all(now is before for now, before in zip(m._shards, shards)), "a shard grew"
    assert len(m) == 60_000 and m.get(777) == -777


def test_reserve_takes_no_more_room_than_growing_one_key_at_a_time() -> None:
    """About 260 keys a shard: enough to fill it past half, not enough to need twice the slots."""
    count = 260 * 256
    grown = IntMap(salt=3)
    for k in range(1, count + 1):
        grown.put(k, k)
    reserved = IntMap(salt=3)
    reserved.reserve(count)
    reserved.update((k, k) for k in range(1, count + 1))
    assert _slots(reserved) <= _slots(grown)


@given(st.dictionaries(KEYS, INT64, max_size=200), st.integers(min_value=0, max_value=5000))
def test_reserve_on_a_filled_map_keeps_every_entry(data: dict[int, int], count: int) -> None:
    m = IntMap(salt=SALT)
    for k, v in data.items():
        m[k] = v
    m.reserve(count)
    assert dict(m.items()) == data and len(m) == len(data)
    for k, v in data.items():
        assert m.get(k) == v
