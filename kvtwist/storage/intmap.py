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
- A key's hash is Python's hash of the pair (salt, key), with a random salt
  per map: the tuple hash mixes well, so clients cannot easily pick keys
  that collide, and it stays within a machine word, which matters on PyPy
  (a 64-bit multiply there becomes a heap-allocated big integer). The low
  bits pick the shard, the next ones the slot.
- The map is split into 256 shards that grow independently. Growing
  rehashes one shard, 1/256 of the entries, so no single put stalls the
  server for long, even at millions of keys.
- The key 0 marks empty slots; key 0 itself, when stored, lives in a small
  dict beside the tables.
"""

from __future__ import annotations

import math
import secrets
from array import array
from collections.abc import Iterable, Iterator

# Zero marks an empty slot: fresh tables are zero bytes, and C-level
# truth tests (filter(None, ...)) skip empty slots without Python calls.
EMPTY = 0
_SHARD_BITS = 8
_SHARD_MASK = (1 << _SHARD_BITS) - 1
_MIN_BITS = 3
# Linear probing stays fast up to about 70% full.
_MAX_LOAD = 0.7


class _Shard:
    """One open-addressing table; ``h`` arguments are the hash of the key."""

    __slots__ = ("keys", "values", "mask", "size", "limit")

    def __init__(self, bits: int) -> None:
        capacity = 1 << bits
        self.keys = array("q", bytes(8 * capacity))
        self.values = array("q", bytes(8 * capacity))
        self.mask = capacity - 1
        self.size = 0
        self.limit = int(capacity * _MAX_LOAD)

    def find(self, key: int, h: int) -> int:
        """The slot holding ``key``; if absent, ``~slot`` of the empty slot where it would go (negative)."""
        keys, mask = self.keys, self.mask
        i = (h >> _SHARD_BITS) & mask
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

    def remove(self, slot: int, salt: int) -> None:
        """Empty ``slot``, shifting back later entries of its run that may move (no tombstones)."""
        keys, values, mask = self.keys, self.values, self.mask
        hole = j = slot
        while True:
            j = (j + 1) & mask
            k = keys[j]
            if k == EMPTY:
                break
            home = (hash((salt, k)) >> _SHARD_BITS) & mask
            # The entry at j may fill the hole unless its home lies
            # cyclically after the hole and at or before j.
            if (home - hole - 1) & mask >= (j - hole) & mask:
                keys[hole] = k
                values[hole] = values[j]
                hole = j
        keys[hole] = EMPTY
        self.size -= 1

    def grown(self, salt: int, bits: int = 0) -> _Shard:
        """A copy with twice the slots, or ``1 << bits`` slots when that is more."""
        bigger = _Shard(max(bits, self.mask.bit_length() + 1))
        keys, values, mask = bigger.keys, bigger.values, bigger.mask
        for k, v in zip(self.keys, self.values):
            if k != EMPTY:
                # The keys are distinct: the first empty slot is the place.
                i = (hash((salt, k)) >> _SHARD_BITS) & mask
                while keys[i] != EMPTY:
                    i = (i + 1) & mask
                keys[i] = k
                values[i] = v
        bigger.size = self.size
        return bigger


class IntMap:
    """
    A map of int64 keys to int64 values with dict-like ``get``, plus
    put-if-absent and delete that report whether they changed anything,
    which is what the server needs, and the blind writes journal replay
    needs (``m[key] = value``, ``pop``, ``update``), into a map sized up
    front with ``reserve``: recovery fills the store's map directly.

    Callers pass ints already known to be in the int64 range; ``array``
    raises OverflowError for others.
    """

    __slots__ = ("_shards", "_salt", "_special")

    def __init__(self, salt: int | None = None) -> None:
        """``salt`` fixes the hash, for tests; by default it is random."""
        self._shards = [_Shard(_MIN_BITS) for _ in range(1 << _SHARD_BITS)]
        self._salt = secrets.randbits(60) if salt is None else salt
        self._special: dict[int, int] = {}

    def get(self, key: int, default: int | None = None) -> int | None:
        if key == EMPTY:
            return self._special.get(key, default)
        h = hash((self._salt, key))
        shard = self._shards[h & _SHARD_MASK]
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
        h = hash((self._salt, key))
        shards = self._shards
        shard = shards[h & _SHARD_MASK]
        if not shard.insert(key, value, h):
            return False
        if shard.size > shard.limit:
            shards[h & _SHARD_MASK] = shard.grown(self._salt)
        return True

    def __setitem__(self, key: int, value: int) -> None:
        """Set ``key`` to ``value``, whether or not it is there: a blind write, as journal replay does."""
        self.update(((key, value),))

    def update(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Blind-write every pair; recovery loads snapshots and journal pieces this way."""
        salt, shards, special = self._salt, self._shards, self._special
        for key, value in pairs:
            if key == EMPTY:
                array("q", [value])  # the same range check as the tables
                special[key] = value
                continue
            # ``find`` inlined: this runs once per key recovered.
            h = hash((salt, key))
            shard = shards[h & _SHARD_MASK]
            keys, mask = shard.keys, shard.mask
            i = (h >> _SHARD_BITS) & mask
            while True:
                k = keys[i]
                if k == key:
                    shard.values[i] = value
                    break
                if k == EMPTY:
                    # Value first: if it is out of range, nothing has changed.
                    shard.values[i] = value
                    keys[i] = key
                    shard.size += 1
                    if shard.size > shard.limit:
                        shards[h & _SHARD_MASK] = shard.grown(salt)
                    break
                i = (i + 1) & mask

    def pop(self, key: int, default: int | None = None) -> int | None:
        """Remove ``key`` if it is there and return its value, else ``default``."""
        if key == EMPTY:
            return self._special.pop(key, default)
        h = hash((self._salt, key))
        shard = self._shards[h & _SHARD_MASK]
        slot = shard.find(key, h)
        if slot < 0:
            return default
        value = shard.values[slot]
        shard.remove(slot, self._salt)
        return value

    def delete(self, key: int) -> bool:
        """Remove ``key``; True if it was there."""
        return self.pop(key) is not None

    def items(self) -> Iterator[tuple[int, int]]:
        """Every (key, value) pair, in no particular order."""
        yield from self._special.items()
        for shard in self._shards:
            for k, v in zip(shard.keys, shard.values):
                if k != EMPTY:
                    yield k, v

    def reserve(self, count: int) -> None:
        """
        Make room for ``count`` entries in all, so that filling the map up
        to that many grows (and rehashes) no shard.

        Each shard gets room for its share plus four standard deviations,
        which no shard of a random hash exceeds in practice (one that does
        just grows), and no more: recovery presizes the map for a
        snapshot's entries, and room it reserves is kept for good.
        """
        share = count / len(self._shards)
        need = share + 4 * math.sqrt(share) + 1
        bits = _MIN_BITS
        while (1 << bits) * _MAX_LOAD < need:
            bits += 1
        shards, salt = self._shards, self._salt
        for i, shard in enumerate(shards):
            if shard.mask + 1 < 1 << bits:
                shards[i] = _Shard(bits) if not shard.size else shard.grown(salt, bits)

    def keyParts(self) -> Iterator[list[int]]:
        """
        Every key, a shard at a time; each part is listed only when it is asked for.

        A key never moves between shards, so a caller that takes the parts
        over several steps, while the map changes, still sees each key that
        stays in the map throughout exactly once.
        """
        yield list(self._special)
        for i in range(len(self._shards)):
            yield list(filter(None, self._shards[i].keys))

    def __len__(self) -> int:
        return len(self._special) + sum(shard.size for shard in self._shards)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, int):
            return False
        if key == EMPTY:
            return key in self._special
        h = hash((self._salt, key))
        return self._shards[h & _SHARD_MASK].find(key, h) >= 0
