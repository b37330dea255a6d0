"""The shared key-value store: plain Python, no Twisted, so it can be tested and reused alone."""

from __future__ import annotations

from typing import Iterable, Iterator

from kvtwist.storage.intmap import IntMap


class StoreError(Exception):
    """A request the store refuses as a whole; its text becomes the client's ``Error:`` reply."""


class Store:
    """
    A map from signed 64-bit integers to signed 64-bit integers.

    Every method is atomic with respect to the others simply because the
    server is single-threaded: one request runs to completion before the
    next starts. Keys and values are already validated ints when they
    arrive here; range checks belong to the protocol.

    The entries live in an ``IntMap`` rather than a dict: about a third of
    the memory per key (docs/performance.md).
    """

    def __init__(self) -> None:
        self._data = IntMap()

    def put(self, key: int, value: int) -> bool:
        """Store ``value`` under ``key`` unless the key exists; True if it was stored."""
        return self._data.put(key, value)

    def get(self, key: int) -> int | None:
        """The value under ``key``, or None when there is none."""
        return self._data.get(key)

    def delete(self, key: int) -> bool:
        """Remove ``key``; True if it was there."""
        return self._data.delete(key)

    def items(self) -> Iterator[tuple[int, int]]:
        """Every (key, value) pair, in no particular order."""
        return self._data.items()

    def load(self, pairs: Iterable[tuple[int, int]], count: int) -> None:
        """Fill an empty store with ``count`` pairs of distinct keys, faster than ``put`` one by one."""
        self._data.load(pairs, count)

    def keyParts(self) -> Iterator[list[int]]:
        """
        Every key, in parts listed one at a time, so that a snapshot never
        has to list millions of keys in a single reactor turn. A key that
        stays in the store while the parts are taken appears in exactly one.
        """
        return self._data.keyParts()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data
