"""The shared key-value store: plain Python, no Twisted, so it can be tested and reused alone."""

from __future__ import annotations

from typing import Iterator


class StoreError(Exception):
    """A request the store refuses as a whole; its text becomes the client's ``Error:`` reply."""


class Store:
    """
    A map from signed 64-bit integers to signed 64-bit integers.

    Every method is atomic with respect to the others simply because the
    server is single-threaded: one request runs to completion before the
    next starts. Keys and values are already validated ints when they
    arrive here; range checks belong to the protocol.
    """

    def __init__(self) -> None:
        self._data: dict[int, int] = {}

    def put(self, key: int, value: int) -> bool:
        """Store ``value`` under ``key`` unless the key exists; True if it was stored."""
        data = self._data
        if key in data:
            return False
        data[key] = value
        return True

    def get(self, key: int) -> int | None:
        """The value under ``key``, or None when there is none."""
        return self._data.get(key)

    def delete(self, key: int) -> bool:
        """Remove ``key``; True if it was there."""
        return self._data.pop(key, None) is not None

    def items(self) -> Iterator[tuple[int, int]]:
        """Every (key, value) pair, in no particular order."""
        return iter(self._data.items())

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data
