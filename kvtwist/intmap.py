"""
A compact hash map from signed 64-bit integers to signed 64-bit integers.

A dict of Python ints costs about 100 bytes per entry: two int objects of
28-32 bytes each, plus the dict's entry and index. This map keeps keys and
values unboxed in ``array('q')`` tables, 16 bytes a slot, about 34 bytes per
entry at its usual load. It is pure Python: slower per operation than a
dict on CPython, about as fast on PyPy, whose JIT turns the array accesses
into plain loads (docs/performance.md has the figures).

Design:

- Open addressing with linear probing; deletion shifts later entries back
  (no tombstones), so put/delete churn never degrades lookups or forces a
  rebuild.
- Keys are hashed by multiplying with a random odd 64-bit number chosen per
  map, so clients cannot pick keys that all collide; the top bits of the
  product pick the shard and the slot (Fibonacci hashing).
- The map is split into 256 shards that grow independently. Growing
  rehashes one shard, 1/256 of the entries, so no single put stalls the
  server for long, even at millions of keys.
- The key 0 marks empty slots; key 0 itself, when stored, lives in a small
  dict beside the tables.
"""

from __future__ import annotations

import secrets
from array import array
from collections.abc import Iterator

# Zero marks an empty slot: fresh tables are zero bytes, and C-level
# truth tests (filter(None, ...)) skip empty slots without Python calls.
EMPTY = 0
_MASK64 = 2**64 - 1
_SHARD_BITS = 8
_SHARD_SHIFT = 64 - _SHARD_BITS
_MIN_BITS = 3
# Linear probing stays fast up to about 70% full.
_MAX_LOAD = 0.7


class _Shard:
    """One open-addressing table; ``h`` arguments are the 64-bit hash of the key."""

    __slots__ = ("keys", "values", "shift", "mask", "size", "limit")

    def __init__(self, bits: int) -> None:
        capacity = 1 << bits
        self.keys = array("q", bytes(8 * capacity))
        self.values = array("q", bytes(8 * capacity))
        # The slot is taken from the hash bits just below the shard bits.
        self.shift = _SHARD_SHIFT - bits
        self.mask = capacity - 1
        self.size = 0
        self.limit = int(capacity * _MAX_LOAD)

    def find(self, key: int, h: int) -> int:
        """The slot holding ``key``; if absent, ``~slot`` of the empty slot where it would go (negative)."""
        keys, mask = self.keys, self.mask
        i = (h >> self.shift) & mask
        while True:
            k = keys[i]
            if k == key:
                return i
            if k == EMPTY:
                return ~i
            i = (i + 1) & mask

    def insert(self, key: int, value: int, h: int) -> bool:
        i = self.find(key, h)
        if i >= 0:
            return False
        # Value first: if it is out of range, nothing has changed.
        self.values[~i] = value
        self.keys[~i] = key
        self.size += 1
        return True

    def remove(self, slot: int, multiplier: int) -> None:
        """Empty ``slot``, shifting back later entries of its run that may move (no tombstones)."""
        keys, values, mask, shift = self.keys, self.values, self.mask, self.shift
        hole = j = slot
        while True:
            j = (j + 1) & mask
            k = keys[j]
            if k == EMPTY:
                break
            home = (((k * multiplier) & _MASK64) >> shift) & mask
            # The entry at j may fill the hole unless its home lies
            # cyclically after the hole and at or before j.
            if (home - hole - 1) & mask >= (j - hole) & mask:
                keys[hole] = k
                values[hole] = values[j]
                hole = j
        keys[hole] = EMPTY
        self.size -= 1

    def grown(self, multiplier: int) -> _Shard:
        bigger = _Shard(self.mask.bit_length() + 1)
        for k, v in zip(self.keys, self.values):
            if k != EMPTY:
                bigger.insert(k, v, (k * multiplier) & _MASK64)
        return bigger


class IntMap:
    """
    A map of int64 keys to int64 values with dict-like ``get``, plus
    put-if-absent and delete that report whether they changed anything.

    Callers pass ints already known to be in the int64 range; ``array``
    raises OverflowError for others.
    """

    __slots__ = ("_shards", "_multiplier", "_special")

    def __init__(self, multiplier: int | None = None) -> None:
        """``multiplier`` (odd) fixes the hash, for tests; by default it is random."""
        self._shards = [_Shard(_MIN_BITS) for _ in range(1 << _SHARD_BITS)]
        self._multiplier = secrets.randbits(64) | 1 if multiplier is None else multiplier
        if not self._multiplier & 1:
            raise ValueError("the multiplier must be odd")
        self._special: dict[int, int] = {}

    def get(self, key: int, default: int | None = None) -> int | None:
        if key == EMPTY:
            return self._special.get(key, default)
        h = (key * self._multiplier) & _MASK64
        shard = self._shards[h >> _SHARD_SHIFT]
        slot = shard.find(key, h)
        return default if slot < 0 else shard.values[slot]

    def put(self, key: int, value: int) -> bool:
        """Store ``value`` under ``key`` unless it is there; True if stored."""
        if key == EMPTY:
            if key in self._special:
                return False
            array("q", [value])  # the same range check as the tables
            self._special[key] = value
            return True
        h = (key * self._multiplier) & _MASK64
        shards = self._shards
        shard = shards[h >> _SHARD_SHIFT]
        if not shard.insert(key, value, h):
            return False
        if shard.size > shard.limit:
            shards[h >> _SHARD_SHIFT] = shard.grown(self._multiplier)
        return True

    def delete(self, key: int) -> bool:
        """Remove ``key``; True if it was there."""
        if key == EMPTY:
            return self._special.pop(key, None) is not None
        h = (key * self._multiplier) & _MASK64
        shard = self._shards[h >> _SHARD_SHIFT]
        slot = shard.find(key, h)
        if slot < 0:
            return False
        shard.remove(slot, self._multiplier)
        return True

    def items(self) -> Iterator[tuple[int, int]]:
        """Every (key, value) pair, in no particular order."""
        yield from self._special.items()
        for shard in self._shards:
            for k, v in zip(shard.keys, shard.values):
                if k != EMPTY:
                    yield k, v

    def keys(self) -> list[int]:
        """Every key, as a new list: C-level filtering, much faster than items()."""
        keys = list(self._special)
        for shard in self._shards:
            keys += filter(None, shard.keys)
        return keys

    def __len__(self) -> int:
        return len(self._special) + sum(shard.size for shard in self._shards)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, int):
            return False
        if key == EMPTY:
            return key in self._special
        h = (key * self._multiplier) & _MASK64
        return self._shards[h >> _SHARD_SHIFT].find(key, h) >= 0
